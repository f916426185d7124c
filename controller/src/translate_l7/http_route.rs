//! Gateway API HTTPRoute, mesh (GAMMA) form → route table.
//!
//! A route attached to Services (`parentRefs` of kind Service) becomes a
//! [`l7::VirtualService`] of kind `HTTPRoute` for those Services. The Gateway API orders
//! matches by specificity, not by position, so each match of each rule becomes its own route,
//! sorted as Istio sorts them; the waypoint then takes the first that holds, as it does for a
//! VirtualService. (Precedence across several HTTPRoutes for one Service is by age, not
//! specificity: each route is its own table.)

use std::collections::BTreeMap;

use warren_core::l7::{
    self, DirectResponse, HeaderOperations, Headers, HttpRoute, Mirror, RequestMatch, Retries, Rewrite,
    RouteDestination, RouteKind, StringMatch,
};

use super::{
    Mesh, Report, check_regex, default_retries, header_operations, namespace_of, optional_duration,
    port_number,
};
use crate::{
    findings::{Finding, codes},
    objects::gateway_api::{self, BackendRef, Filter, HeaderModifier, ObjectRef},
    waypoint_binding::WAYPOINT_CLASSES,
};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Which requests for which Services: the route's matches narrowed to a port (a parent's
/// `port` or `sectionName`) and, for a route attached to a Service in another namespace (a
/// "consumer" route), to clients of the route's namespace.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Scope {
    port: Option<u16>,
    consumer: bool,
}

pub(super) fn translate(
    route: &gateway_api::HttpRoute,
    mesh: &Mesh<'_>,
    findings: &mut Vec<Finding>,
) -> Vec<l7::VirtualService> {
    let mut r = Report::new("HTTPRoute", &route.metadata, findings);
    let namespace = namespace_of(&route.metadata);
    let mut parents: BTreeMap<Scope, Vec<String>> = BTreeMap::new();
    for (i, p) in route.spec.parent_refs.iter().enumerate() {
        if let Some((scope, host)) = parent(p, &format!("spec.parentRefs[{i}]"), &namespace, mesh, &mut r) {
            let hosts = parents.entry(scope).or_default();
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
    }
    if parents.is_empty() {
        return Vec::new();
    }
    let mut routes = Vec::new();
    for (i, rule) in route.spec.rules.iter().enumerate() {
        routes.extend(rule_routes(rule, &format!("spec.rules[{i}]"), &namespace, mesh, &mut r));
    }
    // Istio's order (the Gateway API's precedence): exact path, then prefix, then regex; longer
    // paths first; then a method; then more headers; then more query parameters. Stable: ties
    // keep rule order.
    routes.sort_by_key(|h: &HttpRoute| {
        let m = &h.matches[0];
        let (rank, len) = match &m.uri {
            Some(StringMatch::Exact(p)) => (3, p.len()),
            Some(StringMatch::Prefix(p) | StringMatch::PathPrefix(p)) => (2, p.len()),
            Some(StringMatch::Regex(p)) => (1, p.len()),
            _ => (0, 0),
        };
        std::cmp::Reverse((rank, len, m.method.is_some(), m.headers.len(), m.query_params.len()))
    });
    parents
        .into_iter()
        .map(|(scope, hosts)| {
            let mut http = routes.clone();
            for m in http.iter_mut().flat_map(|h| h.matches.iter_mut()) {
                m.port = scope.port;
                if scope.consumer {
                    m.source_namespace = Some(namespace.clone());
                }
            }
            l7::VirtualService {
                name: route.metadata.name.clone().unwrap_or_default(),
                namespace: namespace.clone(),
                kind: RouteKind::HttpRoute,
                hosts,
                http,
            }
        })
        .collect()
}

/// A Service parent, with the scope it gives the route; None (reported) for anything else.
fn parent(
    p: &ObjectRef,
    at: &str,
    namespace: &str,
    mesh: &Mesh<'_>,
    r: &mut Report<'_>,
) -> Option<(Scope, String)> {
    let kind = p.kind.as_deref().unwrap_or("Gateway");
    // The CRD defaults the group to the Gateway API's; with `kind: Service` and no group
    // (manifests read from files are not defaulted), the core Service is meant.
    let group = p.group.as_deref().unwrap_or(if kind == "Service" { "" } else { GATEWAY_GROUP });
    let parent_namespace = p.namespace.as_deref().unwrap_or(namespace);
    match (group, kind) {
        ("" | "core", "Service") => {}
        (GATEWAY_GROUP, "Gateway") => {
            let message = if mesh
                .gateway_class(parent_namespace, &p.name)
                .is_some_and(|c| WAYPOINT_CLASSES.contains(&c))
            {
                "is a waypoint: attach mesh routes to the Services it serves (parentRefs of kind Service); this parent is ignored"
            } else {
                "is not a waypoint (an ingress Gateway): Warren routes mesh traffic only; this parent is ignored"
            };
            r.warning(codes::NOT_FOR_MESH, at, format!("Gateway {parent_namespace}/{} {message}", p.name));
            return None;
        }
        _ => {
            r.warning(
                codes::NOT_FOR_MESH,
                format!("{at}.kind"),
                format!("{group}/{kind} parents are not supported (Service, for mesh routes); this parent is ignored"),
            );
            return None;
        }
    }
    let host = format!("{}.{parent_namespace}.svc.{}", p.name, super::CLUSTER_DOMAIN);
    if !mesh.is_service(&host) {
        r.warning(codes::UNKNOWN_HOST, at, format!("{host} is not a Service; this parent is ignored"));
        return None;
    }
    mesh.check_waypoint(&host, at, "routes", r);
    let port = match (p.port, &p.section_name) {
        (Some(n), _) => Some(port_number(n).or_else(|| {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.port"),
                format!("{n} is not a port; this parent is ignored"),
            );
            None
        })?),
        (None, Some(name)) => Some(mesh.port_named(&host, name).or_else(|| {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.sectionName"),
                format!("{host} has no port named {name:?}; this parent is ignored"),
            );
            None
        })?),
        (None, None) => None,
    };
    Some((Scope { port, consumer: parent_namespace != namespace }, host))
}

/// One route per match of the rule (the default match, PathPrefix `/`, when it has none).
fn rule_routes(
    rule: &gateway_api::Rule,
    at: &str,
    namespace: &str,
    mesh: &Mesh<'_>,
    r: &mut Report<'_>,
) -> Vec<HttpRoute> {
    let matches: Vec<RequestMatch> = if rule.matches.is_empty() {
        vec![RequestMatch { uri: Some(StringMatch::PathPrefix("/".into())), ..Default::default() }]
    } else {
        let kept: Vec<_> = rule
            .matches
            .iter()
            .enumerate()
            .filter_map(|(j, m)| request_match(m, &format!("{at}.matches[{j}]"), r))
            .collect();
        if kept.is_empty() {
            r.warning(
                codes::INVALID_VALUE,
                format!("{at}.matches"),
                "no match is left, so the rule is dropped (without matches it would take every request)",
            );
            return Vec::new();
        }
        kept
    };
    let action = rule_action(rule, at, namespace, mesh, r);
    matches.into_iter().map(|m| HttpRoute { matches: vec![m], ..action.clone() }).collect()
}

fn request_match(m: &gateway_api::Match, at: &str, r: &mut Report<'_>) -> Option<RequestMatch> {
    let path = m.path.as_ref();
    let value = path.and_then(|p| p.value.clone()).unwrap_or_else(|| "/".into());
    let uri = match path.and_then(|p| p.kind.as_deref()).unwrap_or("PathPrefix") {
        "Exact" => StringMatch::Exact(value),
        "PathPrefix" => StringMatch::PathPrefix(value),
        "RegularExpression" => StringMatch::Regex(value),
        other => {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.path.type"),
                format!("{other:?} is not a path match type; this match is dropped"),
            );
            return None;
        }
    };
    if !check_regex(&uri, &format!("{at}.path.value"), r, "this match is dropped") {
        return None;
    }
    Some(RequestMatch {
        uri: Some(uri),
        method: m.method.clone().map(StringMatch::Exact),
        headers: value_matches(&m.headers, &format!("{at}.headers"), true, r)?,
        query_params: value_matches(&m.query_params, &format!("{at}.queryParams"), false, r)?,
        ..Default::default()
    })
}

/// Header (names lower-cased) or query parameter matches; the first for a name wins, as the
/// Gateway API says.
fn value_matches(
    list: &[gateway_api::ValueMatch],
    at: &str,
    lower: bool,
    r: &mut Report<'_>,
) -> Option<BTreeMap<String, StringMatch>> {
    let mut out = BTreeMap::new();
    for (k, v) in list.iter().enumerate() {
        let here = format!("{at}[{k}]");
        let m = match v.kind.as_deref().unwrap_or("Exact") {
            "Exact" => StringMatch::Exact(v.value.clone()),
            "RegularExpression" => StringMatch::Regex(v.value.clone()),
            other => {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{here}.type"),
                    format!("{other:?} is not a match type; this match is dropped"),
                );
                return None;
            }
        };
        if !check_regex(&m, &format!("{here}.value"), r, "this match is dropped") {
            return None;
        }
        let name = if lower { v.name.to_ascii_lowercase() } else { v.name.clone() };
        out.entry(name).or_insert(m);
    }
    Some(out)
}

/// What a rule does, without its matches.
fn rule_action(
    rule: &gateway_api::Rule,
    at: &str,
    namespace: &str,
    mesh: &Mesh<'_>,
    r: &mut Report<'_>,
) -> HttpRoute {
    let mut out = HttpRoute { name: rule.name.clone(), ..Default::default() };
    let mut redirect = None;
    for (k, filter) in rule.filters.iter().enumerate() {
        let here = format!("{at}.filters[{k}]");
        match filter.kind.as_str() {
            "RequestHeaderModifier" => {
                merge(&mut out.headers.request, filter.request_header_modifier.as_ref())
            }
            "ResponseHeaderModifier" => {
                merge(&mut out.headers.response, filter.response_header_modifier.as_ref())
            }
            "URLRewrite" => out.rewrite = url_rewrite(filter, &here, r),
            "RequestMirror" => out.mirrors.extend(mirror(filter, &here, namespace, mesh, r)),
            "RequestRedirect" => redirect = Some(request_redirect(filter, &here, r)),
            other => {
                // The Gateway API forbids skipping a filter: requests it would have handled get
                // an error instead.
                r.error(
                    codes::UNSUPPORTED,
                    format!("{here}.type"),
                    format!("filter {other:?} is not supported; the rule answers 500"),
                );
                return HttpRoute {
                    name: rule.name.clone(),
                    direct_response: Some(status_500()),
                    ..Default::default()
                };
            }
        }
    }
    if let Some(redirect) = redirect {
        if !rule.backend_refs.is_empty() {
            r.warning(
                codes::INVALID_VALUE,
                format!("{at}.backendRefs"),
                "a rule with a RequestRedirect filter does not forward; backendRefs ignored",
            );
        }
        out.redirect = Some(redirect);
        return out;
    }
    let mut backends: Vec<RouteDestination> = Vec::new();
    for (k, b) in rule.backend_refs.iter().enumerate() {
        backends.extend(backend(b, &format!("{at}.backendRefs[{k}]"), namespace, mesh, r));
    }
    // Gateway API: a rule with no backend that can take traffic answers 500.
    if backends.iter().all(|b| b.weight == 0) {
        if !rule.backend_refs.is_empty() {
            r.warning(
                codes::INVALID_VALUE,
                format!("{at}.backendRefs"),
                "no backend can take traffic (none usable, or all weights 0): requests get 500",
            );
        }
        out.direct_response = Some(status_500());
        return out;
    }
    if let [lone] = backends.as_mut_slice() {
        lone.weight = 100;
    }
    out.route = backends;
    let timeouts = rule.timeouts.as_ref();
    out.timeout_ms = optional_duration(
        timeouts.and_then(|t| t.request.as_deref()),
        &format!("{at}.timeouts.request"),
        "the rule has no timeout",
        r,
    );
    out.retries = retries(rule.retry.as_ref());
    let per_try = optional_duration(
        timeouts.and_then(|t| t.backend_request.as_deref()),
        &format!("{at}.timeouts.backendRequest"),
        "tries have no timeout of their own",
        r,
    );
    if let Some(retries) = &mut out.retries {
        retries.per_try_timeout_ms = per_try;
    } else if per_try.is_some() {
        // No retries: the one backend request is the whole request.
        out.timeout_ms = match (out.timeout_ms, per_try) {
            (Some(whole), Some(one)) => Some(whole.min(one)),
            (whole, one) => whole.or(one),
        };
    }
    out
}

fn status_500() -> DirectResponse {
    DirectResponse { status: 500, body: None }
}

/// Istio's default policy unless the rule says otherwise (GEP-1731 `retry`: attempts, default
/// 2, and status codes to retry besides connection failures).
fn retries(retry: Option<&gateway_api::Retry>) -> Option<Retries> {
    let Some(retry) = retry else { return Some(default_retries()) };
    let attempts = u32::try_from(retry.attempts.unwrap_or(2)).ok().filter(|a| *a > 0)?;
    let mut retry_on: Vec<String> =
        ["connect-failure", "refused-stream", "unavailable", "cancelled"].map(String::from).to_vec();
    if !retry.codes.is_empty() {
        retry_on.push("retriable-status-codes".into());
        retry_on.extend(retry.codes.iter().map(|c| c.to_string()));
    }
    Some(Retries { attempts, per_try_timeout_ms: None, retry_on })
}

fn merge(into: &mut HeaderOperations, modifier: Option<&HeaderModifier>) {
    let Some(m) = modifier else { return };
    let pairs = |list: &[gateway_api::Header]| {
        list.iter().map(|h| (h.name.clone(), h.value.clone())).collect::<Vec<_>>()
    };
    let (set, add) = (pairs(&m.set), pairs(&m.add));
    let ops = header_operations(set.iter().map(|(k, v)| (k, v)), add.iter().map(|(k, v)| (k, v)), &m.remove);
    into.set.extend(ops.set);
    into.add.extend(ops.add);
    into.remove.extend(ops.remove.into_iter().filter(|h| !into.remove.contains(h)).collect::<Vec<_>>());
}

fn backend(
    b: &BackendRef,
    at: &str,
    namespace: &str,
    mesh: &Mesh<'_>,
    r: &mut Report<'_>,
) -> Option<RouteDestination> {
    let target = ObjectRef {
        group: b.group.clone(),
        kind: b.kind.clone(),
        name: b.name.clone(),
        namespace: b.namespace.clone(),
        port: b.port,
        section_name: None,
    };
    let destination =
        service_ref(&target, at, namespace, mesh, r, "its share of traffic goes to the other backends")?;
    let weight = match b.weight {
        None => 1,
        Some(w) => u32::try_from(w).unwrap_or_else(|_| {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.weight"),
                format!("{w} is not a weight (a non-negative integer); treated as 0, so this backend gets no traffic"),
            );
            0
        }),
    };
    let mut headers = Headers::default();
    for (k, f) in b.filters.iter().enumerate() {
        match f.kind.as_str() {
            "RequestHeaderModifier" => merge(&mut headers.request, f.request_header_modifier.as_ref()),
            "ResponseHeaderModifier" => merge(&mut headers.response, f.response_header_modifier.as_ref()),
            other => r.warning(
                codes::UNSUPPORTED,
                format!("{at}.filters[{k}].type"),
                format!("filter {other:?} is not supported on a backend; ignored"),
            ),
        }
    }
    Some(RouteDestination { destination, weight, headers })
}

/// A backend or mirror reference to a Service, resolved. None (reported) for other kinds, bad
/// ports, and Services in another namespace that no ReferenceGrant lets the route use.
fn service_ref(
    b: &ObjectRef,
    at: &str,
    namespace: &str,
    mesh: &Mesh<'_>,
    r: &mut Report<'_>,
    dropped: &str,
) -> Option<l7::Destination> {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        r.warning(
            codes::UNSUPPORTED,
            format!("{at}.kind"),
            format!("{group}/{kind} backends are not supported (Service only); dropped, {dropped}"),
        );
        return None;
    }
    let backend_namespace = b.namespace.as_deref().unwrap_or(namespace);
    if !mesh.grants.route_may_use(namespace, backend_namespace, &b.name) {
        r.error(
            codes::REFERENCE_NOT_PERMITTED,
            format!("{at}.namespace"),
            format!(
                "Service {backend_namespace}/{} is in another namespace, and no ReferenceGrant in \
                 {backend_namespace} lets HTTPRoutes from {namespace} refer to it; refused, {dropped}",
                b.name
            ),
        );
        return None;
    }
    let host = format!("{}.{backend_namespace}.svc.{}", b.name, super::CLUSTER_DOMAIN);
    if !mesh.is_service(&host) {
        r.error(
            codes::UNKNOWN_HOST,
            format!("{at}.name"),
            format!("{host} is not a Service: requests sent to it will fail"),
        );
    }
    let port = match b.port {
        None => None,
        Some(n) => Some(port_number(n).or_else(|| {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.port"),
                format!("{n} is not a port; dropped, {dropped}"),
            );
            None
        })?),
    };
    Some(l7::Destination { host, subset: None, port })
}

fn url_rewrite(filter: &Filter, at: &str, r: &mut Report<'_>) -> Option<Rewrite> {
    let u = filter.url_rewrite.as_ref()?;
    let mut out = Rewrite { authority: u.hostname.clone(), ..Default::default() };
    if let Some(path) = &u.path {
        match path.kind.as_str() {
            "ReplaceFullPath" => out.full_path = path.replace_full_path.clone(),
            "ReplacePrefixMatch" => out.uri = path.replace_prefix_match.clone(),
            other => r.error(
                codes::INVALID_VALUE,
                format!("{at}.urlRewrite.path.type"),
                format!("{other:?} is not a path modifier; the path is not rewritten"),
            ),
        }
    }
    (out != Rewrite::default()).then_some(out)
}

fn request_redirect(filter: &Filter, at: &str, r: &mut Report<'_>) -> l7::Redirect {
    let here = format!("{at}.requestRedirect");
    let rd = filter.request_redirect.clone().unwrap_or_default();
    let mut out =
        l7::Redirect { scheme: rd.scheme, authority: rd.hostname, redirect_code: 302, ..Default::default() };
    if let Some(path) = &rd.path {
        match path.kind.as_str() {
            "ReplaceFullPath" => out.uri = path.replace_full_path.clone(),
            "ReplacePrefixMatch" => out.uri_prefix = path.replace_prefix_match.clone(),
            other => r.error(
                codes::INVALID_VALUE,
                format!("{here}.path.type"),
                format!("{other:?} is not a path modifier; the path is kept"),
            ),
        }
    }
    if let Some(n) = rd.port {
        out.port = port_number(n);
        if out.port.is_none() {
            r.error(codes::INVALID_VALUE, format!("{here}.port"), format!("{n} is not a port; ignored"));
        }
    }
    match rd.status_code {
        None => {}
        Some(c @ 300..=399) => out.redirect_code = c as u16,
        Some(c) => r.error(
            codes::INVALID_VALUE,
            format!("{here}.statusCode"),
            format!("{c} is not a redirect status (3xx); 302 is used"),
        ),
    }
    out
}

fn mirror(filter: &Filter, at: &str, namespace: &str, mesh: &Mesh<'_>, r: &mut Report<'_>) -> Option<Mirror> {
    let here = format!("{at}.requestMirror");
    let m = filter.request_mirror.as_ref()?;
    let destination = service_ref(
        &m.backend_ref,
        &format!("{here}.backendRef"),
        namespace,
        mesh,
        r,
        "nothing is mirrored",
    )?;
    let percentage = match (m.percent, &m.fraction) {
        (Some(p), _) => p as f64,
        (None, Some(f)) => {
            let denominator = f.denominator.unwrap_or(100);
            if denominator <= 0 {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{here}.fraction.denominator"),
                    "must be positive; nothing is mirrored",
                );
                return None;
            }
            f.numerator as f64 * 100.0 / denominator as f64
        }
        (None, None) => 100.0,
    };
    if !(0.0..=100.0).contains(&percentage) {
        r.error(
            codes::INVALID_VALUE,
            here,
            format!("mirrors {percentage}% of requests, not 0 to 100; nothing is mirrored"),
        );
        return None;
    }
    Some(Mirror { destination, percentage })
}
