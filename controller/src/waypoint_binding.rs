//! Which waypoint a Service's traffic goes through, as Istio decides it.
//!
//! - The Service's own `istio.io/use-waypoint` label wins, with its own
//!   `istio.io/use-waypoint-namespace` when the waypoint is in another namespace; otherwise its
//!   Namespace's pair of labels. `none` opts out of the namespace's waypoint.
//! - The waypoint's Gateway (class `istio-waypoint` or `warren-waypoint`) decides who may use
//!   it: its `istio.io/waypoint-for` label must admit service traffic (`service`, the default,
//!   or `all`), and its HBONE listener's `allowedRoutes.namespaces` must admit the Service's
//!   namespace (`Same`, the default; `All`; or `Selector` on the namespace's labels). A
//!   binding either refuses is dropped, as in Istio: the Service's traffic goes straight to its
//!   endpoints, and an error finding names the label and the Gateway's field.
//! - A waypoint named but with no Gateway is kept bound (unlike Istio, which drops it until the
//!   Gateway is ready): ztunnel then refuses the Service's connections rather than let them
//!   past the L7 policy the waypoint would enforce, and a warning says so.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Namespace,
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};

use warren_core::model::{WAYPOINT_LABEL, WaypointRef};

use crate::{
    findings::{Finding, codes, error, warning},
    objects::gateway_api::{Gateway, Listener},
};

pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
pub use warren_core::model::WAYPOINT_CLASSES;

/// The waypoint Gateways of a snapshot, and the namespaces' labels, for binding Services.
pub struct Waypoints<'a> {
    gateways: BTreeMap<(&'a str, &'a str), &'a Gateway>,
    namespaces: &'a BTreeMap<&'a str, &'a Namespace>,
}

impl<'a> Waypoints<'a> {
    pub fn new(
        gateways: &'a [std::sync::Arc<Gateway>],
        namespaces: &'a BTreeMap<&'a str, &'a Namespace>,
    ) -> Self {
        let gateways = gateways
            .iter()
            .filter(|g| WAYPOINT_CLASSES.contains(&g.spec.gateway_class_name.as_str()))
            .filter_map(|g| {
                let namespace = g.metadata.namespace.as_deref().unwrap_or("default");
                Some(((namespace, g.metadata.name.as_deref()?), &**g))
            })
            .collect();
        Waypoints { gateways, namespaces }
    }

    /// The waypoint of the object `meta` (in `namespace`) for `traffic` addressed to it, if it
    /// has one it may use. `object` names it in findings.
    pub fn bind(
        &self,
        meta: &ObjectMeta,
        namespace: &str,
        object: &str,
        traffic: Traffic,
        findings: &mut Vec<Finding>,
    ) -> Option<WaypointRef> {
        // A waypoint's own pods never go through a waypoint.
        if traffic == Traffic::Workload && labels(Some(meta)).contains_key(WAYPOINT_LABEL) {
            return None;
        }
        let own = labels(Some(meta));
        let ns_labels = labels(self.namespaces.get(namespace).map(|n| &n.metadata));
        // Which object's labels decide, and the field to name in findings.
        let (chosen, field, inherited) = if own.contains_key(USE_WAYPOINT) {
            (own, "metadata.labels", false)
        } else if ns_labels.contains_key(USE_WAYPOINT) {
            (ns_labels, "the Namespace's metadata.labels", true)
        } else {
            return None;
        };
        let name = chosen.get(USE_WAYPOINT)?;
        if name == "none" {
            return None;
        }
        let binding = WaypointRef {
            namespace: chosen.get(USE_WAYPOINT_NAMESPACE).cloned().unwrap_or_else(|| namespace.to_owned()),
            name: name.clone(),
        };
        // A namespace's waypoint is for its Services unless its Gateway says otherwise: its
        // pods use it only when it takes workload traffic, and nothing is said when it does not.
        let quiet = inherited && traffic == Traffic::Workload;
        let label = format!("{field}[{USE_WAYPOINT}]");
        let waypoint = format!("{}/{}", binding.namespace, binding.name);
        let (refused_to, goes) = match traffic {
            Traffic::Service => {
                ("connections to this Service", "this Service's traffic goes straight to its endpoints")
            }
            Traffic::Workload => {
                ("connections to this pod's IP", "traffic to this pod's IP goes to it directly")
            }
        };
        let Some(gateway) = self.gateways.get(&(binding.namespace.as_str(), binding.name.as_str())) else {
            if quiet {
                return None;
            }
            findings.push(warning(
                codes::WAYPOINT_NOT_FOUND,
                object.to_owned(),
                Some(label),
                format!(
                    "names waypoint {waypoint}, but there is no Gateway {waypoint} of class istio-waypoint: \
                     {refused_to} are refused until that waypoint runs (create the Gateway, or set the label \
                     to none)"
                ),
            ));
            return Some(binding);
        };
        let for_traffic =
            labels(Some(&gateway.metadata)).get(WAYPOINT_FOR).cloned().unwrap_or_else(|| "service".into());
        if !(for_traffic == "all" || for_traffic == traffic.label_value()) {
            if !quiet {
                findings.push(error(
                    codes::WAYPOINT_REFUSED,
                    object.to_owned(),
                    Some(label),
                    format!(
                        "names waypoint {waypoint}, whose Gateway is for {for_traffic:?} traffic ({WAYPOINT_FOR}), \
                         not {:?}: {goes} (label the Gateway {WAYPOINT_FOR}: {} or all)",
                        traffic.label_value(),
                        traffic.label_value()
                    ),
                ));
            }
            return None;
        }
        if let Err(why) = admits(gateway, &binding.namespace, namespace, &ns_labels_of(self, namespace)) {
            findings.push(error(
                codes::WAYPOINT_REFUSED,
                object.to_owned(),
                Some(label),
                format!(
                    "names waypoint {waypoint}, which does not admit namespace {namespace}: {why}; {goes}"
                ),
            ));
            return None;
        }
        Some(binding)
    }
}

/// What kind of traffic a binding is for: to a Service's addresses, or to a pod's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    Service,
    Workload,
}

impl Traffic {
    /// Its `istio.io/waypoint-for` value.
    fn label_value(self) -> &'static str {
        match self {
            Traffic::Service => "service",
            Traffic::Workload => "workload",
        }
    }
}

fn ns_labels_of(waypoints: &Waypoints<'_>, namespace: &str) -> BTreeMap<String, String> {
    labels(waypoints.namespaces.get(namespace).map(|n| &n.metadata))
}

fn labels(meta: Option<&ObjectMeta>) -> BTreeMap<String, String> {
    meta.and_then(|m| m.labels.clone()).unwrap_or_default()
}

/// Whether the Gateway's HBONE listener (port 15008) lets Services of `namespace` use it.
fn admits(
    gateway: &Gateway,
    gateway_namespace: &str,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    let listener: Option<&Listener> =
        gateway.spec.listeners.iter().find(|l| l.protocol == "HBONE" && l.port == 15008);
    // Without an HBONE listener, or without allowedRoutes on it: `Same`.
    let field = listener.map(|l| format!("spec.listeners[{}].allowedRoutes.namespaces", l.name));
    let from = listener.and_then(|l| l.allowed_routes.as_ref()?.namespaces.as_ref());
    match from.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
        "All" => Ok(()),
        "Same" if namespace == gateway_namespace => Ok(()),
        "Same" => Err(match field {
            Some(field) => format!("its {field}.from is Same (the default)"),
            None => "it has no HBONE listener on port 15008, so only its own namespace may use it".into(),
        }),
        "Selector" => {
            let field = field.unwrap_or_default();
            let selector = from.and_then(|n| n.selector.as_ref()).cloned().unwrap_or_default();
            match selects(&selector, namespace_labels) {
                Ok(true) => Ok(()),
                Ok(false) => {
                    Err(format!("its {field}.selector does not match namespace {namespace}'s labels"))
                }
                Err(bad) => Err(format!("its {field}.selector is invalid ({bad}), so it matches nothing")),
            }
        }
        other => Err(format!(
            "its {}.from is {other:?}, which is none of All, Same or Selector",
            field.unwrap_or_default()
        )),
    }
}

/// A Kubernetes label selector against `labels`: every `matchLabels` pair and every
/// `matchExpressions` requirement must hold (an empty selector matches everything).
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    let pairs = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let mut expressions = true;
    for e in selector.match_expressions.iter().flatten() {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        expressions &= match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => return Err(format!("operator {other:?} of key {:?}", e.key)),
        };
    }
    Ok(pairs && expressions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{objects::Snapshot, source::read_documents};

    /// Binds every Service of `yaml`: (namespace/name → its waypoint as ns/name), and the
    /// findings.
    fn bind_all(yaml: &str) -> (BTreeMap<String, Option<String>>, Vec<Finding>) {
        let mut snapshot = Snapshot::default();
        let mut parse_findings = Vec::new();
        read_documents("fixture", yaml, &mut snapshot, &mut parse_findings);
        assert!(parse_findings.is_empty(), "{parse_findings:?}");
        let namespaces: BTreeMap<&str, &Namespace> =
            snapshot.namespaces.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, &**n))).collect();
        let waypoints = Waypoints::new(&snapshot.gateways, &namespaces);
        let mut findings = Vec::new();
        let bound = snapshot
            .services
            .iter()
            .map(|s| {
                let ns = s.metadata.namespace.clone().unwrap_or_else(|| "default".into());
                let name = format!("{ns}/{}", s.metadata.name.as_deref().unwrap_or(""));
                let b = waypoints.bind(
                    &s.metadata,
                    &ns,
                    &format!("Service {name}"),
                    Traffic::Service,
                    &mut findings,
                );
                (name, b.map(|b| format!("{}/{}", b.namespace, b.name)))
            })
            .collect();
        (bound, findings)
    }

    const GATEWAYS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shared, namespace: infra}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    allowedRoutes:
      namespaces:
        from: Selector
        selector:
          matchLabels: {team: payments}
          matchExpressions: [{key: tier, operator: NotIn, values: [sandbox]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: local, namespace: infra}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pods-only, namespace: shop, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: warren-waypoint
";

    fn service(name: &str, namespace: &str, labels: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}\n\
             spec: {{clusterIP: 10.96.0.{}, ports: [{{port: 80}}]}}\n",
            name.len()
        )
    }

    fn namespace(name: &str, labels: &str) -> String {
        format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n")
    }

    #[test]
    fn a_service_uses_a_waypoint_of_another_namespace_that_admits_it() {
        let yaml = [
            GATEWAYS.to_string(),
            namespace("pay", "team: payments"),
            namespace("sandbox", "team: payments, tier: sandbox"),
            namespace("shop", "istio.io/use-waypoint: waypoint"),
            // By the namespace's label pair.
            namespace(
                "ledger",
                "team: payments, istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
            ),
            service("charge", "pay", "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra"),
            service("books", "ledger", ""),
            service("cart", "shop", ""),
            // The Service's own label opts out of its namespace's waypoint.
            service("legacy", "shop", "istio.io/use-waypoint: none"),
        ]
        .concat();
        let (bound, findings) = bind_all(&yaml);
        assert!(findings.is_empty(), "{findings:#?}");
        assert_eq!(bound["pay/charge"].as_deref(), Some("infra/shared"));
        assert_eq!(bound["ledger/books"].as_deref(), Some("infra/shared"));
        assert_eq!(
            bound["shop/cart"].as_deref(),
            Some("shop/waypoint"),
            "warren-waypoint is a waypoint class"
        );
        assert_eq!(bound["shop/legacy"], None);
    }

    #[test]
    fn a_waypoint_that_does_not_admit_the_service_is_not_used_and_the_finding_says_why() {
        let yaml = [
            GATEWAYS.to_string(),
            namespace("sandbox", "team: payments, tier: sandbox"),
            namespace("other", ""),
            service(
                "try",
                "sandbox",
                "istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra",
            ),
            service("same", "other", "istio.io/use-waypoint: local, istio.io/use-waypoint-namespace: infra"),
            service("pods", "shop", "istio.io/use-waypoint: pods-only"),
            // Its own namespace is admitted by the selector alone, as in Istio.
            service("own", "infra", "istio.io/use-waypoint: shared"),
        ]
        .concat();
        let (bound, findings) = bind_all(&yaml);
        assert_eq!(bound["sandbox/try"], None);
        assert_eq!(bound["other/same"], None);
        assert_eq!(bound["shop/pods"], None);
        let about = |object: &str| {
            findings
                .iter()
                .find(|f| f.object == object)
                .unwrap_or_else(|| panic!("no finding for {object}: {findings:#?}"))
        };
        let f = about("Service sandbox/try");
        assert_eq!(
            (f.code, f.field.as_deref()),
            (codes::WAYPOINT_REFUSED, Some("metadata.labels[istio.io/use-waypoint]"))
        );
        assert!(
            f.message.contains(
                "spec.listeners[mesh].allowedRoutes.namespaces.selector does not match namespace sandbox"
            ),
            "{}",
            f.message
        );
        assert!(about("Service other/same").message.contains("from is Same (the default)"));
        assert!(about("Service shop/pods").message.contains("for \"workload\" traffic"));
        assert_eq!(bound["infra/own"], None);
        assert!(about("Service infra/own").message.contains("does not match namespace infra's labels"));
        assert_eq!(findings.len(), 4, "{findings:#?}");
    }

    #[test]
    fn a_waypoint_without_a_gateway_stays_bound_with_a_warning() {
        let yaml = [namespace("shop", "istio.io/use-waypoint: gone"), service("cart", "shop", "")].concat();
        let (bound, findings) = bind_all(&yaml);
        assert_eq!(bound["shop/cart"].as_deref(), Some("shop/gone"));
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].code, codes::WAYPOINT_NOT_FOUND);
        assert_eq!(
            findings[0].field.as_deref(),
            Some("the Namespace's metadata.labels[istio.io/use-waypoint]")
        );
        assert!(
            findings[0].message.contains("connections to this Service are refused"),
            "{}",
            findings[0].message
        );
    }

    #[test]
    fn pods_use_waypoints_for_workload_traffic_by_their_own_label_or_a_namespace_waypoint_for_it() {
        let yaml = [
            GATEWAYS.to_string(),
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: db-waypoint, namespace: data, labels: {istio.io/waypoint-for: all}}\n\
             spec: {gatewayClassName: istio-waypoint}\n"
                .to_string(),
            namespace("data", "istio.io/use-waypoint: db-waypoint"),
            namespace("shop", "istio.io/use-waypoint: waypoint"),
        ]
        .concat();
        let mut snapshot = Snapshot::default();
        let mut parse = Vec::new();
        read_documents("fixture", &yaml, &mut snapshot, &mut parse);
        assert!(parse.is_empty(), "{parse:?}");
        let namespaces: BTreeMap<&str, &Namespace> =
            snapshot.namespaces.iter().filter_map(|n| Some((n.metadata.name.as_deref()?, &**n))).collect();
        let waypoints = Waypoints::new(&snapshot.gateways, &namespaces);
        let mut findings = Vec::new();
        let bind = |namespace: &str, labels: &[(&str, &str)], findings: &mut Vec<Finding>| {
            let meta = ObjectMeta {
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            };
            waypoints
                .bind(&meta, namespace, "Pod x", Traffic::Workload, findings)
                .map(|w| format!("{}/{}", w.namespace, w.name))
        };
        // The namespace's waypoint takes all traffic: its pods use it.
        assert_eq!(bind("data", &[], &mut findings).as_deref(), Some("data/db-waypoint"));
        // A waypoint's own pods never do.
        assert_eq!(bind("data", &[(WAYPOINT_LABEL, "db-waypoint")], &mut findings), None);
        // A namespace waypoint for services only (the default): not for its pods, quietly.
        assert_eq!(bind("shop", &[], &mut findings), None);
        assert!(findings.is_empty(), "{findings:#?}");
        // A pod's own label naming a waypoint for services only: refused, and said.
        assert_eq!(bind("shop", &[(USE_WAYPOINT, "waypoint")], &mut findings), None);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].code, codes::WAYPOINT_REFUSED);
        assert!(findings[0].message.contains("not \"workload\""), "{}", findings[0].message);
        assert!(findings[0].message.contains("traffic to this pod's IP goes to it directly"));
        // Its own label naming a waypoint that takes workload traffic (in another namespace,
        // where the Gateway does not admit it: refused).
        assert_eq!(
            bind("shop", &[(USE_WAYPOINT, "db-waypoint"), (USE_WAYPOINT_NAMESPACE, "data")], &mut findings),
            None
        );
        assert!(findings[1].message.contains("does not admit namespace shop"), "{}", findings[1].message);
    }

    #[test]
    fn label_selectors_follow_kubernetes() {
        let labels: BTreeMap<String, String> = [("team".into(), "a".into())].into();
        let sel = |yaml: &str| serde_yaml_ng::from_str::<LabelSelector>(yaml).unwrap();
        assert_eq!(selects(&sel("{}"), &labels), Ok(true));
        assert_eq!(
            selects(&sel("{matchExpressions: [{key: team, operator: In, values: [a, b]}]}"), &labels),
            Ok(true)
        );
        assert_eq!(selects(&sel("{matchExpressions: [{key: tier, operator: Exists}]}"), &labels), Ok(false));
        assert_eq!(
            selects(&sel("{matchExpressions: [{key: tier, operator: DoesNotExist}]}"), &labels),
            Ok(true)
        );
        assert!(selects(&sel("{matchExpressions: [{key: tier, operator: Gt}]}"), &labels).is_err());
    }
}
