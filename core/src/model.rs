//! The config model: what the controller computes from Kubernetes objects (or a manifest
//! directory) and streams to the proxies. Today ztunnel also reads it from a local file
//! ([`NodeConfig`]) until the config stream exists.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{FastMap, identity::SpiffeId};

/// A pod as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Kubernetes UID (or, in local mode, `namespace/name`).
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The node the pod is scheduled on.
    pub node: String,
    /// Pod IPs (one per family). Empty while the pod has no IP yet.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Whether the pod's traffic is captured (`istio.io/dataplane-mode=ambient`).
    #[serde(default)]
    pub enrolled: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The waypoint for traffic addressed to this pod's own IPs (Istio's workload waypoints:
    /// the pod's `istio.io/use-waypoint`, to a Gateway for `workload` or `all` traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// A waypoint, by its Gateway's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaypointRef {
    pub namespace: String,
    pub name: String,
}

fn default_service_account() -> String {
    "default".to_string()
}

/// `namespace/name`, how operators name a pod in messages.
impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    /// `namespace/name`, how operators name a pod in messages.
    pub fn display_name(&self) -> String {
        self.to_string()
    }

    /// The workload's SPIFFE identity: its ServiceAccount in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: self.namespace.clone(),
            service_account: self.service_account.clone(),
        }
    }

    /// The pod's address in the family of `like` (its first IP when it has none of it).
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv4() == like.is_ipv4()).or(self.ips.first().copied())
    }
}

/// A Kubernetes Service as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// ClusterIPs (one per family).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// UIDs of the ready workloads behind it (the controller resolves selector and readiness).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The waypoint that handles its traffic (`istio.io/use-waypoint`): the name of its
    /// Gateway, in [`Service::waypoint_namespace`].
    #[serde(default)]
    pub waypoint: Option<String>,
    /// The waypoint's namespace when it is not the service's own
    /// (`istio.io/use-waypoint-namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint_namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
}

impl Service {
    /// `name.namespace.svc.cluster.local`, Istio's `destination_service`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port == port).map(|p| p.target_port)
    }

    /// The waypoint that handles its traffic, as (namespace, Gateway name).
    pub fn waypoint_ref(&self) -> Option<(&str, &str)> {
        let name = self.waypoint.as_deref()?;
        Some((self.waypoint_namespace.as_deref().unwrap_or(&self.namespace), name))
    }

    /// Whether the waypoint `namespace`/`name` handles its traffic.
    pub fn is_served_by(&self, namespace: &str, name: &str) -> bool {
        self.waypoint_ref() == Some((namespace, name))
    }
}

/// Label that names the waypoint (Gateway) a workload belongs to.
pub const WAYPOINT_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// Gateway classes whose Gateways are waypoints: Istio's, and Warren's own name.
pub const WAYPOINT_CLASSES: [&str; 2] = ["istio-waypoint", "warren-waypoint"];

/// Workloads and services by IP, for resolving a connection's original destination.
#[derive(Clone, Debug, Default)]
pub struct WorkloadIndex {
    by_ip: FastMap<IpAddr, Arc<Workload>>,
    by_uid: FastMap<String, Arc<Workload>>,
    services_by_vip: FastMap<IpAddr, Arc<Service>>,
    /// Waypoint workloads (with an address) by (namespace, Gateway name), sorted by uid: a
    /// connection to a service behind a waypoint picks one without a scan of every workload.
    waypoints: FastMap<(String, String), Vec<Arc<Workload>>>,
    /// The waypoints that serve each workload (by uid): its Services' and its own.
    serving_waypoints: FastMap<String, Vec<WaypointRef>>,
}

impl WorkloadIndex {
    pub fn new(config: &NodeConfig) -> Self {
        let mut index = Self::default();
        for w in &config.workloads {
            let w = Arc::new(w.clone());
            for ip in &w.ips {
                index.by_ip.insert(*ip, w.clone());
            }
            if let Some(gateway) = w.labels.get(WAYPOINT_LABEL)
                && !w.ips.is_empty()
            {
                index.waypoints.entry((w.namespace.clone(), gateway.clone())).or_default().push(w.clone());
            }
            index.by_uid.insert(w.uid.clone(), w);
        }
        for workloads in index.waypoints.values_mut() {
            workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        }
        for s in &config.services {
            let s = Arc::new(s.clone());
            for vip in &s.vips {
                index.services_by_vip.insert(*vip, s.clone());
            }
            if let Some((namespace, name)) = s.waypoint_ref() {
                let waypoint = WaypointRef { namespace: namespace.to_owned(), name: name.to_owned() };
                for uid in &s.endpoints {
                    index.serving_waypoints.entry(uid.clone()).or_default().push(waypoint.clone());
                }
            }
        }
        for w in &config.workloads {
            if let Some(waypoint) = &w.waypoint {
                index.serving_waypoints.entry(w.uid.clone()).or_default().push(waypoint.clone());
            }
        }
        index
    }

    /// Whether `source` is the identity of a pod of a waypoint that serves `destination`
    /// (the waypoint of one of its Services, or its own workload waypoint).
    pub fn is_waypoint_of(&self, source: &crate::identity::SpiffeId, destination: &Workload) -> bool {
        let Some(waypoints) = self.serving_waypoints.get(&destination.uid) else { return false };
        waypoints.iter().any(|w| {
            self.waypoint(&w.namespace, &w.name)
                .iter()
                .any(|pod| pod.namespace == source.namespace && pod.service_account == source.service_account)
        })
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    pub fn by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip.to_canonical())
    }

    /// The service's endpoints that have an address.
    pub fn endpoints(&self, service: &Service) -> Vec<Arc<Workload>> {
        service
            .endpoints
            .iter()
            .filter_map(|uid| self.by_uid(uid))
            .filter(|w| !w.ips.is_empty())
            .cloned()
            .collect()
    }

    /// Every service, once each (the index holds them by VIP).
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        let mut seen = std::collections::HashSet::new();
        self.services_by_vip.values().filter(move |s| seen.insert(Arc::as_ptr(s)))
    }

    /// The (namespace, name) of every waypoint with a pod that has an address.
    pub fn waypoint_names(&self) -> impl Iterator<Item = (&str, &str)> {
        self.waypoints.keys().map(|(namespace, name)| (namespace.as_str(), name.as_str()))
    }

    /// The workloads of the waypoint named `name` in `namespace`.
    pub fn waypoint(&self, namespace: &str, name: &str) -> &[Arc<Workload>] {
        // Keyed by owned strings: the lookup builds the key (two short copies) rather than
        // scanning every workload of the node's config.
        self.waypoints.get(&(namespace.to_owned(), name.to_owned())).map_or(&[], Vec::as_slice)
    }
}

/// What one node's ztunnel needs: its workloads. Read from `--config` (JSON) until the
/// controller's config stream replaces it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// L4 AuthorizationPolicies (as the controller translates them).
    #[serde(default)]
    pub authorizations: Vec<crate::policy::Authorization>,
    #[serde(default)]
    pub peer_authentications: Vec<crate::policy::PeerAuthentication>,
    /// The namespace whose selector-less policies apply mesh-wide (`istio-system` if empty).
    #[serde(default)]
    pub root_namespace: String,
    /// L7 configuration for waypoints (ztunnel ignores it).
    #[serde(default, skip_serializing_if = "crate::l7::Routing::is_empty")]
    pub routing: crate::l7::Routing,
}

impl NodeConfig {
    /// The workloads on `node` that are enrolled in the mesh.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.iter().filter(move |w| w.enrolled && w.node == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let err = serde_json::from_str::<NodeConfig>(
            r#"{"workloads":[{"uid":"a","name":"a","namespace":"n","node":"x","ipz":[]}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("ipz"), "{err}");
    }

    #[test]
    fn only_enrolled_workloads_of_the_node_are_selected() {
        let w = |name: &str, node: &str, enrolled| Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "n".into(),
            service_account: "default".into(),
            node: node.into(),
            ips: vec![],
            enrolled,
            labels: Default::default(),
            waypoint: None,
        };
        let config = NodeConfig {
            workloads: vec![w("a", "n1", true), w("b", "n1", false), w("c", "n2", true)],
            ..Default::default()
        };
        let names: Vec<_> = config.enrolled_on("n1").map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn a_waypoint_serves_its_services_endpoints_and_the_pods_that_name_it() {
        let w = |name: &str, ns: &str, sa: &str, ip: &str| Workload {
            uid: name.into(),
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            node: "n1".into(),
            ips: vec![ip.parse().unwrap()],
            enrolled: true,
            labels: Default::default(),
            waypoint: None,
        };
        let mut shared = w("shared-0", "infra", "shared", "10.0.0.1");
        shared.labels.insert(WAYPOINT_LABEL.into(), "shared".into());
        let mut own = w("own-0", "shop", "own", "10.0.0.2");
        own.labels.insert(WAYPOINT_LABEL.into(), "own".into());
        let mut db = w("db-0", "shop", "db", "10.0.0.4");
        db.waypoint = Some(WaypointRef { namespace: "shop".into(), name: "own".into() });
        let config = NodeConfig {
            workloads: vec![shared, own, w("echo", "shop", "echo", "10.0.0.3"), db],
            services: vec![Service {
                name: "echo".into(),
                namespace: "shop".into(),
                vips: vec!["10.96.0.1".parse().unwrap()],
                ports: vec![],
                endpoints: vec!["echo".into()],
                waypoint: Some("shared".into()),
                waypoint_namespace: Some("infra".into()),
            }],
            ..Default::default()
        };
        let index = WorkloadIndex::new(&config);
        let id = |s: &str| -> crate::identity::SpiffeId { s.parse().unwrap() };
        let (echo, db) = (index.by_uid("echo").unwrap(), index.by_uid("db-0").unwrap());
        let (shared_id, own_id) =
            (id("spiffe://cluster.local/ns/infra/sa/shared"), id("spiffe://cluster.local/ns/shop/sa/own"));
        assert!(index.is_waypoint_of(&shared_id, echo));
        assert!(!index.is_waypoint_of(&own_id, echo));
        assert!(index.is_waypoint_of(&own_id, db));
        assert!(!index.is_waypoint_of(&shared_id, db));
        assert!(!index.is_waypoint_of(&id("spiffe://cluster.local/ns/shop/sa/echo"), echo));
    }
}
