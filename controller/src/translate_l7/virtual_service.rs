//! Istio VirtualService → route table.

use std::collections::BTreeMap;

use warren_core::l7::{
    self, DirectResponse, Fault, FaultAbort, FaultDelay, Headers, HttpRoute, Mirror, RegexRewrite,
    RequestMatch, Retries, Rewrite, RouteDestination, RouteKind, StringMatch,
};

use super::{
    Mesh, Report, check_regex, default_retries, duration_ms, fqdn, header_operations, namespace_of,
    optional_duration, percentage, port_number, regex_error,
};
use crate::{
    findings::{Finding, codes},
    objects::{self, HeadersSpec},
};

pub(super) fn translate(
    vs: &objects::VirtualService,
    mesh: &Mesh<'_>,
    findings: &mut Vec<Finding>,
) -> Option<l7::VirtualService> {
    let mut r = Report::new("VirtualService", &vs.metadata, findings);
    let namespace = namespace_of(&vs.metadata);
    let spec = &vs.spec;
    if !for_mesh(&spec.gateways) {
        r.warning(
            codes::NOT_FOR_MESH,
            "spec.gateways",
            "binds the routes to gateways only (no `mesh`): not for mesh traffic; ignored",
        );
        return None;
    }
    for (name, list) in [("tcp", &spec.tcp), ("tls", &spec.tls)] {
        if !list.is_empty() {
            r.warning(
                codes::UNSUPPORTED,
                format!("spec.{name}"),
                format!("{} routes are not translated (waypoints route HTTP); ignored", name.to_uppercase()),
            );
        }
    }
    let mut hosts: Vec<String> = Vec::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        let name = fqdn(host, &namespace);
        if !mesh.is_service(&name) {
            r.warning(
                codes::UNKNOWN_HOST,
                field,
                format!("{host:?} ({name}) is not a Service; dropped (waypoints route Services only)"),
            );
        } else if !hosts.contains(&name) {
            mesh.check_waypoint(&name, &field, "routes", &mut r);
            hosts.push(name);
        }
    }
    if hosts.is_empty() {
        r.warning(codes::UNKNOWN_HOST, "spec.hosts", "no host is a Service; the VirtualService is ignored");
        return None;
    }
    let http = spec
        .http
        .iter()
        .enumerate()
        .filter_map(|(i, route)| http_route(route, &format!("spec.http[{i}]"), &namespace, &mut r))
        .collect();
    Some(l7::VirtualService {
        name: vs.metadata.name.clone().unwrap_or_default(),
        namespace,
        kind: RouteKind::VirtualService,
        hosts,
        http,
    })
}

/// `gateways` (of a VirtualService or a match): empty, or naming `mesh`.
fn for_mesh(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

fn http_route(
    route: &objects::HttpRoute,
    at: &str,
    namespace: &str,
    r: &mut Report<'_>,
) -> Option<HttpRoute> {
    if route.delegate.is_some() {
        r.warning(
            codes::UNSUPPORTED,
            format!("{at}.delegate"),
            "delegation is not supported; the route is dropped",
        );
        return None;
    }
    if route.cors_policy.is_some() {
        r.warning(
            codes::UNSUPPORTED,
            format!("{at}.corsPolicy"),
            "CORS is not implemented by the waypoint; ignored",
        );
    }
    let mut matches = Vec::new();
    for (j, m) in route.matches.iter().enumerate() {
        matches.extend(request_match(m, &format!("{at}.match[{j}]"), r));
    }
    if !route.matches.is_empty() && matches.is_empty() {
        r.warning(
            codes::INVALID_VALUE,
            format!("{at}.match"),
            "no match is left, so the route is dropped (without matches it would take every request)",
        );
        return None;
    }
    let mut out = HttpRoute { name: route.name.clone(), matches, ..Default::default() };

    // Exactly one action. Istio refuses an object with several; when one slips through, its
    // proxy uses redirect, then directResponse, then route, and so does this.
    let actions: Vec<&str> = [
        ("redirect", route.redirect.is_some()),
        ("directResponse", route.direct_response.is_some()),
        ("route", !route.route.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if actions.len() > 1 {
        r.error(
            codes::INVALID_VALUE,
            at,
            format!("sets {}; only one may be set, {} is used", actions.join(" and "), actions[0]),
        );
    }
    match actions.first().copied() {
        Some("redirect") => {
            out.redirect = route.redirect.as_ref().map(|rd| redirect(rd, &format!("{at}.redirect"), r))
        }
        Some("directResponse") => {
            out.direct_response =
                Some(direct_response(route.direct_response.as_ref()?, &format!("{at}.directResponse"), r)?)
        }
        Some(_) => {
            out.route = destinations(&route.route, at, namespace, r);
            if out.route.is_empty() {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{at}.route"),
                    "no usable destination; the route is dropped",
                );
                return None;
            }
            out.retries = retries(route.retries.as_ref(), &format!("{at}.retries"), r);
        }
        None => {
            r.error(
                codes::INVALID_VALUE,
                at,
                "has none of route, redirect, directResponse; the route is dropped",
            );
            return None;
        }
    }
    out.rewrite = route.rewrite.as_ref().and_then(|rw| rewrite(rw, &format!("{at}.rewrite"), r));
    out.timeout_ms =
        optional_duration(route.timeout.as_deref(), &format!("{at}.timeout"), "the route has no timeout", r);
    out.fault = route.fault.as_ref().and_then(|f| fault(f, &format!("{at}.fault"), r));
    out.mirrors = mirrors(route, at, namespace, r);
    out.headers = headers(route.headers.as_ref());
    Some(out)
}

/// A match, or None (reported) when one of its fields can never hold: the route's other
/// matches still stand, and dropping a field instead would widen the match.
fn request_match(m: &objects::HttpMatch, at: &str, r: &mut Report<'_>) -> Option<RequestMatch> {
    if !for_mesh(&m.gateways) {
        r.warning(
            codes::NOT_FOR_MESH,
            format!("{at}.gateways"),
            "names gateways only (no `mesh`): this match does not apply to mesh traffic; dropped",
        );
        return None;
    }
    // `{}` is no condition on these (as Istio's proxy reads it).
    let one = |name: &str, v: &Option<objects::StringMatch>, r: &mut Report<'_>| match v {
        None => Some(None),
        Some(v) if v.exact.is_none() && v.prefix.is_none() && v.regex.is_none() => Some(None),
        Some(v) => string_match(v, &format!("{at}.{name}"), r).map(Some),
    };
    let map = |name: &str, m: &BTreeMap<String, objects::StringMatch>, lower: bool, r: &mut Report<'_>| {
        m.iter()
            .map(|(key, v)| {
                let matcher = string_match(v, &format!("{at}.{name}.{key}"), r)?;
                Some((if lower { key.to_ascii_lowercase() } else { key.clone() }, matcher))
            })
            .collect::<Option<BTreeMap<_, _>>>()
    };
    let port = match m.port {
        None => None,
        Some(n) => match port_number(n) {
            Some(p) => Some(p),
            None => {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{at}.port"),
                    format!("{n} is not a port; this match is dropped"),
                );
                return None;
            }
        },
    };
    Some(RequestMatch {
        name: m.name.clone(),
        uri: one("uri", &m.uri, r)?,
        scheme: one("scheme", &m.scheme, r)?,
        method: one("method", &m.method, r)?,
        authority: one("authority", &m.authority, r)?,
        headers: map("headers", &m.headers, true, r)?,
        query_params: map("queryParams", &m.query_params, false, r)?,
        without_headers: map("withoutHeaders", &m.without_headers, true, r)?,
        ignore_uri_case: m.ignore_uri_case,
        port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
    })
}

/// Istio's StringMatch; `{}` means "present" (headers, query parameters). None (reported):
/// the match is dropped.
fn string_match(v: &objects::StringMatch, at: &str, r: &mut Report<'_>) -> Option<StringMatch> {
    let set: Vec<StringMatch> = [
        v.exact.clone().map(StringMatch::Exact),
        v.prefix.clone().map(StringMatch::Prefix),
        v.regex.clone().map(StringMatch::Regex),
    ]
    .into_iter()
    .flatten()
    .collect();
    match set.len() {
        0 => Some(StringMatch::Present),
        1 => {
            let m = set.into_iter().next()?;
            check_regex(&m, &format!("{at}.regex"), r, "this match is dropped").then_some(m)
        }
        _ => {
            r.error(
                codes::INVALID_VALUE,
                at,
                "sets more than one of exact, prefix, regex; this match is dropped",
            );
            None
        }
    }
}

fn destinations(
    list: &[objects::RouteDestination],
    at: &str,
    namespace: &str,
    r: &mut Report<'_>,
) -> Vec<RouteDestination> {
    // Istio: a lone destination takes all traffic whatever its weight; otherwise weights are
    // relative and an unset weight is 0.
    let lone = list.len() == 1;
    let mut out = Vec::new();
    for (k, d) in list.iter().enumerate() {
        let here = format!("{at}.route[{k}]");
        let Some(destination) = destination(&d.destination, &format!("{here}.destination"), namespace, r)
        else {
            continue;
        };
        let weight = match d.weight {
            _ if lone => 100,
            None => 0,
            Some(w) => u32::try_from(w).unwrap_or_else(|_| {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{here}.weight"),
                    format!("{w} is not a weight (a non-negative integer); treated as 0, so this destination gets no traffic"),
                );
                0
            }),
        };
        out.push(RouteDestination { destination, weight, headers: headers(d.headers.as_ref()) });
    }
    out
}

/// A destination with its host resolved. None (reported) when it cannot be used: without its
/// port, requests would silently go to another port of the service.
pub(super) fn destination(
    d: &objects::Destination,
    at: &str,
    namespace: &str,
    r: &mut Report<'_>,
) -> Option<l7::Destination> {
    if d.host.is_empty() {
        r.error(codes::INVALID_VALUE, format!("{at}.host"), "is empty; the destination is dropped");
        return None;
    }
    let port = match d.port.as_ref().and_then(|p| p.number) {
        None => None,
        Some(n) => Some(port_number(n).or_else(|| {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.port.number"),
                format!("{n} is not a port; the destination is dropped"),
            );
            None
        })?),
    };
    Some(l7::Destination {
        host: fqdn(&d.host, namespace),
        subset: d.subset.clone().filter(|s| !s.is_empty()),
        port,
    })
}

fn redirect(rd: &objects::HttpRedirect, at: &str, r: &mut Report<'_>) -> l7::Redirect {
    let redirect_code = match rd.redirect_code {
        None => 301,
        Some(c @ 300..=399) => c as u16,
        Some(c) => {
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.redirectCode"),
                format!("{c} is not a redirect status (3xx); 301 is used"),
            );
            301
        }
    };
    let port = rd.port.and_then(|n| {
        let p = port_number(n);
        if p.is_none() {
            r.error(codes::INVALID_VALUE, format!("{at}.port"), format!("{n} is not a port; ignored"));
        }
        p
    });
    l7::Redirect {
        uri: rd.uri.clone(),
        uri_prefix: None,
        authority: rd.authority.clone(),
        scheme: rd.scheme.clone(),
        port,
        redirect_code,
    }
}

fn direct_response(d: &objects::HttpDirectResponse, at: &str, r: &mut Report<'_>) -> Option<DirectResponse> {
    let status = match d.status {
        Some(s @ 200..=599) => s as u16,
        other => {
            let shown = other.map_or("missing".to_string(), |s| s.to_string());
            r.error(
                codes::INVALID_VALUE,
                format!("{at}.status"),
                format!("{shown}: a status from 200 to 599 is needed; the route is dropped"),
            );
            return None;
        }
    };
    let body = d.body.as_ref().and_then(|b| {
        if b.bytes.is_some() && b.string.is_none() {
            r.warning(
                codes::UNSUPPORTED,
                format!("{at}.body.bytes"),
                "is not supported (use body.string); the response has no body",
            );
        }
        b.string.clone()
    });
    Some(DirectResponse { status, body })
}

fn rewrite(rw: &objects::HttpRewrite, at: &str, r: &mut Report<'_>) -> Option<Rewrite> {
    let uri_regex = rw.uri_regex_rewrite.as_ref().and_then(|x| match regex_error(&x.regex) {
        None => Some(RegexRewrite { regex: x.regex.clone(), rewrite: x.rewrite.clone() }),
        Some(e) => {
            r.error(
                codes::INVALID_REGEX,
                format!("{at}.uriRegexRewrite.match"),
                format!("{e}; the path is not rewritten"),
            );
            None
        }
    });
    let out = Rewrite { uri: rw.uri.clone(), full_path: None, uri_regex, authority: rw.authority.clone() };
    (out != Rewrite::default()).then_some(out)
}

/// A route's retries: Istio's default policy when the route has none, none at all when
/// `attempts` is 0 or unset (how Istio reads an explicit `retries`), otherwise the default
/// with the route's fields over it.
fn retries(rt: Option<&objects::HttpRetry>, at: &str, r: &mut Report<'_>) -> Option<Retries> {
    let Some(rt) = rt else { return Some(default_retries()) };
    let attempts = match rt.attempts.unwrap_or(0) {
        ..=0 => return None,
        n => u32::try_from(n).unwrap_or_else(|_| {
            r.error(codes::INVALID_VALUE, format!("{at}.attempts"), format!("{n} is too large; 2 are used"));
            2
        }),
    };
    let mut retry_on: Vec<String> = rt
        .retry_on
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let field = format!("{at}.retryOn");
    retry_on.retain(|condition| known_retry_condition(condition, &field, r));
    if retry_on.is_empty() {
        retry_on = Retries::istio_default().retry_on;
    } else if retry_on.iter().any(|c| c.parse::<u16>().is_ok())
        && !retry_on.iter().any(|c| c == "retriable-status-codes")
    {
        // Bare codes mean "retry on these statuses" (Istio adds the condition itself).
        retry_on.push("retriable-status-codes".into());
    }
    let per_try_timeout_ms = optional_duration(
        rt.per_try_timeout.as_deref(),
        &format!("{at}.perTryTimeout"),
        "tries have no timeout of their own",
        r,
    );
    Some(Retries { attempts, per_try_timeout_ms, retry_on })
}

/// Envoy's conditions that the waypoint does not evaluate.
const UNEVALUATED_RETRY_CONDITIONS: [&str; 4] =
    ["reset-before-request", "envoy-ratelimited", "retriable-headers", "http3-post-connect-failure"];

/// Whether the waypoint can evaluate `condition` (or a status code); reported when not, as a
/// typo would otherwise silently retry nothing.
fn known_retry_condition(condition: &str, at: &str, r: &mut Report<'_>) -> bool {
    if l7::RETRY_CONDITIONS.contains(&condition) {
        return true;
    }
    if let Ok(code) = condition.parse::<u16>() {
        if (100..=599).contains(&code) {
            return true;
        }
        r.error(codes::INVALID_VALUE, at, format!("{condition:?} is not an HTTP status code; dropped"));
    } else if UNEVALUATED_RETRY_CONDITIONS.contains(&condition) {
        r.warning(codes::UNSUPPORTED, at, format!("{condition:?} is not evaluated by waypoints; ignored"));
    } else {
        r.error(
            codes::INVALID_VALUE,
            at,
            format!(
                "{condition:?} is not a retry condition (known: {}, or a status code); dropped",
                l7::RETRY_CONDITIONS.join(", ")
            ),
        );
    }
    false
}

fn fault(f: &objects::HttpFault, at: &str, r: &mut Report<'_>) -> Option<Fault> {
    let delay = f.delay.as_ref().and_then(|d| {
        let here = format!("{at}.delay");
        let Some(text) = &d.fixed_delay else {
            r.error(codes::INVALID_VALUE, format!("{here}.fixedDelay"), "is missing; the delay is dropped");
            return None;
        };
        let fixed_delay_ms = duration_ms(text)
            .map_err(|e| {
                r.error(
                    codes::INVALID_VALUE,
                    format!("{here}.fixedDelay"),
                    format!("{e}; the delay is dropped"),
                )
            })
            .ok()?;
        let value = d.percentage.as_ref().and_then(|p| p.value).or(d.percent.map(|p| p as f64));
        let percentage = percentage(value, &format!("{here}.percentage.value"), r, "the delay is")?;
        Some(FaultDelay { fixed_delay_ms, percentage })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let here = format!("{at}.abort");
        // As Envoy: an HTTP status wins; a gRPC status alone aborts with HTTP 200.
        let (http_status, grpc_status) = match (a.http_status, &a.grpc_status) {
            (Some(s @ 200..=599), _) => (s as u16, None),
            (None, Some(name)) => match l7::GRPC_STATUS_NAMES.iter().position(|n| n == name) {
                Some(code) => (200, Some(code as u8)),
                None => {
                    r.error(
                        codes::INVALID_VALUE,
                        format!("{here}.grpcStatus"),
                        format!(
                            "{name:?} is not a gRPC status (one of {}); the abort is dropped",
                            l7::GRPC_STATUS_NAMES.join(", ")
                        ),
                    );
                    return None;
                }
            },
            (status, _) => {
                let shown = status.map_or("missing".to_string(), |s| s.to_string());
                r.error(
                    codes::INVALID_VALUE,
                    format!("{here}.httpStatus"),
                    format!("{shown}: a status from 200 to 599 is needed; the abort is dropped"),
                );
                return None;
            }
        };
        let value = a.percentage.as_ref().and_then(|p| p.value);
        let percentage = percentage(value, &format!("{here}.percentage.value"), r, "the abort is")?;
        Some(FaultAbort { http_status, grpc_status, percentage })
    });
    (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
}

fn mirrors(route: &objects::HttpRoute, at: &str, namespace: &str, r: &mut Report<'_>) -> Vec<Mirror> {
    let mut out = Vec::new();
    if route.mirror.is_some() && !route.mirrors.is_empty() {
        r.warning(
            codes::INVALID_VALUE,
            format!("{at}.mirrors"),
            "`mirror` and `mirrors` are both set (Istio refuses this); all are used",
        );
    }
    if let Some(m) = &route.mirror {
        let value =
            route.mirror_percentage.as_ref().and_then(|p| p.value).or(route.mirror_percent.map(|p| p as f64));
        let destination = destination(m, &format!("{at}.mirror"), namespace, r);
        let percentage = percentage(value, &format!("{at}.mirrorPercentage.value"), r, "the mirror is");
        if let (Some(destination), Some(percentage)) = (destination, percentage) {
            out.push(Mirror { destination, percentage });
        }
    }
    for (k, m) in route.mirrors.iter().enumerate() {
        let here = format!("{at}.mirrors[{k}]");
        let destination = destination(&m.destination, &format!("{here}.destination"), namespace, r);
        let value = m.percentage.as_ref().and_then(|p| p.value);
        let percentage = percentage(value, &format!("{here}.percentage.value"), r, "the mirror is");
        if let (Some(destination), Some(percentage)) = (destination, percentage) {
            out.push(Mirror { destination, percentage });
        }
    }
    out
}

fn headers(h: Option<&HeadersSpec>) -> Headers {
    let ops = |o: Option<&objects::HeaderOperations>| {
        o.map(|o| header_operations(&o.set, &o.add, &o.remove)).unwrap_or_default()
    };
    Headers {
        request: ops(h.and_then(|h| h.request.as_ref())),
        response: ops(h.and_then(|h| h.response.as_ref())),
    }
}
