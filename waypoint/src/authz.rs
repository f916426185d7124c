//! L7 AuthorizationPolicy as a waypoint enforces it, with Istio's semantics: a policy applies
//! when its `targetRefs` name this waypoint's Gateway or the request's Service (in the policy's
//! namespace); any matching DENY denies; with ALLOW policies applying, one must match; with
//! none, the request is allowed. A denied request gets 403 `RBAC: access denied`.

use std::net::IpAddr;

use http::HeaderMap;
use warren_core::{
    identity::SpiffeId,
    l7::{L7Authorization, L7Condition, L7Rule, Operation, PolicyTarget},
    model::Service,
    policy::{Action, Verdict, cidr_contains, wildcard},
};

/// What policy can see of a request.
pub struct RequestAttributes<'a> {
    pub source_identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    pub host: &'a str,
    /// The service port the request arrived on.
    pub port: u16,
    pub headers: &'a HeaderMap,
}

/// The waypoint deciding: its Gateway's namespace and name.
pub struct Waypoint<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

fn applies(policy: &L7Authorization, waypoint: &Waypoint<'_>, service: &Service) -> bool {
    policy.targets.iter().any(|t| match t {
        PolicyTarget::Gateway(name) => policy.namespace == waypoint.namespace && name == waypoint.name,
        PolicyTarget::Service(name) => policy.namespace == service.namespace && *name == service.name,
    })
}

pub fn authorize(
    policies: &[L7Authorization],
    waypoint: &Waypoint<'_>,
    service: &Service,
    request: &RequestAttributes<'_>,
) -> Verdict {
    let applying: Vec<&L7Authorization> = policies.iter().filter(|p| applies(p, waypoint, service)).collect();
    let matches = |p: &L7Authorization| p.rules.iter().any(|r| rule_matches(r, request));
    if let Some(deny) = applying.iter().find(|p| p.action == Action::Deny && matches(p)) {
        return Verdict::DeniedBy(format!("{}/{}", deny.namespace, deny.name));
    }
    let allows: Vec<_> = applying.iter().filter(|p| p.action == Action::Allow).collect();
    if allows.is_empty() || allows.iter().any(|p| matches(p)) {
        Verdict::Allow
    } else {
        Verdict::NoAllowMatched
    }
}

fn rule_matches(rule: &L7Rule, r: &RequestAttributes<'_>) -> bool {
    let from =
        rule.from.is_empty() || rule.from.iter().any(|s| s.matches_peer(r.source_identity, r.source_ip));
    let to = rule.to.is_empty() || rule.to.iter().any(|op| operation_matches(op, r));
    from && to && rule.when.iter().all(|c| condition_matches(c, r))
}

/// `values` (any) and `not_values` (none), with Istio's `*` wildcards.
fn field(values: &[String], not: &[String], test: impl Fn(&str) -> bool) -> bool {
    (values.is_empty() || values.iter().any(|v| test(v))) && !not.iter().any(|v| test(v))
}

fn operation_matches(op: &Operation, r: &RequestAttributes<'_>) -> bool {
    let host_without_port = strip_port(r.host);
    field(&op.methods, &op.not_methods, |m| m == "*" || m.eq_ignore_ascii_case(r.method))
        && field(&op.paths, &op.not_paths, |p| wildcard(p, r.path))
        && field(&op.hosts, &op.not_hosts, |h| {
            let h = h.to_ascii_lowercase();
            wildcard(&h, &r.host.to_ascii_lowercase())
                || wildcard(&h, &host_without_port.to_ascii_lowercase())
        })
        && (op.ports.is_empty() || op.ports.contains(&r.port))
        && !op.not_ports.contains(&r.port)
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

fn condition_matches(c: &L7Condition, r: &RequestAttributes<'_>) -> bool {
    let principal = r.source_identity.map(|id| id.to_string().trim_start_matches("spiffe://").to_string());
    let header_values = |name: &str| -> Vec<String> {
        r.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect()
    };
    let actual: Vec<String> = match c.key.as_str() {
        "source.ip" => {
            return field(&c.values, &c.not_values, |block| cidr_contains(block, r.source_ip));
        }
        "source.namespace" => r.source_identity.map(|id| id.namespace.clone()).into_iter().collect(),
        "source.principal" => principal.into_iter().collect(),
        "destination.port" => vec![r.port.to_string()],
        "request.method" => vec![r.method.to_string()],
        "request.path" => vec![r.path.to_string()],
        key => match key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')) {
            Some(name) => header_values(&name.to_ascii_lowercase()),
            // The controller refuses other keys; one that slips through never matches.
            None => return false,
        },
    };
    let any = |pattern: &str| actual.iter().any(|a| wildcard(pattern, a));
    (c.values.is_empty() && !actual.is_empty() || c.values.iter().any(|v| any(v)))
        && !c.not_values.iter().any(|v| any(v))
}

#[cfg(test)]
mod tests {
    use warren_core::policy::Source;

    use super::*;

    fn service() -> Service {
        Service {
            name: "payment".into(),
            namespace: "shop".into(),
            vips: vec![],
            ports: vec![],
            endpoints: vec![],
            waypoint: Some("waypoint".into()),
            waypoint_namespace: None,
        }
    }

    fn policy(action: Action, target: PolicyTarget, rules: Vec<L7Rule>) -> L7Authorization {
        L7Authorization { name: "p".into(), namespace: "shop".into(), targets: vec![target], action, rules }
    }

    fn charge_from_checkout() -> L7Rule {
        L7Rule {
            from: vec![Source {
                principals: vec!["cluster.local/ns/shop/sa/checkout".into()],
                ..Default::default()
            }],
            to: vec![Operation {
                methods: vec!["POST".into()],
                paths: vec!["/api/v1/charge".into()],
                ..Default::default()
            }],
            when: vec![],
        }
    }

    fn decide(
        policies: &[L7Authorization],
        who: &str,
        method: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Verdict {
        let id: SpiffeId = format!("spiffe://cluster.local/ns/shop/sa/{who}").parse().unwrap();
        let request = RequestAttributes {
            source_identity: Some(&id),
            source_ip: "10.1.0.5".parse().unwrap(),
            method,
            path,
            host: "payment.shop:80",
            port: 80,
            headers,
        };
        authorize(policies, &Waypoint { namespace: "shop", name: "waypoint" }, &service(), &request)
    }

    #[test]
    fn allow_admits_only_what_it_names() {
        let h = HeaderMap::new();
        let allow =
            [policy(Action::Allow, PolicyTarget::Gateway("waypoint".into()), vec![charge_from_checkout()])];
        assert!(decide(&allow, "checkout", "POST", "/api/v1/charge", &h).allowed());
        assert_eq!(decide(&allow, "checkout", "GET", "/api/v1/charge", &h), Verdict::NoAllowMatched);
        assert_eq!(decide(&allow, "legacy", "POST", "/api/v1/charge", &h), Verdict::NoAllowMatched);
        assert_eq!(decide(&allow, "checkout", "POST", "/api/v1/refund", &h), Verdict::NoAllowMatched);
        // Attached elsewhere: does not apply, so everything is allowed.
        let elsewhere =
            [policy(Action::Allow, PolicyTarget::Gateway("other".into()), vec![charge_from_checkout()])];
        assert!(decide(&elsewhere, "legacy", "GET", "/", &h).allowed());
    }

    #[test]
    fn deny_beats_allow_and_conditions_read_headers() {
        let h = HeaderMap::new();
        let deny_debug = L7Rule {
            when: vec![L7Condition {
                key: "request.headers[x-debug]".into(),
                values: vec!["*".into()],
                not_values: vec![],
            }],
            ..Default::default()
        };
        let policies = [
            policy(Action::Allow, PolicyTarget::Service("payment".into()), vec![charge_from_checkout()]),
            policy(Action::Deny, PolicyTarget::Service("payment".into()), vec![deny_debug]),
        ];
        assert!(decide(&policies, "checkout", "POST", "/api/v1/charge", &h).allowed());
        let mut debug = HeaderMap::new();
        debug.insert("x-debug", "1".parse().unwrap());
        assert_eq!(
            decide(&policies, "checkout", "POST", "/api/v1/charge", &debug),
            Verdict::DeniedBy("shop/p".into())
        );
    }

    #[test]
    fn paths_and_hosts_take_wildcards() {
        let h = HeaderMap::new();
        let rule = L7Rule {
            to: vec![Operation {
                paths: vec!["/api/*".into()],
                hosts: vec!["payment.shop".into()],
                not_methods: vec!["DELETE".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let allow = [policy(Action::Allow, PolicyTarget::Gateway("waypoint".into()), vec![rule])];
        assert!(decide(&allow, "any", "GET", "/api/x", &h).allowed());
        assert!(!decide(&allow, "any", "DELETE", "/api/x", &h).allowed());
        assert!(!decide(&allow, "any", "GET", "/admin", &h).allowed());
    }
}
