//! Kubernetes objects to the config model: pure functions over a [`Snapshot`], so every rule
//! is unit-tested from YAML fixtures without a cluster. One translation serves the local
//! (manifest directory) and the Kubernetes sources.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service as K8sService},
    apimachinery::pkg::util::intstr::IntOrString,
};
use warren_core::{
    model::{NodeConfig, Service, ServicePort, Workload},
    policy::{
        Action, Authorization, Condition, ConditionKey, Destination, MtlsMode, PeerAuthentication, Rule,
        Source,
    },
};

use crate::{
    findings::{Finding, codes, error, warning},
    objects::{
        AuthorizationPolicy, AuthorizationRule, PeerAuthentication as K8sPeerAuthentication, Snapshot,
        object_name,
    },
    waypoint_binding::{Traffic, Waypoints},
};

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// The whole mesh's config, and what was wrong on the way.
pub fn translate(snapshot: &Snapshot) -> (NodeConfig, Vec<Finding>) {
    let mut findings = Vec::new();
    let namespaces: BTreeMap<&str, &Namespace> =
        snapshot.namespaces.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, &**n))).collect();
    let waypoints = Waypoints::new(&snapshot.gateways, &namespaces);
    let workloads: Vec<Workload> =
        snapshot.pods.iter().map(|p| workload(p, &namespaces, &waypoints, &mut findings)).collect();
    let members = PodIndex::new(&snapshot.pods, &workloads);
    let services: Vec<Service> =
        snapshot.services.iter().filter_map(|s| service(s, &members, &waypoints, &mut findings)).collect();
    let peer_authentications = snapshot
        .peer_authentications
        .iter()
        .map(|p| peer_authentication(p, &mut findings))
        .collect::<Vec<_>>();
    let authorizations =
        snapshot.authorization_policies.iter().filter_map(|p| authorization(p, &mut findings)).collect();
    strict_with_unenrolled(&peer_authentications, &workloads, &mut findings);
    let routing = crate::translate_l7::routing(snapshot, &services, &mut findings);
    let config = NodeConfig {
        workloads,
        services,
        authorizations,
        peer_authentications,
        root_namespace: String::new(),
        routing,
    };
    (config, findings)
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// `istio.io/dataplane-mode`: the pod's label wins over its namespace's; `none` opts out.
fn enrolled(pod: &Pod, namespace: Option<&&Namespace>) -> bool {
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return false;
    }
    let pod_mode = pod.metadata.labels.as_ref().and_then(|l| l.get(DATAPLANE_MODE));
    let ns_mode = namespace.and_then(|n| n.metadata.labels.as_ref()?.get(DATAPLANE_MODE));
    pod_mode.or(ns_mode).is_some_and(|m| m == "ambient")
}

fn ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else { return true };
    if matches!(status.phase.as_deref(), Some("Failed" | "Succeeded")) {
        return false;
    }
    let ready = status.conditions.as_ref().and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    ready.is_none_or(|c| c.status == "True")
}

fn workload(
    pod: &Pod,
    namespaces: &BTreeMap<&str, &Namespace>,
    waypoints: &Waypoints,
    findings: &mut Vec<Finding>,
) -> Workload {
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = meta.name.clone().unwrap_or_default();
    let waypoint =
        waypoints.bind(meta, &namespace, &format!("Pod {namespace}/{name}"), Traffic::Workload, findings);
    let status = pod.status.as_ref();
    let mut ips: Vec<std::net::IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|i| i.parse().ok())
    {
        ips.push(ip);
    }
    let spec = pod.spec.as_ref();
    Workload {
        uid: meta.uid.clone().unwrap_or_else(|| format!("{namespace}/{name}")),
        enrolled: enrolled(pod, namespaces.get(namespace.as_str())),
        name,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ips,
        labels: labels_of(meta),
        namespace,
        waypoint,
    }
}

/// Pods by namespace and label: a service's selector is answered from the pods carrying one
/// of its labels, not by scanning every pod (2,000 services × 10,000 pods would take seconds).
struct PodIndex<'a> {
    pods: &'a [std::sync::Arc<Pod>],
    workloads: &'a [Workload],
    /// (namespace, label key, label value) → indices into `pods`, ascending.
    by_label: std::collections::HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
}

impl<'a> PodIndex<'a> {
    fn new(pods: &'a [std::sync::Arc<Pod>], workloads: &'a [Workload]) -> Self {
        let mut by_label: std::collections::HashMap<_, Vec<usize>> = std::collections::HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            for (k, v) in &w.labels {
                by_label.entry((w.namespace.as_str(), k.as_str(), v.as_str())).or_default().push(i);
            }
        }
        PodIndex { pods, workloads, by_label }
    }

    /// Ready pods with an address in `namespace` whose labels match `selector` (non-empty).
    fn selected(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<(&'a Pod, &'a Workload)> {
        // The rarest of the selector's labels gives the fewest candidates to check.
        let candidates = selector
            .iter()
            .map(|(k, v)| {
                self.by_label.get(&(namespace, k.as_str(), v.as_str())).map_or(&[][..], Vec::as_slice)
            })
            .min_by_key(|c| c.len())
            .unwrap_or(&[]);
        candidates
            .iter()
            .map(|&i| (&*self.pods[i], &self.workloads[i]))
            .filter(|(p, w)| {
                !w.ips.is_empty() && ready(p) && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            })
            .collect()
    }
}

fn service(
    svc: &K8sService,
    index: &PodIndex,
    waypoints: &Waypoints,
    findings: &mut Vec<Finding>,
) -> Option<Service> {
    let spec = svc.spec.as_ref()?;
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let object = format!("Service {}", object_name(&svc.metadata));
    let mut vips: Vec<std::net::IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    vips.dedup();
    let selector = spec.selector.clone().unwrap_or_default();
    // Endpoints: ready pods with an address whose labels match the selector.
    let members: Vec<(&Pod, &Workload)> =
        if selector.is_empty() { vec![] } else { index.selected(&namespace, &selector) };
    if !selector.is_empty() && members.is_empty() {
        findings.push(warning(
            codes::NO_ENDPOINTS,
            object.clone(),
            Some("spec.selector".into()),
            "selects no ready pod: connections to it will fail",
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let Ok(port) = u16::try_from(p.port) else { continue };
        let target = match &p.target_port {
            None => Some(port),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => named_port(name, members.iter().map(|(p, _)| *p)),
        };
        match target {
            Some(target_port) => ports.push(ServicePort { port, target_port }),
            None => findings.push(error(
                codes::INVALID_VALUE,
                object.clone(),
                Some(format!("spec.ports[{i}].targetPort")),
                "names no container port of the selected pods; the port is left out",
            )),
        }
    }
    let waypoint = waypoints.bind(&svc.metadata, &namespace, &object, Traffic::Service, findings);
    let waypoint_namespace =
        waypoint.as_ref().filter(|w| w.namespace != namespace).map(|w| w.namespace.clone());
    let mut endpoints: Vec<String> = members.iter().map(|(_, w)| w.uid.clone()).collect();
    endpoints.sort();
    Some(Service {
        name: svc.metadata.name.clone().unwrap_or_default(),
        namespace,
        vips,
        ports,
        endpoints,
        waypoint_namespace,
        waypoint: waypoint.map(|w| w.name),
    })
}

fn named_port<'a>(name: &str, pods: impl Iterator<Item = &'a Pod>) -> Option<u16> {
    pods.flat_map(|p| p.spec.iter().flat_map(|s| s.containers.iter()))
        .flat_map(|c| c.ports.iter().flatten())
        .find(|cp| cp.name.as_deref() == Some(name))
        .and_then(|cp| u16::try_from(cp.container_port).ok())
}

fn mode(value: Option<&str>, object: &str, field: &str, findings: &mut Vec<Finding>) -> MtlsMode {
    match value.map(str::to_ascii_uppercase).as_deref() {
        None | Some("UNSET") => MtlsMode::Unset,
        Some("DISABLE") => MtlsMode::Disable,
        Some("PERMISSIVE") => MtlsMode::Permissive,
        Some("STRICT") => MtlsMode::Strict,
        Some(other) => {
            findings.push(error(
                codes::INVALID_VALUE,
                object.into(),
                Some(field.into()),
                format!("unknown mTLS mode {other:?}; treated as UNSET"),
            ));
            MtlsMode::Unset
        }
    }
}

fn peer_authentication(pa: &K8sPeerAuthentication, findings: &mut Vec<Finding>) -> PeerAuthentication {
    let object = format!("PeerAuthentication {}", object_name(&pa.metadata));
    let spec = &pa.spec;
    let mut port_level = BTreeMap::new();
    for (port, m) in &spec.port_level_mtls {
        let field = format!("spec.portLevelMtls.{port}");
        match port.parse::<u16>() {
            Ok(p) => {
                port_level.insert(p, mode(m.mode.as_deref(), &object, &field, findings));
            }
            Err(_) => findings.push(error(
                codes::INVALID_VALUE,
                object.clone(),
                Some(field),
                "is not a port number",
            )),
        }
    }
    PeerAuthentication {
        name: pa.metadata.name.clone().unwrap_or_default(),
        namespace: pa.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        selector: spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|l| !l.is_empty()),
        mode: mode(spec.mtls.as_ref().and_then(|m| m.mode.as_deref()), &object, "spec.mtls.mode", findings),
        port_level,
    }
}

/// The L7 fields of a rule, by path (ztunnel cannot evaluate them). Fields Warren does not
/// know (a newer Istio's) are counted with them, so they never widen an ALLOW rule.
fn l7_fields(rule: &AuthorizationRule, index: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (i, f) in rule.from.iter().enumerate() {
        let s = &f.source;
        out.extend(s.other.keys().map(|k| format!("spec.rules[{index}].from[{i}].source.{k}")));
        for (name, v) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ] {
            if !v.is_empty() {
                out.push(format!("spec.rules[{index}].from[{i}].source.{name}"));
            }
        }
    }
    for (i, t) in rule.to.iter().enumerate() {
        let o = &t.operation;
        out.extend(o.other.keys().map(|k| format!("spec.rules[{index}].to[{i}].operation.{k}")));
        for (name, v) in [
            ("hosts", &o.hosts),
            ("notHosts", &o.not_hosts),
            ("methods", &o.methods),
            ("notMethods", &o.not_methods),
            ("paths", &o.paths),
            ("notPaths", &o.not_paths),
        ] {
            if !v.is_empty() {
                out.push(format!("spec.rules[{index}].to[{i}].operation.{name}"));
            }
        }
    }
    for (i, c) in rule.when.iter().enumerate() {
        if ConditionKey::parse(&c.key).is_none() {
            out.push(format!("spec.rules[{index}].when[{i}] ({})", c.key));
        }
    }
    out
}

fn ports(values: &[String], object: &str, field: &str, findings: &mut Vec<Finding>) -> Vec<u16> {
    values
        .iter()
        .filter_map(|p| match p.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                findings.push(error(
                    codes::INVALID_VALUE,
                    object.into(),
                    Some(field.into()),
                    format!("{p:?} is not a port number; ignored"),
                ));
                None
            }
        })
        .collect()
}

/// The L4 part of an AuthorizationPolicy, with Istio's conservative rule for what ztunnel
/// cannot see: an ALLOW rule with L7 fields never matches (dropped); a DENY rule with L7
/// fields matches on its L4 part.
fn authorization(ap: &AuthorizationPolicy, findings: &mut Vec<Finding>) -> Option<Authorization> {
    let object = format!("AuthorizationPolicy {}", object_name(&ap.metadata));
    let spec = &ap.spec;
    if !spec.target_refs.is_empty() || spec.target_ref.is_some() {
        // Attached to a waypoint or a Service: enforced at L7 by the waypoint (translate_l7),
        // not by ztunnel.
        return None;
    }
    let action = match spec.action.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None | Some("ALLOW") => Action::Allow,
        Some("DENY") => Action::Deny,
        Some(other) => {
            findings.push(warning(
                codes::INVALID_VALUE,
                object,
                Some("spec.action".into()),
                format!("action {other} is not enforced by ztunnel; policy ignored"),
            ));
            return None;
        }
    };
    let mut rules = Vec::new();
    for (index, rule) in spec.rules.iter().flatten().enumerate() {
        let l7 = l7_fields(rule, index);
        if !l7.is_empty() {
            let effect = match action {
                Action::Allow => {
                    "ztunnel cannot see these L7 fields, so this ALLOW rule never matches; attach the policy to a waypoint with targetRefs"
                }
                Action::Deny => {
                    "ztunnel cannot see these L7 fields, so this DENY rule applies on its L4 part alone (it denies more); attach the policy to a waypoint with targetRefs"
                }
            };
            findings.push(warning(codes::L7_WITHOUT_WAYPOINT, object.clone(), Some(l7.join(", ")), effect));
            if action == Action::Allow {
                continue;
            }
        }
        let from = rule
            .from
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let s = &f.source;
                let _ = i;
                Source {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: s.ip_blocks.clone(),
                    not_ip_blocks: s.not_ip_blocks.clone(),
                }
            })
            .collect();
        let to = rule
            .to
            .iter()
            .enumerate()
            .map(|(i, t)| Destination {
                ports: ports(
                    &t.operation.ports,
                    &object,
                    &format!("spec.rules[{index}].to[{i}].operation.ports"),
                    findings,
                ),
                not_ports: ports(
                    &t.operation.not_ports,
                    &object,
                    &format!("spec.rules[{index}].to[{i}].operation.notPorts"),
                    findings,
                ),
            })
            .collect();
        // The L4 keys of `when` (source.ip, source.namespace, source.principal,
        // destination.port) are kept exactly; others were handled as L7 above.
        let when = rule
            .when
            .iter()
            .filter_map(|c| {
                Some(Condition {
                    key: ConditionKey::parse(&c.key)?,
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                })
            })
            .collect();
        rules.push(Rule { from, to, when });
    }
    Some(Authorization {
        name: ap.metadata.name.clone().unwrap_or_default(),
        namespace: ap.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        selector: spec.selector.as_ref().map(|s| s.match_labels.clone()).filter(|l| !l.is_empty()),
        action,
        rules,
    })
}

fn strict_with_unenrolled(pas: &[PeerAuthentication], workloads: &[Workload], findings: &mut Vec<Finding>) {
    let strict_namespaces: BTreeSet<&str> = pas
        .iter()
        .filter(|p| p.selector.is_none() && p.mode == MtlsMode::Strict)
        .map(|p| p.namespace.as_str())
        .collect();
    for ns in strict_namespaces {
        // Waypoints are never captured: they speak HBONE (mTLS) themselves.
        let is_waypoint = |w: &Workload| w.labels.contains_key(warren_core::model::WAYPOINT_LABEL);
        let outside: Vec<String> = workloads
            .iter()
            .filter(|w| w.namespace == ns && !w.enrolled && !is_waypoint(w))
            .map(|w| w.name.clone())
            .collect();
        if !outside.is_empty() {
            findings.push(warning(
                codes::STRICT_WITH_UNENROLLED,
                format!("PeerAuthentication in namespace {ns}"),
                Some("spec.mtls.mode".into()),
                format!(
                    "STRICT, but nothing enforces it for these pods, which are not in the mesh: {}",
                    outside.join(", ")
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::read_documents;

    fn load(yaml: &str) -> (NodeConfig, Vec<Finding>) {
        let mut snapshot = Snapshot::default();
        let mut findings = Vec::new();
        read_documents("fixture", yaml, &mut snapshot, &mut findings);
        let (config, more) = translate(&snapshot);
        findings.extend(more);
        (config, findings)
    }

    const MESH: &str = include_str!("../fixtures/production.yaml");

    #[test]
    fn workloads_are_enrolled_by_namespace_label_with_pod_override() {
        let (config, _) = load(MESH);
        let by_name = |n: &str| config.workloads.iter().find(|w| w.name == n).unwrap();
        assert!(by_name("payment-v1").enrolled);
        assert!(!by_name("legacy").enrolled, "the pod label none opts out");
        assert!(!by_name("batch").enrolled, "its namespace is not ambient");
        let p = by_name("payment-v1");
        assert_eq!(p.service_account, "payment");
        assert_eq!(p.node, "node-1");
        assert_eq!(p.ips, vec!["10.244.1.5".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(
            p.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/production/sa/payment"
        );
    }

    #[test]
    fn services_get_vips_ports_and_ready_endpoints() {
        let (config, findings) = load(MESH);
        let payment = config.services.iter().find(|s| s.name == "payment").unwrap();
        assert_eq!(payment.vips, vec!["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(
            payment.ports,
            vec![ServicePort { port: 80, target_port: 8080 }, ServicePort { port: 9090, target_port: 9091 }]
        );
        // payment-v3 is not Ready.
        assert_eq!(
            payment.endpoints,
            vec!["production/payment-v1".to_string(), "production/payment-v2".to_string()]
        );
        assert_eq!(payment.waypoint.as_deref(), Some("production-waypoint"));
        assert!(
            findings.iter().any(|f| f.code == codes::NO_ENDPOINTS && f.object.contains("orphan")),
            "{findings:#?}"
        );
    }

    #[test]
    fn authorization_policies_keep_their_l4_part_conservatively() {
        let (config, findings) = load(MESH);
        let allow = config.authorizations.iter().find(|a| a.name == "payment-allow").unwrap();
        assert_eq!(allow.action, Action::Allow);
        // The rule with methods/paths is dropped; the pure-L4 rule stays.
        assert_eq!(allow.rules.len(), 1);
        assert_eq!(allow.rules[0].from[0].principals, vec!["cluster.local/ns/production/sa/checkout"]);
        assert_eq!(allow.rules[0].to[0].ports, vec![8080]);
        let deny = config.authorizations.iter().find(|a| a.name == "deny-delete").unwrap();
        // DENY with methods: kept on its L4 part (any source, port 8080).
        assert_eq!(deny.rules.len(), 1);
        assert_eq!(deny.rules[0].to[0].ports, vec![8080]);
        assert!(
            config.authorizations.iter().all(|a| a.name != "waypoint-policy"),
            "targetRefs policies are the waypoint's"
        );
        let l7: Vec<_> = findings.iter().filter(|f| f.code == codes::L7_WITHOUT_WAYPOINT).collect();
        assert_eq!(l7.len(), 3, "{l7:#?}");
        assert!(l7[0].field.as_deref().unwrap().contains("operation.methods"));
    }

    #[test]
    fn l4_when_conditions_are_kept_and_l7_ones_drop_the_allow_rule() {
        let (config, findings) = load(MESH);
        let ledger = config.authorizations.iter().find(|a| a.name == "ledger-from-production").unwrap();
        assert_eq!(ledger.rules.len(), 1, "the rule with a header condition is L7 and dropped");
        let when = &ledger.rules[0].when;
        assert_eq!(when.len(), 2);
        assert_eq!(when[0].key, ConditionKey::SourceNamespace);
        assert_eq!(when[1].not_values, vec!["9090"]);
        assert!(
            findings
                .iter()
                .any(|f| f.field.as_deref().is_some_and(|x| x.contains("request.headers[x-debug]")))
        );
    }

    #[test]
    fn unknown_policy_fields_never_widen_an_allow_rule() {
        let (config, findings) = load(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  rules:\n  - from: [{source: {serviceAccounts: [n/checkout]}}]\n  - to: [{operation: {ports: [\"80\"]}}]\n",
        );
        assert_eq!(config.authorizations[0].rules.len(), 1, "only the rule Warren understands stays");
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].field.as_deref(), Some("spec.rules[0].from[0].source.serviceAccounts"));
    }

    #[test]
    fn peer_authentication_modes_and_strict_findings() {
        let (config, findings) = load(MESH);
        let pa = config.peer_authentications.iter().find(|p| p.name == "default").unwrap();
        assert_eq!(pa.mode, MtlsMode::Strict);
        assert_eq!(pa.port_level.get(&9090), Some(&MtlsMode::Permissive));
        assert!(
            findings.iter().any(|f| f.code == codes::STRICT_WITH_UNENROLLED && f.message.contains("legacy"))
        );
    }

    #[test]
    fn a_waypoint_is_not_reported_as_outside_the_mesh_under_strict() {
        let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}\nspec: {nodeName: n1, containers: [{name: w, image: w}]}\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata: {name: legacy, namespace: shop, labels: {istio.io/dataplane-mode: none}}\nspec: {nodeName: n1, containers: [{name: l, image: l}]}\n---\n\
                    apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";
        let (_, findings) = load(yaml);
        let strict: Vec<_> = findings.iter().filter(|f| f.code == codes::STRICT_WITH_UNENROLLED).collect();
        assert_eq!(strict.len(), 1, "{findings:?}");
        assert!(strict[0].message.ends_with(": legacy"), "{}", strict[0].message);
    }

    #[test]
    fn bad_documents_are_reported_and_the_rest_still_translates() {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\nspec:\n  containers: 7\n---\nkind: Pod\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: fine\n---\n: : :\n";
        let (_, findings) = load(yaml);
        let schema: Vec<_> = findings.iter().filter(|f| f.code == codes::SCHEMA).collect();
        assert_eq!(schema.len(), 3, "{schema:#?}");
        assert!(schema[0].object.contains("Pod broken"), "{}", schema[0]);
        assert_eq!(schema[0].field.as_deref(), Some("spec.containers"), "{}", schema[0]);
        assert!(schema[1].message.contains("apiVersion and kind"));
        assert!(schema[2].message.contains("not valid YAML"));
    }
}
