//! L4 policy as ztunnel enforces it: AuthorizationPolicy (its L4 part, as the controller
//! translates it) and PeerAuthentication, with Istio's semantics:
//!
//! - scope: mesh-wide (the root namespace, no selector), a namespace, or the workloads a
//!   selector picks in a namespace;
//! - any matching DENY denies; otherwise, when ALLOW policies apply, one must match;
//!   with none, the connection is allowed;
//! - within a rule, `from` and `to` must both match (an empty list matches anything); each
//!   source's fields are ANDed, each field's values ORed, `not*` values must all miss;
//! - PeerAuthentication: a workload-selector policy beats the namespace's, which beats the
//!   mesh-wide one; port-level modes beat the policy's own; UNSET inherits; PERMISSIVE when
//!   nothing says otherwise.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{identity::SpiffeId, model::Workload};

/// Istio's default root namespace: policies there apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

/// One AuthorizationPolicy, L4 part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    /// Workload labels the policy applies to; none: the whole namespace (or the mesh, in the
    /// root namespace).
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<Source>,
    #[serde(default)]
    pub to: Vec<Destination>,
    /// Conditions that must all hold as well (the L4 keys of Istio's `when`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// The `when` keys ztunnel can evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionKey {
    #[serde(rename = "source.ip")]
    SourceIp,
    #[serde(rename = "source.namespace")]
    SourceNamespace,
    #[serde(rename = "source.principal")]
    SourcePrincipal,
    #[serde(rename = "destination.port")]
    DestinationPort,
}

impl ConditionKey {
    /// The Istio key, or none for keys only a waypoint can evaluate.
    pub fn parse(key: &str) -> Option<Self> {
        Some(match key {
            "source.ip" => Self::SourceIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "destination.port" => Self::DestinationPort,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: ConditionKey,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// Istio principals: `<trust-domain>/ns/<ns>/sa/<sa>`, `*` prefix or suffix wildcards.
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// CIDRs or single IPs.
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub not_ports: Vec<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub mode: MtlsMode,
    #[serde(default)]
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// What is known about a connection when policy decides.
#[derive(Clone, Debug)]
pub struct ConnectionFacts<'a> {
    /// The client's verified identity; none for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: &'a Workload,
    pub destination_port: u16,
    /// The source is a waypoint that serves the destination (its Service's, or its own
    /// workload waypoint): it carries requests it has authorized on its clients' behalf.
    pub from_its_waypoint: bool,
}

/// Why a connection was denied, for the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied by this DENY policy (`namespace/name`).
    DeniedBy(String),
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        *self == Verdict::Allow
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Allow => write!(f, "allowed"),
            Verdict::DeniedBy(p) => write!(f, "denied by DENY policy {p}"),
            Verdict::NoAllowMatched => write!(f, "denied: no ALLOW policy matched"),
        }
    }
}

/// Every policy of the mesh, ready to evaluate.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub root_namespace: String,
    pub authorizations: Vec<Authorization>,
    pub peer_authentications: Vec<PeerAuthentication>,
}

fn selects(selector: &Option<BTreeMap<String, String>>, workload: &Workload) -> bool {
    selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| workload.labels.get(k) == Some(v)))
}

impl Policies {
    fn root(&self) -> &str {
        if self.root_namespace.is_empty() { DEFAULT_ROOT_NAMESPACE } else { &self.root_namespace }
    }

    /// Whether an AuthorizationPolicy applies to `workload`.
    fn applies(&self, policy: &Authorization, workload: &Workload) -> bool {
        let mesh_wide = policy.namespace == self.root() && policy.selector.is_none();
        mesh_wide || (policy.namespace == workload.namespace && selects(&policy.selector, workload))
    }

    pub fn authorize(&self, facts: &ConnectionFacts<'_>) -> Verdict {
        let applicable: Vec<&Authorization> =
            self.authorizations.iter().filter(|p| self.applies(p, facts.destination)).collect();
        if let Some(deny) =
            applicable.iter().find(|p| p.action == Action::Deny && p.rules.iter().any(|r| r.matches(facts)))
        {
            return Verdict::DeniedBy(format!("{}/{}", deny.namespace, deny.name));
        }
        let allows: Vec<&&Authorization> = applicable.iter().filter(|p| p.action == Action::Allow).collect();
        // A destination's own waypoint is allowed by ALLOW policies that do not name it, as
        // Istio's implicit allow-from-waypoint policy does: behind a waypoint, the clients'
        // identities reach the destination only at L7, where the waypoint enforced its policy.
        // DENY policies (above) still apply to it.
        if allows.is_empty()
            || facts.from_its_waypoint
            || allows.iter().any(|p| p.rules.iter().any(|r| r.matches(facts)))
        {
            Verdict::Allow
        } else {
            Verdict::NoAllowMatched
        }
    }

    /// The effective mTLS mode for plaintext arriving at `workload`:`port`.
    pub fn mtls_mode(&self, workload: &Workload, port: u16) -> MtlsMode {
        let pick = |p: &PeerAuthentication| match p.port_level.get(&port) {
            Some(m) if *m != MtlsMode::Unset => *m,
            _ => p.mode,
        };
        let all = &self.peer_authentications;
        let workload_level = all
            .iter()
            .find(|p| {
                p.namespace == workload.namespace && p.selector.is_some() && selects(&p.selector, workload)
            })
            .map(pick);
        let namespace_level =
            all.iter().find(|p| p.namespace == workload.namespace && p.selector.is_none()).map(|p| p.mode);
        let mesh_level =
            all.iter().find(|p| p.namespace == self.root() && p.selector.is_none()).map(|p| p.mode);
        [workload_level, namespace_level, mesh_level]
            .into_iter()
            .flatten()
            .find(|m| *m != MtlsMode::Unset)
            .unwrap_or(MtlsMode::Permissive)
    }
}

impl Rule {
    fn matches(&self, facts: &ConnectionFacts<'_>) -> bool {
        let from = self.from.is_empty() || self.from.iter().any(|s| s.matches(facts));
        let to = self.to.is_empty() || self.to.iter().any(|d| d.matches(facts.destination_port));
        from && to && self.when.iter().all(|c| c.matches(facts))
    }
}

impl Condition {
    fn matches(&self, facts: &ConnectionFacts<'_>) -> bool {
        let test = |value: &str| -> bool {
            match self.key {
                ConditionKey::SourceIp => cidr_contains(value, facts.source_ip),
                ConditionKey::SourceNamespace => {
                    facts.source_identity.is_some_and(|id| wildcard(value, &id.namespace))
                }
                ConditionKey::SourcePrincipal => facts
                    .source_identity
                    .is_some_and(|id| wildcard(value, id.to_string().trim_start_matches("spiffe://"))),
                ConditionKey::DestinationPort => value.parse() == Ok(facts.destination_port),
            }
        };
        (self.values.is_empty() || self.values.iter().any(|v| test(v)))
            && !self.not_values.iter().any(|v| test(v))
    }
}

impl Source {
    fn matches(&self, facts: &ConnectionFacts<'_>) -> bool {
        self.matches_peer(facts.source_identity, facts.source_ip)
    }

    /// Whether a peer with this identity (none: plaintext) and address is one of the sources.
    /// Waypoints use it for L7 policies too.
    pub fn matches_peer(&self, identity: Option<&SpiffeId>, source_ip: IpAddr) -> bool {
        // Istio's principal form drops the scheme: cluster.local/ns/x/sa/y.
        let principal = identity.map(|id| id.to_string().trim_start_matches("spiffe://").to_string());
        let namespace = identity.map(|id| id.namespace.as_str());
        let any_of = |values: &[String], actual: Option<&str>| {
            actual.is_some_and(|a| values.iter().any(|v| wildcard(v, a)))
        };
        let field = |values: &[String], not: &[String], actual: Option<&str>| {
            (values.is_empty() || any_of(values, actual)) && (not.is_empty() || !any_of(not, actual))
        };
        let ip_in = |blocks: &[String]| blocks.iter().any(|b| cidr_contains(b, source_ip));
        field(&self.principals, &self.not_principals, principal.as_deref())
            && field(&self.namespaces, &self.not_namespaces, namespace)
            && (self.ip_blocks.is_empty() || ip_in(&self.ip_blocks))
            && (self.not_ip_blocks.is_empty() || !ip_in(&self.not_ip_blocks))
    }
}

impl Destination {
    fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

/// Istio's string match: exact, `*` alone, `prefix*` or `*suffix`.
pub fn wildcard(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

/// `10.0.0.0/8`, `fd00::/64` or a single address. A malformed block matches nothing (the
/// controller reports it).
pub fn cidr_contains(block: &str, ip: IpAddr) -> bool {
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (block, None),
    };
    let Ok(net) = addr.trim().parse::<IpAddr>() else {
        return false;
    };
    let ip = ip.to_canonical();
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: "w".into(),
            name: "w".into(),
            namespace: ns.into(),
            service_account: "default".into(),
            node: "n".into(),
            ips: vec!["10.0.0.9".parse().unwrap()],
            enrolled: true,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            waypoint: None,
        }
    }

    fn policy(ns: &str, action: Action, rules: Vec<Rule>) -> Authorization {
        Authorization {
            name: format!("{action:?}").to_lowercase(),
            namespace: ns.into(),
            selector: None,
            action,
            rules,
        }
    }

    fn from_principal(p: &str) -> Rule {
        Rule { from: vec![Source { principals: vec![p.into()], ..Default::default() }], ..Default::default() }
    }

    fn decide(policies: &Policies, src: Option<&str>, ip: &str, port: u16, dst: &Workload) -> Verdict {
        let id: Option<SpiffeId> = src.map(|s| s.parse().unwrap());
        policies.authorize(&ConnectionFacts {
            source_identity: id.as_ref(),
            source_ip: ip.parse().unwrap(),
            destination: dst,
            destination_port: port,
            from_its_waypoint: false,
        })
    }

    #[test]
    fn a_destinations_own_waypoint_passes_allow_policies_but_not_deny_ones() {
        let dst = workload("shop", &[("app", "payment")]);
        let waypoint_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/waypoint".parse().unwrap();
        let facts = |from_its_waypoint| ConnectionFacts {
            source_identity: Some(&waypoint_id),
            source_ip: "10.0.0.3".parse().unwrap(),
            destination: &dst,
            destination_port: 8080,
            from_its_waypoint,
        };
        let allow_checkout =
            policy("shop", Action::Allow, vec![from_principal("cluster.local/ns/shop/sa/checkout")]);
        let policies = Policies { authorizations: vec![allow_checkout.clone()], ..Default::default() };
        assert_eq!(policies.authorize(&facts(false)), Verdict::NoAllowMatched, "a waypoint not its");
        assert_eq!(policies.authorize(&facts(true)), Verdict::Allow);
        let deny_waypoint =
            policy("shop", Action::Deny, vec![from_principal("cluster.local/ns/shop/sa/waypoint")]);
        let policies = Policies { authorizations: vec![allow_checkout, deny_waypoint], ..Default::default() };
        assert_eq!(policies.authorize(&facts(true)), Verdict::DeniedBy("shop/deny".into()));
    }

    const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

    #[test]
    fn table_of_istio_semantics() {
        let dst = workload("shop", &[("app", "payment")]);
        let allow_checkout =
            policy("shop", Action::Allow, vec![from_principal("cluster.local/ns/shop/sa/checkout")]);
        let deny_checkout =
            policy("shop", Action::Deny, vec![from_principal("cluster.local/ns/shop/sa/checkout")]);
        let deny_port = policy(
            "shop",
            Action::Deny,
            vec![Rule {
                to: vec![Destination { ports: vec![9090], not_ports: vec![] }],
                ..Default::default()
            }],
        );
        let allow_nothing = policy("shop", Action::Allow, vec![]);
        let mesh_deny = policy(DEFAULT_ROOT_NAMESPACE, Action::Deny, vec![from_principal("*/sa/other")]);
        let other_ns = policy("elsewhere", Action::Allow, vec![]);
        let allow_block = policy(
            "shop",
            Action::Allow,
            vec![Rule {
                from: vec![Source {
                    ip_blocks: vec!["10.1.0.0/16".into()],
                    not_ip_blocks: vec!["10.1.2.3".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        let allow_ns = policy(
            "shop",
            Action::Allow,
            vec![Rule {
                from: vec![Source {
                    namespaces: vec!["shop".into()],
                    not_principals: vec!["*/sa/other".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );

        type Case<'a> = (&'a str, Vec<Authorization>, Option<&'a str>, &'a str, u16, bool);
        let cases: Vec<Case> = vec![
            ("no policy allows", vec![], Some(OTHER), "10.1.1.1", 80, true),
            ("plaintext with no policy", vec![], None, "10.1.1.1", 80, true),
            (
                "ALLOW admits its principal",
                vec![allow_checkout.clone()],
                Some(CHECKOUT),
                "10.1.1.1",
                80,
                true,
            ),
            ("ALLOW refuses others", vec![allow_checkout.clone()], Some(OTHER), "10.1.1.1", 80, false),
            ("ALLOW refuses plaintext", vec![allow_checkout.clone()], None, "10.1.1.1", 80, false),
            (
                "DENY beats ALLOW",
                vec![allow_checkout.clone(), deny_checkout.clone()],
                Some(CHECKOUT),
                "10.1.1.1",
                80,
                false,
            ),
            ("DENY on a port", vec![deny_port.clone()], Some(CHECKOUT), "10.1.1.1", 9090, false),
            ("DENY on another port does not apply", vec![deny_port], Some(CHECKOUT), "10.1.1.1", 80, true),
            (
                "ALLOW with no rules denies everything",
                vec![allow_nothing],
                Some(CHECKOUT),
                "10.1.1.1",
                80,
                false,
            ),
            (
                "mesh-wide DENY applies in every namespace",
                vec![mesh_deny.clone()],
                Some(OTHER),
                "10.1.1.1",
                80,
                false,
            ),
            ("mesh-wide DENY misses others", vec![mesh_deny], Some(CHECKOUT), "10.1.1.1", 80, true),
            ("another namespace's ALLOW does not apply", vec![other_ns], Some(OTHER), "10.1.1.1", 80, true),
            ("ipBlocks admit", vec![allow_block.clone()], None, "10.1.9.9", 80, true),
            ("notIpBlocks exclude", vec![allow_block.clone()], None, "10.1.2.3", 80, false),
            ("ipBlocks miss", vec![allow_block], None, "10.2.0.1", 80, false),
            ("namespace AND notPrincipals", vec![allow_ns.clone()], Some(CHECKOUT), "10.1.1.1", 80, true),
            ("notPrincipals excludes", vec![allow_ns.clone()], Some(OTHER), "10.1.1.1", 80, false),
            ("namespace needs an identity", vec![allow_ns], None, "10.1.1.1", 80, false),
        ];
        for (what, authorizations, src, ip, port, allowed) in cases {
            let p = Policies { root_namespace: String::new(), authorizations, peer_authentications: vec![] };
            assert_eq!(decide(&p, src, ip, port, &dst).allowed(), allowed, "{what}");
        }
    }

    #[test]
    fn when_conditions_all_hold_besides_from_and_to() {
        let dst = workload("shop", &[]);
        let rule = Rule {
            from: vec![Source {
                principals: vec!["cluster.local/ns/shop/sa/checkout".into()],
                ..Default::default()
            }],
            to: vec![],
            when: vec![
                Condition {
                    key: ConditionKey::SourceIp,
                    values: vec!["10.1.0.0/16".into()],
                    not_values: vec![],
                },
                Condition {
                    key: ConditionKey::DestinationPort,
                    values: vec![],
                    not_values: vec!["9090".into()],
                },
            ],
        };
        let p = Policies {
            authorizations: vec![policy("shop", Action::Allow, vec![rule])],
            ..Default::default()
        };
        assert!(decide(&p, Some(CHECKOUT), "10.1.2.3", 80, &dst).allowed());
        assert!(!decide(&p, Some(CHECKOUT), "10.2.0.1", 80, &dst).allowed(), "source.ip must also hold");
        assert!(!decide(&p, Some(CHECKOUT), "10.1.2.3", 9090, &dst).allowed(), "notValues excludes");
        assert!(!decide(&p, Some(OTHER), "10.1.2.3", 80, &dst).allowed(), "from must also hold");
        assert_eq!(ConditionKey::parse("request.headers[x]"), None);
    }

    #[test]
    fn selector_scope_picks_workloads_by_label() {
        let mut p = policy("shop", Action::Deny, vec![Rule::default()]);
        p.selector = Some([("app".to_string(), "payment".to_string())].into());
        let policies = Policies { authorizations: vec![p], ..Default::default() };
        assert!(
            !decide(&policies, Some(CHECKOUT), "10.0.0.1", 80, &workload("shop", &[("app", "payment")]))
                .allowed()
        );
        assert!(
            decide(&policies, Some(CHECKOUT), "10.0.0.1", 80, &workload("shop", &[("app", "cart")]))
                .allowed()
        );
    }

    #[test]
    fn peer_authentication_precedence() {
        let pa = |ns: &str, selector: Option<&str>, mode, ports: &[(u16, MtlsMode)]| PeerAuthentication {
            name: "pa".into(),
            namespace: ns.into(),
            selector: selector.map(|app| [("app".to_string(), app.to_string())].into()),
            mode,
            port_level: ports.iter().copied().collect(),
        };
        let w = workload("shop", &[("app", "payment")]);
        let with =
            |pas: Vec<PeerAuthentication>| Policies { peer_authentications: pas, ..Default::default() };
        assert_eq!(with(vec![]).mtls_mode(&w, 80), MtlsMode::Permissive);
        assert_eq!(
            with(vec![pa(DEFAULT_ROOT_NAMESPACE, None, MtlsMode::Strict, &[])]).mtls_mode(&w, 80),
            MtlsMode::Strict
        );
        let layered = with(vec![
            pa(DEFAULT_ROOT_NAMESPACE, None, MtlsMode::Strict, &[]),
            pa("shop", None, MtlsMode::Permissive, &[]),
            pa("shop", Some("payment"), MtlsMode::Unset, &[(9090, MtlsMode::Disable)]),
        ]);
        assert_eq!(layered.mtls_mode(&w, 9090), MtlsMode::Disable, "port level wins");
        assert_eq!(layered.mtls_mode(&w, 80), MtlsMode::Permissive, "UNSET inherits the namespace's");
        assert_eq!(layered.mtls_mode(&workload("other", &[]), 80), MtlsMode::Strict, "mesh-wide default");
    }

    #[test]
    fn cidrs() {
        assert!(cidr_contains("10.0.0.0/8", "10.200.1.1".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/8", "11.0.0.1".parse().unwrap()));
        assert!(cidr_contains("fd00::/16", "fd00:1::5".parse().unwrap()));
        assert!(cidr_contains("10.1.2.3", "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!cidr_contains("garbage", "10.1.2.3".parse().unwrap()));
    }
}
