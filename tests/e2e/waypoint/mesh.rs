//! The mesh every waypoint test runs on, and the requests they send through it. Its `use`s
//! are re-exported: each test module starts from `use crate::mesh::*`.

pub(crate) use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

pub(crate) use warren_core::{
    l7::{
        ConnectionPool, Destination, DestinationRule, DirectResponse, Fault, FaultAbort, FaultDelay,
        HashCookie, HashKey, HeaderOperations, Headers, HttpRoute, L7Authorization, L7Rule, LoadBalancer,
        Mirror, Operation, OutlierDetection, PolicyTarget, PortTrafficPolicy, Redirect, RequestMatch,
        Retries, Rewrite, RouteDestination, Routing, SimpleLb, StringMatch, Subset, TrafficPolicy,
        VirtualService,
    },
    model::{NodeConfig, Service, ServicePort, WAYPOINT_LABEL, Workload},
    policy::{Action, Source},
};
pub(crate) use warren_e2e::{
    app::{Client, Server},
    require_root,
    topology::{Cluster, Pod},
    wait_until,
    waypoint::{Echo, Waypoint, http, load},
    ztunnel::{MeshCa, Ztunnel},
};

pub(crate) const HOST: &str = "payment.default.svc.cluster.local";
pub(crate) const APP_PORT: u16 = 8080;
pub(crate) const TCP_APP_PORT: u16 = 9090;

pub(crate) fn vip() -> IpAddr {
    "10.199.0.20".parse().unwrap()
}

pub(crate) fn url(path: &str) -> String {
    format!("http://{}:80{path}", vip())
}

/// Two nodes: the client, a legacy client and payment v2 on node 0; payment v1 and the
/// waypoint on node 1. `payment` uses the waypoint.
pub(crate) struct Mesh {
    pub(crate) cluster: Cluster,
    _ca: MeshCa,
    pub(crate) client: Pod,
    pub(crate) legacy: Pod,
    pub(crate) v1: Pod,
    pub(crate) v2: Pod,
    pub(crate) workloads: Vec<Workload>,
    pub(crate) services: Vec<Service>,
    pub(crate) ztunnels: Vec<Ztunnel>,
    /// Receives the waypoint's spans (in the waypoint pod's netns), when asked for.
    pub(crate) collector: Option<warren_e2e::waypoint::Collector>,
    /// A ledger endpoint that answers 503 to everything, when asked for.
    _bad_ledger: Option<Pod>,
    pub(crate) waypoint: Waypoint,
    /// Declared after the waypoint: its netns outlives the process.
    _waypoint_pod: Pod,
    pub(crate) waypoint_config: PathBuf,
    _apps: Vec<Echo>,
}

pub(crate) fn labelled(mut w: Workload, labels: &[(&str, &str)]) -> Workload {
    w.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    w
}

/// What a test needs beyond the basic mesh.
#[derive(Default)]
pub(crate) struct Options<'a> {
    pub(crate) v1_echo_args: &'a [&'a str],
    /// A second `ledger` endpoint (on node 0) that fails every request.
    pub(crate) bad_ledger_endpoint: bool,
    /// Start an OTLP collector in the waypoint's netns and sample every trace.
    pub(crate) tracing: bool,
    /// More waypoint flags.
    pub(crate) waypoint_args: &'a [&'a str],
}

pub(crate) fn ledger_vip() -> IpAddr {
    "10.199.0.21".parse().unwrap()
}

impl Mesh {
    pub(crate) fn new(v1_echo_args: &[&str]) -> Self {
        Self::with(Options { v1_echo_args, ..Default::default() })
    }

    pub(crate) fn with(options: Options<'_>) -> Self {
        let v1_echo_args = options.v1_echo_args;
        require_root();
        let ca = MeshCa::new();
        let mut cluster = Cluster::new(2);
        let (client, legacy, v2) =
            (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
        let (v1, wp) = (cluster.nodes[1].add_pod(), cluster.nodes[1].add_pod());
        let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
        let workloads = vec![
            client.workload_as(&n0, true, "checkout"),
            legacy.workload_as(&n0, true, "legacy"),
            labelled(v2.workload_as(&n0, true, "payment"), &[("app", "payment"), ("version", "v2")]),
            labelled(v1.workload_as(&n1, true, "payment"), &[("app", "payment"), ("version", "v1")]),
            // The waypoint is not captured: it speaks HBONE itself.
            labelled(wp.workload_as(&n1, false, "waypoint"), &[(WAYPOINT_LABEL, "waypoint")]),
        ];
        let mut workloads = workloads;
        let bad = options.bad_ledger_endpoint.then(|| cluster.nodes[0].add_pod());
        if let Some(bad) = &bad {
            workloads.push(labelled(bad.workload_as(&n0, true, "ledger"), &[("app", "ledger")]));
        }
        let ztunnels: Vec<Ztunnel> =
            cluster.nodes.iter().map(|n| Ztunnel::start_with(n, &workloads, &ca, &[])).collect();
        let waypoint_config = std::env::temp_dir().join("warren-e2e").join(&wp.name).join("config.json");
        std::fs::create_dir_all(waypoint_config.parent().unwrap()).unwrap();
        let mut ledger_endpoints = vec![&v2];
        ledger_endpoints.extend(bad.as_ref());
        let services = vec![service(&[&v1, &v2]), ledger(&ledger_endpoints)];
        let config =
            NodeConfig { workloads: workloads.clone(), services: services.clone(), ..Default::default() };
        std::fs::write(&waypoint_config, serde_json::to_vec(&config).unwrap()).unwrap();
        let collector = options.tracing.then(|| warren_e2e::waypoint::Collector::start(&wp, 4318));
        let mut waypoint_args: Vec<&str> = options.waypoint_args.to_vec();
        if options.tracing {
            waypoint_args.extend(["--tracing-collector", "127.0.0.1:4318", "--tracing-sampling", "100"]);
        }
        let waypoint =
            Waypoint::start_with_args(&wp, "default", "waypoint", &waypoint_config, &ca, &waypoint_args);
        let mut node0_pods = vec![&client, &legacy, &v2];
        node0_pods.extend(bad.as_ref());
        for (z, pods) in ztunnels.iter().zip([node0_pods, vec![&v1]]) {
            for p in pods {
                z.wait_enrolled(&p.name);
            }
        }
        let mut apps =
            vec![Echo::start(&v1, APP_PORT, "v1", v1_echo_args), Echo::start(&v2, APP_PORT, "v2", &[])];
        if let Some(bad) = &bad {
            apps.push(Echo::start(bad, APP_PORT, "bad", &["--fail-fraction", "1"]));
        }
        Mesh {
            cluster,
            _ca: ca,
            client,
            legacy,
            v1,
            v2,
            workloads,
            services,
            ztunnels,
            collector,
            _bad_ledger: bad,
            waypoint,
            _waypoint_pod: wp,
            waypoint_config,
            _apps: apps,
        }
    }

    /// Gives every proxy this routing and waits until all have loaded it.
    pub(crate) fn apply(&self, routing: Routing) {
        let config = NodeConfig {
            workloads: self.workloads.clone(),
            services: self.services.clone(),
            routing: routing.clone(),
            ..Default::default()
        };
        for z in &self.ztunnels {
            z.apply_config(&config);
        }
        let tmp = self.waypoint_config.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&config).unwrap()).unwrap();
        std::fs::rename(&tmp, &self.waypoint_config).unwrap();
        let want = serde_json::to_value(&routing).unwrap();
        let loaded = wait_until(Duration::from_secs(10), || self.waypoint.config_dump()["routing"] == want);
        assert!(loaded, "the waypoint did not load the new routing:\n{}", self.waypoint.log());
    }
}

pub(crate) fn service(endpoints: &[&Pod]) -> Service {
    Service {
        name: "payment".into(),
        namespace: "default".into(),
        vips: vec![vip()],
        ports: vec![
            ServicePort { port: 80, target_port: APP_PORT },
            ServicePort { port: 90, target_port: TCP_APP_PORT },
        ],
        endpoints: endpoints.iter().map(|p| p.name.clone()).collect(),
        waypoint: Some("waypoint".into()),
        waypoint_namespace: None,
    }
}

pub(crate) fn ledger(endpoints: &[&Pod]) -> Service {
    Service {
        name: "ledger".into(),
        namespace: "default".into(),
        vips: vec![ledger_vip()],
        ports: vec![ServicePort { port: 80, target_port: APP_PORT }],
        endpoints: endpoints.iter().map(|p| p.name.clone()).collect(),
        waypoint: Some("waypoint".into()),
        waypoint_namespace: None,
    }
}

pub(crate) fn to(subset: &str, weight: u32) -> RouteDestination {
    RouteDestination {
        destination: Destination { host: HOST.into(), subset: Some(subset.into()), port: None },
        weight,
        headers: Default::default(),
    }
}

pub(crate) fn subsets() -> DestinationRule {
    let subset = |v: &str| Subset {
        name: v.into(),
        labels: BTreeMap::from([("version".into(), v.into())]),
        traffic_policy: None,
    };
    DestinationRule {
        name: "payment".into(),
        namespace: "default".into(),
        host: HOST.into(),
        traffic_policy: Default::default(),
        subsets: vec![subset("v1"), subset("v2")],
    }
}

pub(crate) fn vs(http: Vec<HttpRoute>) -> VirtualService {
    VirtualService {
        name: "payment".into(),
        namespace: "default".into(),
        kind: Default::default(),
        hosts: vec![HOST.into()],
        http,
    }
}

pub(crate) fn prefix(p: &str) -> Vec<RequestMatch> {
    vec![RequestMatch { uri: Some(StringMatch::Prefix(p.into())), ..Default::default() }]
}

/// The demo's routing: `x-beta-user: true` to v2, everything else 95/5 between v1 and v2.
pub(crate) fn canary() -> Routing {
    let beta = HttpRoute {
        name: Some("beta-users".into()),
        matches: vec![RequestMatch {
            headers: BTreeMap::from([("x-beta-user".into(), StringMatch::Exact("true".into()))]),
            ..Default::default()
        }],
        route: vec![to("v2", 100)],
        ..Default::default()
    };
    let split = HttpRoute {
        name: Some("canary".into()),
        route: vec![to("v1", 95), to("v2", 5)],
        ..Default::default()
    };
    Routing {
        virtual_services: vec![vs(vec![beta, split])],
        destination_rules: vec![subsets()],
        authorizations: vec![],
    }
}

/// Every request to v1: one server's count of the calls it holds is the count in flight.
pub(crate) fn all_to_v1() -> Routing {
    let route = HttpRoute { route: vec![to("v1", 100)], ..Default::default() };
    Routing {
        virtual_services: vec![vs(vec![route])],
        destination_rules: vec![subsets()],
        authorizations: vec![],
    }
}

pub(crate) fn echo_stats(pod: &Pod) -> serde_json::Value {
    let r = warren_e2e::waypoint::http_in(
        &pod.ns.path(),
        "127.0.0.1:8080".parse().unwrap(),
        "GET",
        "/_echo/stats",
        &[],
    )
    .unwrap();
    serde_json::from_str(&r.body).unwrap()
}

/// Runs `exchanges` with an HTTP/2 (prior knowledge) connection from `client` to the
/// service's port 80.
pub(crate) fn over_http2<T, F>(
    client: &Pod,
    exchanges: impl FnOnce(h2::client::SendRequest<bytes::Bytes>) -> F,
) -> T
where
    F: std::future::Future<Output = T>,
{
    over_http2_with(client, h2::client::Builder::new(), exchanges)
}

/// [`over_http2`] with the client's HTTP/2 settings from `builder`.
pub(crate) fn over_http2_with<T, F>(
    client: &Pod,
    builder: h2::client::Builder,
    exchanges: impl FnOnce(h2::client::SendRequest<bytes::Bytes>) -> F,
) -> T
where
    F: std::future::Future<Output = T>,
{
    let dst = SocketAddr::new(vip(), 80);
    let tcp =
        client.ns.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3))).unwrap();
    tcp.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let (sender, connection) = builder.handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        exchanges(sender).await
    })
}

/// POSTs of `sizes` bytes from the client pod to payment, concurrently on one HTTP/2
/// connection, each with `headers`; returns each echo answer's status and JSON body.
pub(crate) fn http2_posts(
    client: &Pod,
    sizes: &[usize],
    headers: &[(&str, &str)],
) -> Vec<(u16, serde_json::Value)> {
    let headers: Vec<(String, String)> =
        headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    over_http2(client, |sender| async move {
        let exchanges = sizes.iter().map(|&size| {
            let mut sender = sender.clone();
            let headers = headers.clone();
            async move {
                sender = sender.ready().await.unwrap();
                let mut request = http::Request::post(format!("http://{HOST}/upload"));
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                let request = request.body(()).unwrap();
                let (response, mut stream) = sender.send_request(request, size == 0).unwrap();
                if size > 0 {
                    // Larger than the peers' initial windows: only flow control gets it through.
                    stream.send_data(bytes::Bytes::from(vec![b'x'; size]), true).unwrap();
                }
                match response.await {
                    Ok(response) => status_and_json(response).await,
                    // Status 0: no response; the assertion prints why, with the waypoint's log.
                    Err(e) => (0, serde_json::Value::String(e.to_string())),
                }
            }
        });
        let exchanges: Vec<_> = exchanges.map(tokio::spawn).collect();
        let mut answers = Vec::new();
        for exchange in exchanges {
            answers.push(tokio::time::timeout(Duration::from_secs(20), exchange).await.unwrap().unwrap());
        }
        answers
    })
}

/// An HTTP/2 answer's status and its body as JSON (null if it is not JSON).
pub(crate) async fn status_and_json(response: http::Response<h2::RecvStream>) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut json = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        json.extend_from_slice(&chunk);
    }
    (status, serde_json::from_slice(&json).unwrap_or(serde_json::Value::Null))
}

/// How many of `answers` each upstream connection carried, by the TCP peer the echo server saw
/// (each upstream connection reaches it as a connection of its own from its ztunnel).
pub(crate) fn requests_per_upstream_connection(answers: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut per_peer = BTreeMap::new();
    for echo in answers {
        let peer = echo["peer"].as_str().unwrap_or_else(|| panic!("no peer in {echo}"));
        *per_peer.entry(peer.to_string()).or_insert(0) += 1;
    }
    per_peer
}
