//! What every request reads: the compiled config snapshot (swapped whole on reload, so a
//! request sees one consistent version), the upstream clusters, the certificates, metrics.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use warren_core::{
    FastMap, FastSet,
    accept::{Handshakes, MAX_HANDSHAKES_PER_SOURCE},
    certs::CertManager,
    identity::SpiffeId,
    l7::DestinationRule,
    model::{NodeConfig, Service, Workload, WorkloadIndex},
};

use crate::{
    config::Config,
    metrics::{Interned, Metrics, Side},
    routing::RouteTable,
    trace::Exporter,
    upstream::Clusters,
};

/// One config version, compiled.
#[derive(Default)]
pub struct Snapshot {
    pub config: NodeConfig,
    pub index: WorkloadIndex,
    pub routes: RouteTable,
    pub services_by_host: FastMap<String, Arc<Service>>,
    pub destination_rules: FastMap<String, DestinationRule>,
    /// Every service's endpoints, and each subset's, by service host: found per request
    /// instead of filtering the service's endpoints by labels every time.
    endpoint_sets: FastMap<String, EndpointSets>,
    /// The ports a cluster can be for under this version: every service's, and every port a
    /// route or mirror names (a destination without one takes the request's service port).
    cluster_ports: FastSet<u16>,
    /// Each workload's metric labels, by UID, built on its first request under this version.
    metric_sides: Mutex<FastMap<String, Interned<Side>>>,
    /// Pods with a waypoint for traffic to their own IPs (Istio's workload waypoints), each as
    /// a service of its own, by pod IP: see [`workload_service`].
    workload_services: FastMap<IpAddr, Arc<Service>>,
}

/// A pod with a workload waypoint as a service whose one endpoint is the pod, so that its
/// traffic takes the request path every service's does: L7 policy on the waypoint, the
/// pod as the one destination (no route can name it), metrics and traces. Its name,
/// `<pod>.pod`, cannot be a Service's (a Service's name has no dot), so its host
/// `<pod>.pod.<namespace>.svc.cluster.local` meets no route, DestinationRule or policy meant
/// for a Service. It has no ports: traffic keeps the port it was sent to.
fn workload_service(workload: &Workload) -> Option<Service> {
    let waypoint = workload.waypoint.as_ref()?;
    Some(Service {
        name: format!("{}.pod", workload.name),
        namespace: workload.namespace.clone(),
        vips: workload.ips.clone(),
        ports: Vec::new(),
        endpoints: vec![workload.uid.clone()],
        waypoint: Some(waypoint.name.clone()),
        waypoint_namespace: Some(waypoint.namespace.clone()),
    })
}

/// A destination's endpoints, listed once per config version.
pub type Endpoints = Arc<[Arc<Workload>]>;

/// One service's endpoints: all, and those of each subset of its DestinationRule (the
/// endpoints carrying every label of the subset).
struct EndpointSets {
    all: Endpoints,
    by_subset: FastMap<String, Endpoints>,
}

impl Snapshot {
    pub fn new(config: NodeConfig) -> Self {
        let routes = RouteTable::build(&config.routing.virtual_services);
        let mut services_by_host: FastMap<String, Arc<Service>> =
            config.services.iter().map(|s| (s.hostname(), Arc::new(s.clone()))).collect();
        let mut workload_services = FastMap::default();
        for service in config.workloads.iter().filter(|w| w.enrolled).filter_map(workload_service) {
            let service = Arc::new(service);
            for ip in &service.vips {
                workload_services.insert(*ip, service.clone());
            }
            services_by_host.insert(service.hostname(), service);
        }
        let mut destination_rules = FastMap::default();
        // Istio uses the oldest DestinationRule for a host; the controller orders them.
        for rule in &config.routing.destination_rules {
            destination_rules.entry(rule.host.clone()).or_insert_with(|| rule.clone());
        }
        let index = WorkloadIndex::new(&config);
        let endpoint_sets = services_by_host
            .iter()
            .map(|(host, service)| {
                let all = index.endpoints(service);
                let subsets = destination_rules.get(host).map(|r: &DestinationRule| r.subsets.as_slice());
                let by_subset = subsets
                    .unwrap_or_default()
                    .iter()
                    .map(|subset| {
                        let carries = |w: &&Arc<Workload>| {
                            subset.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                        };
                        (subset.name.clone(), all.iter().filter(carries).cloned().collect())
                    })
                    .collect();
                (host.clone(), EndpointSets { all: all.into(), by_subset })
            })
            .collect();
        let service_ports = config.services.iter().flat_map(|s| s.ports.iter().map(|p| p.port));
        let named_ports = config.routing.virtual_services.iter().flat_map(|vs| &vs.http).flat_map(|route| {
            let routed = route.route.iter().map(|r| &r.destination);
            let mirrored = route.mirrors.iter().map(|m| &m.destination);
            routed.chain(mirrored).filter_map(|d| d.port)
        });
        let cluster_ports = service_ports.chain(named_ports).collect();
        Self {
            index,
            routes,
            cluster_ports,
            services_by_host,
            destination_rules,
            endpoint_sets,
            config,
            metric_sides: Mutex::default(),
            workload_services,
        }
    }

    /// The endpoints of service `host`, or of its `subset` (none if the DestinationRule does
    /// not define it).
    pub fn endpoints(&self, host: &str, subset: Option<&str>) -> Option<Endpoints> {
        let sets = self.endpoint_sets.get(host)?;
        match subset {
            None => Some(sets.all.clone()),
            Some(name) => sets.by_subset.get(name).cloned(),
        }
    }

    /// Whether this config still has `key`'s cluster: its host is a service, its subset, if
    /// any, one that the host's DestinationRule defines, and its port one a service has or a
    /// route names.
    pub fn has_cluster(&self, key: &crate::upstream::ClusterKey) -> bool {
        let Some(sets) = self.endpoint_sets.get(&key.host) else { return false };
        // A pod's own service (a workload waypoint's) has no ports: any port is its.
        let port_known = self.cluster_ports.contains(&key.port)
            || self.services_by_host.get(&key.host).is_some_and(|s| s.ports.is_empty());
        port_known && key.subset.as_deref().is_none_or(|subset| sets.by_subset.contains_key(subset))
    }

    /// `workload`'s metric labels under this config version (its labels can change with the
    /// next): built by `make` the first time, then looked up.
    pub fn metric_side(&self, workload: &Workload, make: impl FnOnce() -> Interned<Side>) -> Interned<Side> {
        let mut sides = self.metric_sides.lock().expect("poisoned");
        if let Some(side) = sides.get(&workload.uid) {
            return side.clone();
        }
        let side = make();
        sides.insert(workload.uid.clone(), side.clone());
        side
    }

    /// The service behind `vip` if this waypoint (`namespace`/`name`) serves it: a Service's
    /// VIP, or a pod's IP whose workload waypoint it is (the pod's own service, see
    /// [`workload_service`]).
    pub fn served_service(&self, vip: IpAddr, namespace: &str, name: &str) -> Option<Arc<Service>> {
        let service = self.index.service_by_vip(vip).or_else(|| self.workload_services.get(&vip))?;
        service.is_served_by(namespace, name).then(|| service.clone())
    }
}

/// Counts a CONNECT stream (or a connection upgraded inside one) as open while it lives:
/// draining waits for these.
pub struct OpenStream(Arc<WaypointState>);

impl OpenStream {
    pub fn new(state: Arc<WaypointState>) -> Self {
        state.open_streams.fetch_add(1, Ordering::AcqRel);
        OpenStream(state)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct WaypointState {
    pub config: Config,
    pub identity: SpiffeId,
    pub certs: Arc<CertManager>,
    snapshot: RwLock<Arc<Snapshot>>,
    pub clusters: Clusters,
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub open_streams: AtomicUsize,
    /// HBONE connections still in their handshakes, per source.
    pub handshakes: Arc<Handshakes>,
    /// Where sampled spans go, when a collector is configured.
    pub exporter: Option<Exporter>,
    /// The config stream's state, when config comes from the controller.
    pub stream: Arc<std::sync::Mutex<warren_core::config_stream::ClientStatus>>,
    me: Weak<WaypointState>,
}

impl WaypointState {
    pub fn new(
        config: Config,
        certs: Arc<CertManager>,
        clusters: Clusters,
        exporter: Option<Exporter>,
    ) -> Arc<Self> {
        let identity = SpiffeId {
            trust_domain: config.trust_domain.clone(),
            namespace: config.namespace.clone(),
            service_account: config.service_account().to_string(),
        };
        Arc::new_cyclic(|me| Self {
            config,
            identity,
            certs,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            clusters,
            metrics: Arc::default(),
            ready: AtomicBool::new(false),
            open_streams: AtomicUsize::new(0),
            handshakes: Handshakes::new(MAX_HANDSHAKES_PER_SOURCE),
            exporter,
            stream: Default::default(),
            me: me.clone(),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("poisoned").clone()
    }

    pub fn set_snapshot(&self, snapshot: Snapshot) {
        let snapshot = Arc::new(snapshot);
        *self.snapshot.write().expect("poisoned") = snapshot.clone();
        self.clusters.forget_gone(|key| snapshot.has_cluster(key));
        self.clusters.retire_idle(|ip| snapshot.index.by_ip(ip).is_some());
    }

    /// For work that outlives the request that started it (mirrors).
    pub fn self_arc(&self) -> Arc<Self> {
        self.me.upgrade().expect("the state outlives its requests")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use warren_core::{
        l7::{Destination, HttpRoute, RouteDestination, Routing, Subset, VirtualService},
        model::ServicePort,
    };

    use super::*;

    fn pod(name: &str, version: &str, ip: Option<&str>) -> Workload {
        Workload {
            uid: name.into(),
            name: name.into(),
            namespace: "shop".into(),
            service_account: "payment".into(),
            node: "node-1".into(),
            ips: ip.map(|ip| ip.parse().unwrap()).into_iter().collect(),
            enrolled: true,
            labels: BTreeMap::from([("version".into(), version.into())]),
            waypoint: None,
        }
    }

    #[test]
    fn a_pod_with_a_workload_waypoint_is_a_service_of_its_own_on_any_port() {
        let mut db = pod("db-0", "v1", Some("10.0.0.7"));
        db.waypoint = Some(warren_core::model::WaypointRef { namespace: "infra".into(), name: "wp".into() });
        let other = pod("web", "v1", Some("10.0.0.8"));
        let snapshot = Snapshot::new(NodeConfig { workloads: vec![db, other], ..Default::default() });
        let ip = "10.0.0.7".parse().unwrap();
        let service = snapshot.served_service(ip, "infra", "wp").expect("served as the pod's waypoint");
        assert_eq!(service.hostname(), "db-0.pod.shop.svc.cluster.local");
        assert_eq!(snapshot.endpoints(&service.hostname(), None).unwrap()[0].uid, "db-0");
        assert!(snapshot.served_service(ip, "shop", "wp").is_none(), "another waypoint's");
        assert!(snapshot.served_service("10.0.0.8".parse().unwrap(), "infra", "wp").is_none());
        let key = |port| crate::upstream::ClusterKey { host: service.hostname(), subset: None, port };
        assert!(snapshot.has_cluster(&key(5432)) && snapshot.has_cluster(&key(8080)));
    }

    #[test]
    fn endpoints_are_listed_once_per_service_and_subset() {
        let subset = |name: &str, version: &str| Subset {
            name: name.into(),
            labels: BTreeMap::from([("version".into(), version.into())]),
            traffic_policy: None,
        };
        let host = "payment.shop.svc.cluster.local";
        let config = NodeConfig {
            workloads: vec![
                pod("a", "v1", Some("10.0.0.1")),
                pod("b", "v2", Some("10.0.0.2")),
                pod("c", "v1", Some("10.0.0.3")),
                pod("pending", "v1", None),
            ],
            services: vec![Service {
                name: "payment".into(),
                namespace: "shop".into(),
                vips: vec![],
                ports: vec![ServicePort { port: 80, target_port: 8080 }],
                endpoints: ["a", "b", "c", "pending"].map(String::from).to_vec(),
                waypoint: None,
                waypoint_namespace: None,
            }],
            routing: Routing {
                destination_rules: vec![DestinationRule {
                    name: "payment".into(),
                    namespace: "shop".into(),
                    host: host.into(),
                    traffic_policy: Default::default(),
                    subsets: vec![subset("v1", "v1"), subset("v2", "v2"), subset("v3", "v3")],
                }],
                // A route to a port the service does not list (the admin port, say).
                virtual_services: vec![VirtualService {
                    name: "payment".into(),
                    namespace: "shop".into(),
                    kind: Default::default(),
                    hosts: vec![host.into()],
                    http: vec![HttpRoute {
                        route: vec![RouteDestination {
                            destination: Destination { host: host.into(), subset: None, port: Some(9090) },
                            weight: 100,
                            headers: Default::default(),
                        }],
                        ..Default::default()
                    }],
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let snapshot = Snapshot::new(config);
        let names = |subset: Option<&str>| {
            snapshot.endpoints(host, subset).map(|e| e.iter().map(|w| w.name.clone()).collect::<Vec<_>>())
        };
        // A pod without an address yet is no endpoint.
        assert_eq!(names(None).unwrap(), ["a", "b", "c"]);
        assert_eq!(names(Some("v1")).unwrap(), ["a", "c"]);
        assert_eq!(names(Some("v2")).unwrap(), ["b"]);
        assert!(names(Some("v3")).unwrap().is_empty(), "a subset that matches no pod has no endpoints");
        assert_eq!(names(Some("v4")), None, "a subset the rule does not define");
        assert!(snapshot.endpoints("ledger.shop.svc.cluster.local", None).is_none());
        // The clusters this config still has: the service's, and its rule's subsets'.
        let key = |host: &str, subset: Option<&str>, port| crate::upstream::ClusterKey {
            host: host.into(),
            subset: subset.map(String::from),
            port,
        };
        assert!(snapshot.has_cluster(&key(host, None, 80)));
        assert!(snapshot.has_cluster(&key(host, Some("v3"), 80)));
        assert!(!snapshot.has_cluster(&key(host, Some("v4"), 80)));
        assert!(!snapshot.has_cluster(&key("ledger.shop.svc.cluster.local", None, 80)));
        assert!(snapshot.has_cluster(&key(host, None, 9090)), "a port a route names");
        assert!(!snapshot.has_cluster(&key(host, None, 7070)), "a port no service has and no route names");
    }
}
