//! What every request reads: the compiled config snapshot (swapped whole on reload, so a
//! request sees one consistent version), the upstream clusters, the certificates, metrics.

use std::{
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicUsize},
    },
};

use warren_core::{
    FastMap,
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
    /// Each workload's metric labels, by UID, built on its first request under this version.
    metric_sides: Mutex<FastMap<String, Interned<Side>>>,
}

impl Snapshot {
    pub fn new(config: NodeConfig) -> Self {
        let routes = RouteTable::build(&config.routing.virtual_services);
        let services_by_host = config.services.iter().map(|s| (s.hostname(), Arc::new(s.clone()))).collect();
        let mut destination_rules = FastMap::default();
        // Istio uses the oldest DestinationRule for a host; the controller orders them.
        for rule in &config.routing.destination_rules {
            destination_rules.entry(rule.host.clone()).or_insert_with(|| rule.clone());
        }
        Self {
            index: WorkloadIndex::new(&config),
            routes,
            services_by_host,
            destination_rules,
            config,
            metric_sides: Mutex::default(),
        }
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

    /// The service behind `vip` if this waypoint (`namespace`/`name`) serves it.
    pub fn served_service(&self, vip: IpAddr, namespace: &str, name: &str) -> Option<Arc<Service>> {
        let service = self.index.service_by_vip(vip)?;
        (service.namespace == namespace && service.waypoint.as_deref() == Some(name)).then(|| service.clone())
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
        self.clusters.retire_idle(|ip| snapshot.index.by_ip(ip).is_some());
    }

    /// For work that outlives the request that started it (mirrors).
    pub fn self_arc(&self) -> Arc<Self> {
        self.me.upgrade().expect("the state outlives its requests")
    }
}
