//! The waypoint end to end: client pod → (eBPF capture) → ztunnel → HBONE → waypoint →
//! HBONE → ztunnel → server pod, with the real binaries, the project's echo server and load
//! client, across two nodes. Each claim of L7 routing and policy is asserted on what the
//! client receives, and on the waypoint's and ztunnels' own logs and metrics.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use warren_core::{
    l7::{
        ConnectionPool, Destination, DestinationRule, DirectResponse, Fault, FaultAbort, FaultDelay, HashKey,
        HeaderOperations, Headers, HttpRoute, L7Authorization, L7Rule, LoadBalancer, Mirror, Operation,
        OutlierDetection, PolicyTarget, PortTrafficPolicy, Redirect, RequestMatch, Retries, Rewrite,
        RouteDestination, Routing, SimpleLb, StringMatch, Subset, TrafficPolicy, VirtualService,
    },
    model::{NodeConfig, Service, ServicePort, WAYPOINT_LABEL, Workload},
    policy::{Action, Source},
};
use warren_e2e::{
    app::{Client, Server},
    require_root,
    topology::{Cluster, Pod},
    wait_until,
    waypoint::{Echo, Waypoint, http, load},
    ztunnel::{MeshCa, Ztunnel},
};

const HOST: &str = "payment.default.svc.cluster.local";
const APP_PORT: u16 = 8080;
const TCP_APP_PORT: u16 = 9090;

fn vip() -> IpAddr {
    "10.199.0.20".parse().unwrap()
}

fn url(path: &str) -> String {
    format!("http://{}:80{path}", vip())
}

/// Two nodes: the client, a legacy client and payment v2 on node 0; payment v1 and the
/// waypoint on node 1. `payment` uses the waypoint.
struct Mesh {
    _cluster: Cluster,
    _ca: MeshCa,
    client: Pod,
    legacy: Pod,
    v1: Pod,
    v2: Pod,
    workloads: Vec<Workload>,
    services: Vec<Service>,
    ztunnels: Vec<Ztunnel>,
    /// Receives the waypoint's spans (in the waypoint pod's netns), when asked for.
    collector: Option<warren_e2e::waypoint::Collector>,
    /// A ledger endpoint that answers 503 to everything, when asked for.
    _bad_ledger: Option<Pod>,
    waypoint: Waypoint,
    /// Declared after the waypoint: its netns outlives the process.
    _waypoint_pod: Pod,
    waypoint_config: PathBuf,
    _apps: Vec<Echo>,
}

fn labelled(mut w: Workload, labels: &[(&str, &str)]) -> Workload {
    w.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    w
}

/// What a test needs beyond the basic mesh.
#[derive(Default)]
struct Options<'a> {
    v1_echo_args: &'a [&'a str],
    /// A second `ledger` endpoint (on node 0) that fails every request.
    bad_ledger_endpoint: bool,
    /// Start an OTLP collector in the waypoint's netns and sample every trace.
    tracing: bool,
    /// More waypoint flags.
    waypoint_args: &'a [&'a str],
}

fn ledger_vip() -> IpAddr {
    "10.199.0.21".parse().unwrap()
}

impl Mesh {
    fn new(v1_echo_args: &[&str]) -> Self {
        Self::with(Options { v1_echo_args, ..Default::default() })
    }

    fn with(options: Options<'_>) -> Self {
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
            _cluster: cluster,
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
    fn apply(&self, routing: Routing) {
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

fn service(endpoints: &[&Pod]) -> Service {
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
    }
}

fn ledger(endpoints: &[&Pod]) -> Service {
    Service {
        name: "ledger".into(),
        namespace: "default".into(),
        vips: vec![ledger_vip()],
        ports: vec![ServicePort { port: 80, target_port: APP_PORT }],
        endpoints: endpoints.iter().map(|p| p.name.clone()).collect(),
        waypoint: Some("waypoint".into()),
    }
}

fn to(subset: &str, weight: u32) -> RouteDestination {
    RouteDestination {
        destination: Destination { host: HOST.into(), subset: Some(subset.into()), port: None },
        weight,
        headers: Default::default(),
    }
}

fn subsets() -> DestinationRule {
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

fn vs(http: Vec<HttpRoute>) -> VirtualService {
    VirtualService {
        name: "payment".into(),
        namespace: "default".into(),
        kind: Default::default(),
        hosts: vec![HOST.into()],
        http,
    }
}

fn prefix(p: &str) -> Vec<RequestMatch> {
    vec![RequestMatch { uri: Some(StringMatch::Prefix(p.into())), ..Default::default() }]
}

/// The demo's routing: `x-beta-user: true` to v2, everything else 95/5 between v1 and v2.
fn canary() -> Routing {
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

#[test]
fn canary_split_header_route_and_l7_policy_through_the_waypoint() {
    let mesh = Mesh::new(&[]);
    mesh.apply(canary());

    // 95/5: with 400 requests v2's count is about 20; the bounds are 3.5 standard deviations
    // wide, so this fails by chance less than once in a thousand runs.
    let split = load(&mesh.client, &url("/"), &["-n", "400", "-c", "4"]);
    assert_eq!(split.successes, 400, "{split:?}\n{}", mesh.waypoint.log());
    let v2 = split.versions.get("v2").copied().unwrap_or(0);
    assert!((5..=45).contains(&v2), "v2 got {v2} of 400 under a 95/5 split: {split:?}");
    assert_eq!(split.versions.get("v1").copied().unwrap_or(0) + v2, 400);

    let beta = load(&mesh.client, &url("/"), &["-n", "30", "-H", "x-beta-user: true"]);
    assert_eq!(beta.versions.get("v2"), Some(&30), "beta users must all reach the canary: {beta:?}");

    // HTTP/2 (prior knowledge) is routed the same way.
    let h2 = load(&mesh.client, &url("/"), &["-n", "30", "--http2", "-H", "x-beta-user: true"]);
    assert_eq!(h2.versions.get("v2"), Some(&30), "{h2:?}\n{}", mesh.waypoint.log());

    // L7 policy on the waypoint: only checkout may POST /api/v1/charge.
    let mut routing = canary();
    routing.authorizations = vec![L7Authorization {
        name: "charge-from-checkout".into(),
        namespace: "default".into(),
        targets: vec![PolicyTarget::Gateway("waypoint".into())],
        action: Action::Allow,
        rules: vec![L7Rule {
            from: vec![Source {
                principals: vec!["cluster.local/ns/default/sa/checkout".into()],
                ..Default::default()
            }],
            to: vec![Operation {
                methods: vec!["POST".into()],
                paths: vec!["/api/v1/charge".into()],
                ..Default::default()
            }],
            when: vec![],
        }],
    }];
    mesh.apply(routing);
    let vip80 = SocketAddr::new(vip(), 80);
    let charge = http(&mesh.client, vip80, "POST", "/api/v1/charge", &[]);
    assert_eq!(charge.status, 200, "{charge:?}");
    assert!(charge.body.contains("\"path\":\"/api/v1/charge\""), "{charge:?}");
    let read = http(&mesh.client, vip80, "GET", "/api/v1/charge", &[]);
    assert_eq!((read.status, read.body.as_str()), (403, "RBAC: access denied"));
    let legacy = http(&mesh.legacy, vip80, "POST", "/api/v1/charge", &[]);
    assert_eq!((legacy.status, legacy.body.as_str()), (403, "RBAC: access denied"));

    // The waypoint's own view: Istio metrics with identities and versions, access log lines.
    let m = mesh.waypoint.metrics();
    for want in [
        "istio_requests_total{reporter=\"waypoint\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/checkout\"",
        "destination_version=\"v2\"",
        "response_code=\"403\",grpc_response_status=\"\",response_flags=\"RBAC\"",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    let denied = mesh.waypoint.access_log().into_iter().find(|l| l["status"] == 403).expect("a 403 logged");
    assert!(denied["detail"].as_str().unwrap().contains("no ALLOW policy matched"), "{denied}");
    // The destination's ztunnel saw HBONE from the waypoint's identity, not the client's
    // (connections stay pooled, so its metrics show it before any access-log line would).
    let z1 = mesh.ztunnels[1].get_at("127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
    let from_waypoint = z1.lines().any(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("reporter=\"destination\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/waypoint\"")
    });
    assert!(from_waypoint, "no inbound HBONE from the waypoint at v1's ztunnel:\n{z1}");
}

/// One HTTP/2 (prior knowledge) connection from the client pod to payment, carrying POSTs of
/// `sizes` bytes concurrently, each with `headers`; returns each echo answer's status and JSON
/// body.
/// Runs `exchanges` with an HTTP/2 connection from `client` to the service's port 80.
fn over_http2<T, F>(client: &Pod, exchanges: impl FnOnce(h2::client::SendRequest<bytes::Bytes>) -> F) -> T
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
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        exchanges(sender).await
    })
}

fn http2_posts(client: &Pod, sizes: &[usize], headers: &[(&str, &str)]) -> Vec<(u16, serde_json::Value)> {
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
                let response = match response.await {
                    Ok(response) => response,
                    // Status 0: no response; the assertion prints why, with the waypoint's log.
                    Err(e) => return (0, serde_json::Value::String(e.to_string())),
                };
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
        });
        let exchanges: Vec<_> = exchanges.map(tokio::spawn).collect();
        let mut answers = Vec::new();
        for exchange in exchanges {
            answers.push(tokio::time::timeout(Duration::from_secs(20), exchange).await.unwrap().unwrap());
        }
        answers
    })
}

/// What a gRPC call came back with: the HTTP status and the `grpc-status`, from the headers
/// (a trailers-only answer) or the trailers.
#[derive(Debug, PartialEq)]
struct GrpcAnswer {
    http_status: u16,
    grpc_status: Option<String>,
    trailers_only: bool,
}

/// `calls` gRPC calls from `client`, one after another on one HTTP/2 connection.
fn grpc_calls(client: &Pod, calls: usize, headers: &[(&str, &str)]) -> Vec<GrpcAnswer> {
    let headers: Vec<(String, String)> =
        headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    over_http2(client, |sender| async move {
        let mut answers = Vec::new();
        for _ in 0..calls {
            let call = async {
                let mut sender = sender.clone().ready().await.unwrap();
                let mut request = http::Request::post(format!("http://{HOST}/payment.Payment/Charge"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
                for (name, value) in &headers {
                    request = request.header(name, value);
                }
                let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
                // One empty, uncompressed message.
                stream.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
                let response = response.await.unwrap();
                let http_status = response.status().as_u16();
                let in_headers =
                    response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_string());
                let mut body = response.into_body();
                while let Some(chunk) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.unwrap().len());
                }
                let trailers = body.trailers().await.unwrap();
                let in_trailers =
                    trailers.and_then(|t| t.get("grpc-status").map(|v| v.to_str().unwrap().to_string()));
                GrpcAnswer {
                    http_status,
                    trailers_only: in_headers.is_some(),
                    grpc_status: in_headers.or(in_trailers),
                }
            };
            answers.push(tokio::time::timeout(Duration::from_secs(20), call).await.unwrap());
        }
        answers
    })
}

#[test]
fn grpc_through_the_waypoint_with_istios_default_retries() {
    // v1 fails every call, as a pod going away would: UNAVAILABLE to gRPC, 503 to HTTP. No
    // VirtualService: the waypoint applies Istio's default retry policy (2 retries on
    // connect-failure, refused-stream, unavailable, cancelled, 503) and the retry goes to v2.
    let mesh = Mesh::new(&["--fail-fraction", "1"]);
    mesh.apply(Routing::default());
    let answers = grpc_calls(&mesh.client, 20, &[]);
    let ok = GrpcAnswer { http_status: 200, grpc_status: Some("0".into()), trailers_only: false };
    assert!(
        answers.iter().all(|a| *a == ok),
        "every call should end in grpc-status 0 in trailers: {answers:?}\n{}",
        mesh.waypoint.log()
    );
    let retried =
        |log: &[serde_json::Value]| log.iter().filter(|l| l["attempts"].as_u64().unwrap_or(1) > 1).count();
    let grpc_retried = retried(&mesh.waypoint.access_log());
    assert!(grpc_retried > 0, "v1 failed none of the calls?\n{}", mesh.waypoint.log());
    assert!(echo_stats(&mesh.v1)["requests"].as_u64().unwrap() >= grpc_retried as u64);

    // HTTP 503 is retried by default too.
    let summary = load(&mesh.client, &url("/"), &["-n", "20", "-c", "1", "--http2"]);
    assert_eq!(summary.successes, 20, "{summary:?}\n{}", mesh.waypoint.log());

    // A status outside the default conditions reaches the client after one attempt.
    let before = mesh.waypoint.access_log().len();
    let internal = grpc_calls(&mesh.client, 4, &[("x-echo-grpc-status", "13")]);
    let expected = GrpcAnswer { http_status: 200, grpc_status: Some("13".into()), trailers_only: true };
    assert!(internal.iter().all(|a| *a == expected), "{internal:?}");
    let log = mesh.waypoint.access_log();
    assert_eq!(retried(&log[before..]), 0, "INTERNAL is not among Istio's default conditions");

    // Istio's labels for gRPC: the protocol, and the status from the trailers of a streamed
    // answer or the headers of a trailers-only one (the client saw none of v1's failures, but
    // the metrics count answers to the client).
    let m = mesh.waypoint.metrics();
    let count = |status: &str| -> u64 {
        let want =
            format!("request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"{status}\"");
        m.lines()
            .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&want))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!((count("0"), count("13"), count("14")), (20, 4, 0), "{m}");
    assert!(m.contains("request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\""), "{m}");

    // What the waypoint answers itself is a gRPC error to a gRPC client, as Envoy's local
    // replies: an injected abort (503) is UNAVAILABLE, no matching route (404) UNIMPLEMENTED.
    let header_route = |name: &str, fault: Option<Fault>| HttpRoute {
        matches: vec![RequestMatch {
            headers: BTreeMap::from([(name.into(), StringMatch::Exact("yes".into()))]),
            ..Default::default()
        }],
        route: vec![to("v2", 100)],
        fault,
        ..Default::default()
    };
    let abort = |http_status, grpc_status| Fault {
        delay: None,
        abort: Some(FaultAbort { http_status, grpc_status, percentage: 100.0 }),
    };
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![
            header_route("x-abort", Some(abort(503, None))),
            // `grpcStatus: RESOURCE_EXHAUSTED`: the status itself; HTTP 200 to other requests.
            header_route("x-grpc-abort", Some(abort(200, Some(8)))),
            header_route("x-known", None),
        ])],
        destination_rules: vec![subsets()],
        authorizations: vec![],
    });
    let local =
        |code: &str| GrpcAnswer { http_status: 200, grpc_status: Some(code.into()), trailers_only: true };
    assert_eq!(grpc_calls(&mesh.client, 1, &[("x-abort", "yes")]), [local("14")]);
    assert_eq!(grpc_calls(&mesh.client, 1, &[("x-grpc-abort", "yes")]), [local("8")]);
    let plain = http(&mesh.client, SocketAddr::new(vip(), 80), "GET", "/", &[("x-grpc-abort", "yes")]);
    assert_eq!((plain.status, plain.body.as_str()), (200, "fault filter abort"));
    assert_eq!(grpc_calls(&mesh.client, 1, &[]), [local("12")]);
    let ok = GrpcAnswer { http_status: 200, grpc_status: Some("0".into()), trailers_only: false };
    assert_eq!(grpc_calls(&mesh.client, 1, &[("x-known", "yes")]), [ok]);
}

#[test]
fn http2_request_bodies_of_any_size_reach_the_upstream_whole() {
    let mesh = Mesh::new(&[]);
    mesh.apply(canary());
    // Empty, one byte, one frame, past the initial 64 KiB windows, and megabytes: all at once
    // on one downstream connection, so the waypoint's upstream streams share a connection too.
    let sizes = [0, 1, 16_384, 70_000, 1 << 20, 3 << 20];
    let answers = http2_posts(&mesh.client, &sizes, &[]);
    for (size, (status, echo)) in sizes.iter().zip(&answers) {
        assert_eq!(*status, 200, "POST of {size} bytes: {echo}\n{}", mesh.waypoint.log());
        assert_eq!(echo["bodyBytes"], *size as u64, "POST of {size} bytes arrived as {echo}");
        assert_eq!(echo["protocol"], "HTTP/2", "{echo}");
        assert_eq!(echo["method"], "POST", "{echo}");
        // As HTTP/1.1 upstreams get it, the length travels with the body.
        assert_eq!(echo["headers"]["content-length"], size.to_string(), "{echo}");
    }
    // gRPC's `te: trailers` is the one `te` forwarded; the other hop-by-hop headers stay behind.
    let (status, echo) = http2_posts(&mesh.client, &[1], &[("te", "trailers")]).remove(0);
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["te"], "trailers", "{echo}");
}

/// How many of `answers` each upstream connection carried, by the TCP peer the echo server saw
/// (each upstream connection reaches it as a connection of its own from its ztunnel).
fn requests_per_upstream_connection(answers: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut per_peer = BTreeMap::new();
    for echo in answers {
        let peer = echo["peer"].as_str().unwrap_or_else(|| panic!("no peer in {echo}"));
        *per_peer.entry(peer.to_string()).or_insert(0) += 1;
    }
    per_peer
}

#[test]
fn max_requests_per_connection_retires_upstream_connections_of_both_protocols() {
    let mesh = Mesh::new(&[]);
    let beta = [("x-beta-user", "true")];
    let http1 = |mesh: &Mesh| -> Vec<serde_json::Value> {
        (0..12)
            .map(|_| {
                let r = http(&mesh.client, SocketAddr::new(vip(), 80), "GET", "/", &beta);
                assert_eq!(r.status, 200, "{r:?}");
                serde_json::from_str(&r.body).unwrap()
            })
            .collect()
    };
    let http2 = |mesh: &Mesh| -> Vec<serde_json::Value> {
        (0..12)
            .map(|_| {
                let (status, echo) = http2_posts(&mesh.client, &[0], &beta).remove(0);
                assert_eq!(status, 200, "{echo}");
                echo
            })
            .collect()
    };

    // Without a limit, one pooled connection to v2 carries every request of a protocol.
    mesh.apply(canary());
    for (protocol, answers) in [("HTTP/1.1", http1(&mesh)), ("HTTP/2", http2(&mesh))] {
        let per_connection = requests_per_upstream_connection(&answers);
        assert_eq!(
            per_connection.len(),
            1,
            "{protocol} upstream connections were not reused: {per_connection:?}"
        );
    }

    // maxRequestsPerConnection 2: twelve requests in sequence need six connections.
    let mut routing = canary();
    routing.destination_rules[0].traffic_policy.connection_pool =
        Some(ConnectionPool { max_requests_per_connection: Some(2), ..Default::default() });
    mesh.apply(routing);
    for (protocol, answers) in [("HTTP/1.1", http1(&mesh)), ("HTTP/2", http2(&mesh))] {
        let per_connection = requests_per_upstream_connection(&answers);
        assert!(
            per_connection.len() == 6 && per_connection.values().all(|&n| n == 2),
            "{protocol}: requests per upstream connection under maxRequestsPerConnection 2: {per_connection:?}\n{}",
            mesh.waypoint.log()
        );
    }
}

#[test]
fn http2_requests_past_a_stream_limit_open_more_upstream_connections() {
    // v1 allows two streams per HTTP/2 connection. Eight slow requests at once, after one that
    // leaves a pooled connection: that one takes two, and the rest go on new connections
    // instead of queueing behind its streams (as Envoy does).
    let mesh = Mesh::new(&["--http2-max-concurrent-streams", "2"]);
    let to_v1 = || HttpRoute { route: vec![to("v1", 100)], ..Default::default() };
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![to_v1()])],
        destination_rules: vec![subsets()],
        authorizations: vec![],
    });
    let (status, warm) = http2_posts(&mesh.client, &[0], &[]).remove(0);
    assert_eq!(status, 200, "{warm}");
    let answers = http2_posts(&mesh.client, &[0; 8], &[("x-echo-delay-ms", "700")]);
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}\n{}", mesh.waypoint.log());
    let echoes: Vec<serde_json::Value> = answers.into_iter().map(|(_, echo)| echo).collect();
    let per_connection = requests_per_upstream_connection(&echoes);
    assert!(
        per_connection.len() >= 4 && per_connection.values().all(|&n| n <= 2),
        "requests per upstream connection with 2 streams each: {per_connection:?}\n{}",
        mesh.waypoint.log()
    );

    // A DestinationRule's `maxConcurrentStreams` below the server's: one stream each.
    let mut rule = subsets();
    rule.subsets[0].traffic_policy = Some(TrafficPolicy {
        connection_pool: Some(ConnectionPool { max_concurrent_streams: Some(1), ..Default::default() }),
        ..Default::default()
    });
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![to_v1()])],
        destination_rules: vec![rule],
        authorizations: vec![],
    });
    let answers = http2_posts(&mesh.client, &[0; 4], &[("x-echo-delay-ms", "700")]);
    let echoes: Vec<serde_json::Value> = answers.into_iter().map(|(_, echo)| echo).collect();
    let per_connection = requests_per_upstream_connection(&echoes);
    assert!(
        per_connection.len() == 4 && per_connection.values().all(|&n| n == 1),
        "requests per upstream connection under maxConcurrentStreams 1: {per_connection:?}\n{}",
        mesh.waypoint.log()
    );
}

#[test]
fn upstream_connections_idle_past_the_rules_idle_timeout_are_closed() {
    let mesh = Mesh::new(&[]);
    let mut routing = canary();
    routing.destination_rules[0].traffic_policy.connection_pool =
        Some(ConnectionPool { idle_timeout_ms: Some(1_000), ..Default::default() });
    mesh.apply(routing);
    let beta = [("x-beta-user", "true")];
    let http1 = || {
        let r = http(&mesh.client, SocketAddr::new(vip(), 80), "GET", "/", &beta);
        assert_eq!(r.status, 200, "{r:?}");
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["peer"].to_string()
    };
    let http2 = || {
        let (status, echo) = http2_posts(&mesh.client, &[0], &beta).remove(0);
        assert_eq!(status, 200, "{echo}");
        echo["peer"].to_string()
    };
    // Back to back, a request reuses the pooled connection; after 2.5 s unused (idleTimeout
    // 1s, swept every second) it is gone and the next request opens another.
    let (first_h1, first_h2) = (http1(), http2());
    assert_eq!(http1(), first_h1, "HTTP/1.1 connection not reused while fresh");
    assert_eq!(http2(), first_h2, "HTTP/2 connection not reused while fresh");
    std::thread::sleep(Duration::from_millis(2_500));
    assert_ne!(http1(), first_h1, "HTTP/1.1 connection outlived its idleTimeout");
    assert_ne!(http2(), first_h2, "HTTP/2 connection outlived its idleTimeout");
}

#[test]
fn max_connections_leaves_no_endpoint_without_a_connection() {
    // One connection for the whole service, round robin over v1 and v2: the connection kept
    // idle for one endpoint must make way for the other's, request after request, in both
    // protocols (else a request waits forever for a connection that never frees).
    let mesh = Mesh::new(&[]);
    let mut rule = subsets();
    rule.traffic_policy = TrafficPolicy {
        load_balancer: Some(LoadBalancer::Simple(SimpleLb::RoundRobin)),
        connection_pool: Some(ConnectionPool { max_connections: Some(1), ..Default::default() }),
        ..Default::default()
    };
    let whole_service = HttpRoute {
        route: vec![RouteDestination {
            destination: Destination { host: HOST.into(), subset: None, port: None },
            weight: 100,
            headers: Default::default(),
        }],
        // A stuck request fails the test in seconds rather than hanging it.
        timeout_ms: Some(5_000),
        ..Default::default()
    };
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![whole_service])],
        destination_rules: vec![rule],
        authorizations: vec![],
    });
    let mut versions = BTreeMap::new();
    for _ in 0..6 {
        let r = http(&mesh.client, SocketAddr::new(vip(), 80), "GET", "/", &[]);
        assert_eq!(r.status, 200, "{r:?}\n{}", mesh.waypoint.log());
        *versions.entry(r.header("x-echo-version").unwrap_or("none").to_string()).or_insert(0) += 1;
        let (status, echo) = http2_posts(&mesh.client, &[0], &[]).remove(0);
        assert_eq!(status, 200, "{echo}\n{}", mesh.waypoint.log());
        *versions.entry(echo["version"].as_str().unwrap_or("none").to_string()).or_insert(0) += 1;
    }
    assert_eq!(versions.get("v1"), Some(&6), "{versions:?}");
    assert_eq!(versions.get("v2"), Some(&6), "{versions:?}");
}

#[test]
fn retries_timeouts_faults_rewrites_and_misconfigured_routes() {
    // v1 fails every other request, deterministically.
    let mesh = Mesh::new(&["--fail-fraction", "0.5"]);
    let only = |subset: &str| vec![to(subset, 100)];
    let routes = vec![
        HttpRoute {
            matches: prefix("/flaky"),
            route: only("v1"),
            retries: Some(Retries { attempts: 3, per_try_timeout_ms: None, retry_on: vec!["5xx".into()] }),
            ..Default::default()
        },
        HttpRoute { matches: prefix("/plain"), route: only("v1"), ..Default::default() },
        HttpRoute {
            matches: prefix("/slow"),
            route: only("v2"),
            timeout_ms: Some(300),
            ..Default::default()
        },
        HttpRoute {
            matches: prefix("/fault"),
            route: only("v2"),
            fault: Some(Fault {
                delay: None,
                abort: Some(FaultAbort { http_status: 418, grpc_status: None, percentage: 100.0 }),
            }),
            ..Default::default()
        },
        HttpRoute {
            name: Some("ghost".into()),
            matches: prefix("/ghost"),
            route: only("v9"),
            ..Default::default()
        },
        HttpRoute {
            matches: prefix("/direct"),
            direct_response: Some(DirectResponse {
                status: 200,
                body: Some("hello from the waypoint".into()),
            }),
            ..Default::default()
        },
        HttpRoute {
            matches: prefix("/old"),
            redirect: Some(Redirect { uri: Some("/new".into()), redirect_code: 301, ..Default::default() }),
            ..Default::default()
        },
        HttpRoute {
            matches: prefix("/legacy-api/"),
            rewrite: Some(Rewrite { uri: Some("/api/".into()), ..Default::default() }),
            route: vec![RouteDestination {
                headers: Headers {
                    request: HeaderOperations {
                        set: BTreeMap::from([("x-routed-by".into(), "waypoint".into())]),
                        ..Default::default()
                    },
                    response: HeaderOperations {
                        add: BTreeMap::from([("x-served-by".into(), "warren".into())]),
                        ..Default::default()
                    },
                },
                ..to("v2", 100)
            }],
            ..Default::default()
        },
        HttpRoute { matches: prefix("/cb"), route: only("v2"), ..Default::default() },
    ];
    let mut rule = subsets();
    // Circuit breaking on v2: one connection, one waiting request; the rest overflow.
    rule.subsets[1].traffic_policy = Some(TrafficPolicy {
        connection_pool: Some(ConnectionPool {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    });
    mesh.apply(Routing {
        virtual_services: vec![vs(routes)],
        destination_rules: vec![rule],
        authorizations: vec![],
    });
    let vip80 = SocketAddr::new(vip(), 80);

    let flaky = load(&mesh.client, &url("/flaky"), &["-n", "20"]);
    assert_eq!(flaky.successes, 20, "retries must hide v1's failures: {flaky:?}");
    let plain = load(&mesh.client, &url("/plain"), &["-n", "20"]);
    assert_eq!(plain.status.get(&503), Some(&10), "without retries half fail: {plain:?}");
    let retried =
        mesh.waypoint.access_log().into_iter().filter(|l| l["attempts"].as_u64() == Some(2)).count();
    assert!(retried >= 5, "retries not visible in the access log");

    let started = Instant::now();
    let slow = http(&mesh.client, vip80, "GET", "/slow", &[("x-echo-delay-ms", "3000")]);
    assert_eq!((slow.status, slow.body.as_str()), (504, "upstream request timeout"));
    assert!(started.elapsed() < Duration::from_millis(2500), "the route timeout did not cut the request");

    assert_eq!(http(&mesh.client, vip80, "GET", "/fault", &[]).status, 418);

    let ghost = http(&mesh.client, vip80, "GET", "/ghost", &[]);
    assert_eq!(ghost.status, 503);
    let log = mesh.waypoint.access_log().into_iter().find(|l| l["path"] == "/ghost").expect("ghost logged");
    assert_eq!(log["response_flags"], "NR");
    let detail = log["detail"].as_str().unwrap();
    assert!(detail.contains("VirtualService default/payment") && detail.contains("\"v9\""), "{detail}");

    let direct = http(&mesh.client, vip80, "GET", "/direct", &[]);
    assert_eq!((direct.status, direct.body.as_str()), (200, "hello from the waypoint"));
    let old = http(&mesh.client, vip80, "GET", "/old/page", &[]);
    assert_eq!(old.status, 301);
    // Istio's redirect.uri replaces the whole path.
    assert_eq!(old.header("location"), Some(format!("http://{vip80}/new").as_str()), "{old:?}");

    let rewritten = http(&mesh.client, vip80, "GET", "/legacy-api/charge?id=7", &[]);
    assert_eq!(rewritten.status, 200, "{rewritten:?}");
    assert!(rewritten.body.contains("\"path\":\"/api/charge?id=7\""), "{rewritten:?}");
    assert!(rewritten.body.contains("\"x-routed-by\":\"waypoint\""), "{rewritten:?}");
    assert_eq!(rewritten.header("x-served-by"), Some("warren"));

    let burst = load(&mesh.client, &url("/cb"), &["-n", "6", "-c", "6", "-H", "x-echo-delay-ms: 500"]);
    let overflowed = burst.status.get(&503).copied().unwrap_or(0);
    assert!(overflowed >= 1 && burst.successes >= 1, "{burst:?}");
    let uo = mesh.waypoint.access_log().into_iter().filter(|l| l["response_flags"] == "UO").count();
    assert_eq!(uo as u64, overflowed, "every overflow is flagged UO");
}

/// The canary routing, greeting/echo servers on both versions' TCP port, and a client
/// connection to the service's port 90 through the waypoint that has had its greeting. The
/// protocol is server-first: the waypoint sees no client bytes, waits out its sniffing window,
/// then passes the stream through to an endpoint.
fn tcp_through_the_waypoint(mesh: &Mesh) -> (Client, [Server; 2]) {
    mesh.apply(canary());
    let servers = [Server::start(&mesh.v1, TCP_APP_PORT), Server::start(&mesh.v2, TCP_APP_PORT)];
    let mut c =
        Client::connect(&mesh.client, SocketAddr::new(vip(), 90)).expect("connect through the waypoint");
    c.greeting().expect("the server's greeting came through");
    (c, servers)
}

#[test]
fn non_http_traffic_passes_through_the_waypoint_as_tcp() {
    let mesh = Mesh::new(&[]);
    let (mut c, _servers) = tcp_through_the_waypoint(&mesh);
    assert_eq!(c.echo("raw bytes").unwrap(), "raw bytes");
    drop(c);
    let passed = wait_until(Duration::from_secs(5), || {
        mesh.waypoint
            .access_log()
            .iter()
            .any(|l| l["protocol"] == "TCP" && l["service"] == HOST && l["error"] == "")
    });
    assert!(passed, "no TCP passthrough logged:\n{}", mesh.waypoint.log());
}

/// DestinationRule `portLevelSettings`: the policy of the port a request arrives on. Port 80
/// (HTTP) round-robins across v1 and v2 while the rule's own policy, hashing on the source IP,
/// keeps every TCP connection to port 90 on one endpoint; either half fails if the port-level
/// entry were ignored or applied to every port.
#[test]
fn port_level_settings_apply_to_their_port_only() {
    let mesh = Mesh::new(&[]);
    let _tcp_v1 = Server::start(&mesh.v1, TCP_APP_PORT);
    let _tcp_v2 = Server::start(&mesh.v2, TCP_APP_PORT);
    let mut rule = subsets();
    rule.traffic_policy = TrafficPolicy {
        load_balancer: Some(LoadBalancer::ConsistentHash(HashKey::UseSourceIp)),
        port_level: vec![PortTrafficPolicy {
            port: 80,
            load_balancer: Some(LoadBalancer::Simple(SimpleLb::RoundRobin)),
            connection_pool: None,
            outlier_detection: None,
        }],
        ..Default::default()
    };
    mesh.apply(Routing { virtual_services: vec![], destination_rules: vec![rule], authorizations: vec![] });

    let http = load(&mesh.client, &url("/port-level"), &["-n", "20", "-c", "1"]);
    assert_eq!(http.successes, 20, "{http:?}");
    for _ in 0..8 {
        let mut c = Client::connect(&mesh.client, SocketAddr::new(vip(), 90)).expect("connect to port 90");
        c.greeting().expect("the server's greeting");
        assert_eq!(c.echo("which endpoint").unwrap(), "which endpoint");
    }
    let upstreams = |pick: &dyn Fn(&serde_json::Value) -> bool| -> std::collections::BTreeSet<String> {
        mesh.waypoint
            .access_log()
            .iter()
            .filter(|l| pick(l))
            .map(|l| l["upstream"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let over_http = upstreams(&|l| l["path"] == "/port-level");
    assert_eq!(over_http.len(), 2, "port 80 round-robins over v1 and v2: {over_http:?}");
    let tcp_logged = wait_until(Duration::from_secs(5), || {
        mesh.waypoint.access_log().iter().filter(|l| l["protocol"] == "TCP").count() == 8
    });
    assert!(tcp_logged, "eight TCP connections logged:\n{}", mesh.waypoint.log());
    let over_tcp = upstreams(&|l| l["protocol"] == "TCP");
    assert_eq!(over_tcp.len(), 1, "port 90 keeps the rule's source-IP hash: {over_tcp:?}");
}

/// The seed scenario's DestinationRule: stable = v1 (LEAST_CONN), canary = v2 (ROUND_ROBIN,
/// two connections and two waiting requests at most: the split's 4 clients never overflow it,
/// a burst of 8 does), outlier detection for the service.
fn seed_destination_rule() -> DestinationRule {
    let mut rule = subsets();
    rule.subsets[0].name = "stable".into();
    rule.subsets[0].traffic_policy = Some(TrafficPolicy {
        load_balancer: Some(LoadBalancer::Simple(SimpleLb::LeastRequest)),
        ..Default::default()
    });
    rule.subsets[1].name = "canary".into();
    rule.subsets[1].traffic_policy = Some(TrafficPolicy {
        load_balancer: Some(LoadBalancer::Simple(SimpleLb::RoundRobin)),
        connection_pool: Some(ConnectionPool {
            max_connections: Some(2),
            http1_max_pending_requests: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    });
    rule.traffic_policy.outlier_detection = Some(OutlierDetection {
        consecutive_5xx_errors: Some(5),
        consecutive_gateway_errors: None,
        interval_ms: 1000,
        base_ejection_time_ms: 30_000,
        max_ejection_percent: 10,
        min_health_percent: 0,
    });
    rule
}

/// The seed scenario's VirtualService: beta users to the canary with a 50 ms delay on 10 %;
/// everyone else 95/5 stable/canary; retries 3 × 2 s on gateway-error, connect-failure,
/// retriable-4xx. `extra` routes come first.
fn seed_routing(extra: Vec<HttpRoute>) -> Routing {
    let retries = Retries {
        attempts: 3,
        per_try_timeout_ms: Some(2000),
        retry_on: vec!["gateway-error".into(), "connect-failure".into(), "retriable-4xx".into()],
    };
    let beta = HttpRoute {
        name: Some("beta".into()),
        matches: vec![RequestMatch {
            headers: BTreeMap::from([("x-beta-user".into(), StringMatch::Exact("true".into()))]),
            ..Default::default()
        }],
        route: vec![to("canary", 100)],
        fault: Some(Fault { delay: Some(FaultDelay { fixed_delay_ms: 50, percentage: 10.0 }), abort: None }),
        retries: Some(retries.clone()),
        ..Default::default()
    };
    let split = HttpRoute {
        name: Some("split".into()),
        route: vec![to("stable", 95), to("canary", 5)],
        retries: Some(retries),
        ..Default::default()
    };
    let mut http = extra;
    http.extend([beta, split]);
    Routing {
        virtual_services: vec![vs(http)],
        destination_rules: vec![seed_destination_rule()],
        authorizations: vec![],
    }
}

fn echo_stats(pod: &Pod) -> serde_json::Value {
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

#[test]
fn seed_scenario_split_beta_delays_mirrors_pool_limits_and_traces() {
    let mesh = Mesh::with(Options { tracing: true, ..Default::default() });
    let mirror = HttpRoute {
        matches: prefix("/mirror"),
        route: vec![to("stable", 100)],
        mirrors: vec![Mirror {
            destination: Destination { host: HOST.into(), subset: Some("canary".into()), port: None },
            percentage: 100.0,
        }],
        ..Default::default()
    };
    let chain = HttpRoute { matches: prefix("/chain"), route: vec![to("stable", 100)], ..Default::default() };
    mesh.apply(seed_routing(vec![mirror, chain]));

    // 95/5 over 2,000 requests: inside the binomial 99.9 % interval (68..=132).
    let split = load(&mesh.client, &url("/"), &["-n", "2000", "-c", "4"]);
    assert_eq!(split.successes, 2000, "{split:?}");
    let canary = split.versions.get("v2").copied().unwrap_or(0);
    assert!((68..=132).contains(&canary), "canary got {canary} of 2000");

    // Beta users: all to the canary, about 10 % delayed by 50 ms (binomial 99.9 %: 6..=34 of 200).
    let beta = load(&mesh.client, &url("/beta"), &["-n", "200", "-H", "x-beta-user: true"]);
    assert_eq!(beta.versions.get("v2"), Some(&200), "{beta:?}");
    let delayed = mesh
        .waypoint
        .access_log()
        .iter()
        .filter(|l| l["path"] == "/beta" && l["response_flags"].as_str().is_some_and(|f| f.contains("DI")))
        .count();
    assert!((6..=34).contains(&delayed), "{delayed} of 200 beta requests delayed");

    // Mirrors: every /mirror request is copied to the canary, authority suffixed -shadow.
    let mirrored = load(&mesh.client, &url("/mirror"), &["-n", "20"]);
    assert_eq!(mirrored.versions.get("v1"), Some(&20), "the main requests stay on stable: {mirrored:?}");
    let shadow = format!("{}-shadow", vip());
    let copies = wait_until(Duration::from_secs(5), || echo_stats(&mesh.v2)["byAuthority"][&shadow] == 20);
    assert!(copies, "the canary did not get 20 mirrored copies: {}", echo_stats(&mesh.v2));

    // Pool limits on the canary: 2 connections, 2 waiting; 8 slow requests at once overflow.
    let burst = load(
        &mesh.client,
        &url("/"),
        &["-n", "8", "-c", "8", "-H", "x-beta-user: true", "-H", "x-echo-delay-ms: 400"],
    );
    let overflow = burst.status.get(&503).copied().unwrap_or(0);
    assert!(overflow >= 1 && burst.successes >= 2, "{burst:?}");
    assert!(mesh.waypoint.access_log().iter().any(|l| l["response_flags"] == "UO"));

    // Traces: one trace id across two hops when the application forwards the headers. The
    // client's span is the parent of the first hop, whose span is the parent of the second.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let call = format!("http://{}:80/leaf", ledger_vip());
    let r = http(
        &mesh.client,
        SocketAddr::new(vip(), 80),
        "GET",
        "/chain",
        &[("traceparent", &format!("00-{trace_id}-{client_span}-01")), ("x-echo-call", &call)],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let collector = mesh.collector.as_ref().unwrap();
    let spans_of_trace =
        || collector.spans().into_iter().filter(|s| s["traceId"] == trace_id).collect::<Vec<_>>();
    assert!(
        wait_until(Duration::from_secs(5), || spans_of_trace().len() == 2),
        "spans: {:?}",
        collector.spans()
    );
    let spans = spans_of_trace();
    let first = spans.iter().find(|s| s["parentSpanId"] == client_span).expect("the first hop's span");
    let second = spans.iter().find(|s| s["parentSpanId"] == first["spanId"]).expect("the second hop's span");
    assert!(second["name"].as_str().unwrap().starts_with("ledger.default.svc.cluster.local:80"), "{second}");
    // The leaf application saw the same trace, in both header styles.
    let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let leaf: serde_json::Value = serde_json::from_str(body["call"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(leaf["headers"]["x-b3-traceid"], trace_id);
    assert_eq!(leaf["headers"]["x-b3-parentspanid"], first["spanId"]);

    // Metrics carry the sizes too.
    let m = mesh.waypoint.metrics();
    for name in [
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
        "istio_request_duration_milliseconds_bucket",
    ] {
        assert!(m.contains(name), "no {name}");
    }
}

#[test]
fn seed_scenario_retries_timeouts_and_outlier_detection() {
    // v1 fails two requests in three; ledger has a second endpoint that fails everything.
    let mesh = Mesh::with(Options {
        v1_echo_args: &["--fail-fraction", "0.666667"],
        bad_ledger_endpoint: true,
        ..Default::default()
    });
    let canary_route = |path: &str, timeout_ms: Option<u64>, retries: Option<Retries>| HttpRoute {
        matches: prefix(path),
        route: vec![to("canary", 100)],
        timeout_ms,
        retries,
        ..Default::default()
    };
    let mut routing = seed_routing(vec![
        canary_route(
            "/per-try",
            Some(5000),
            Some(Retries {
                attempts: 2,
                per_try_timeout_ms: Some(200),
                retry_on: vec!["gateway-error".into()],
            }),
        ),
        canary_route("/timeout", Some(300), None),
    ]);
    // The failures this test provokes on the canary's one endpoint must not eject it.
    if let Some(od) = routing.destination_rules[0].traffic_policy.outlier_detection.as_mut() {
        od.consecutive_5xx_errors = Some(20);
    }
    routing.destination_rules.push(DestinationRule {
        name: "ledger".into(),
        namespace: "default".into(),
        host: "ledger.default.svc.cluster.local".into(),
        traffic_policy: TrafficPolicy {
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: Some(2),
                consecutive_gateway_errors: None,
                interval_ms: 500,
                base_ejection_time_ms: 2000,
                max_ejection_percent: 100,
                min_health_percent: 0,
            }),
            ..Default::default()
        },
        subsets: vec![],
    });
    // A ledger route without retries (Istio's `attempts: 0`), so that the client sees each
    // failure the ejection counts: with no route at all, Istio's default policy would retry
    // them on the good endpoint.
    const LEDGER: &str = "ledger.default.svc.cluster.local";
    routing.virtual_services.push(VirtualService {
        name: "ledger".into(),
        hosts: vec![LEDGER.into()],
        http: vec![HttpRoute {
            route: vec![RouteDestination {
                destination: Destination { host: LEDGER.into(), subset: None, port: None },
                weight: 100,
                headers: Default::default(),
            }],
            retries: None,
            ..Default::default()
        }],
        ..vs(vec![])
    });
    mesh.apply(routing);

    // Retries recover from a backend that fails two requests in three...
    let stable = load(&mesh.client, &url("/"), &["-n", "30", "-H", "x-beta-user: false"]);
    let through_v1 = mesh
        .waypoint
        .access_log()
        .iter()
        .filter(|l| l["upstream_cluster"].as_str().is_some_and(|c| c.contains("|stable|")))
        .count();
    assert!(through_v1 > 0);
    assert_eq!(stable.successes, 30, "retries did not hide v1's failures: {stable:?}");
    // ...and give up after the attempts, with the last error.
    let vip80 = SocketAddr::new(vip(), 80);
    let doomed =
        http(&mesh.client, vip80, "GET", "/doomed", &[("x-echo-status", "503"), ("x-beta-user", "true")]);
    assert_eq!(doomed.status, 503);
    let log = mesh.waypoint.access_log().into_iter().find(|l| l["path"] == "/doomed").unwrap();
    assert_eq!(log["attempts"], 4, "{log}");
    assert!(log["response_flags"].as_str().unwrap().contains("URX"), "{log}");

    // perTryTimeout: each of 3 tries cut at 200 ms; the route timeout: the whole at 300 ms.
    let started = Instant::now();
    let per_try = http(&mesh.client, vip80, "GET", "/per-try", &[("x-echo-delay-ms", "1000")]);
    let took = started.elapsed();
    let log = mesh.waypoint.access_log().into_iter().find(|l| l["path"] == "/per-try").unwrap();
    assert_eq!(per_try.status, 504, "{log}");
    assert!(took >= Duration::from_millis(600) && took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(log["attempts"], 3, "{log}");
    let started = Instant::now();
    let timed_out = http(&mesh.client, vip80, "GET", "/timeout", &[("x-echo-delay-ms", "3000")]);
    assert_eq!((timed_out.status, timed_out.body.as_str()), (504, "upstream request timeout"));
    assert!(started.elapsed() < Duration::from_millis(2000), "{:?}", started.elapsed());

    // Outlier detection: the failing ledger endpoint is ejected after 2 consecutive 5xx...
    let ledger_url = format!("http://{}:80/", ledger_vip());
    let first = load(&mesh.client, &ledger_url, &["-n", "20"]);
    let failures = first.status.get(&503).copied().unwrap_or(0);
    assert!((1..=3).contains(&failures), "{first:?}");
    let after = load(&mesh.client, &ledger_url, &["-n", "10"]);
    assert_eq!(after.successes, 10, "the failing endpoint was not ejected: {after:?}");
    let ejected = |m: &Mesh| {
        m.waypoint.config_dump()["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["ejectedEndpoints"].as_array().cloned().unwrap_or_default())
            .count()
    };
    assert_eq!(ejected(&mesh), 1);
    // ...and restored after baseEjectionTime.
    assert!(wait_until(Duration::from_secs(5), || ejected(&mesh) == 0), "never restored");
    let again = load(&mesh.client, &ledger_url, &["-n", "4"]);
    assert!(
        again.status.get(&503).copied().unwrap_or(0) >= 1,
        "the restored endpoint got no traffic: {again:?}"
    );
}

/// A DestinationRule's `connectionPool.tcp.connectTimeout`: with v2's node dropping its
/// packets (v2's address pointed at a MAC no one has), a request routed to v2 is answered 503
/// `UF` once the rule's bound is up, naming it — not after the waypoint's default 10 s.
#[test]
fn a_destination_rules_connect_timeout_bounds_the_upstream_dial() {
    let mesh = Mesh::new(&[]);
    let mut rule = subsets();
    rule.subsets[1].traffic_policy = Some(TrafficPolicy {
        connection_pool: Some(ConnectionPool { connect_timeout_ms: Some(300), ..Default::default() }),
        ..Default::default()
    });
    let to_v2 = HttpRoute { matches: prefix("/v2"), route: vec![to("v2", 100)], ..Default::default() };
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![to_v2])],
        destination_rules: vec![rule],
        authorizations: vec![],
    });
    // Before any request: no connection to v2 is pooled yet.
    let v2 = mesh.v2.ipv4.to_string();
    mesh._cluster.nodes[0].ns.ip(&[
        "neigh",
        "replace",
        &v2,
        "lladdr",
        "02:00:5e:00:00:99",
        "dev",
        "br0",
        "nud",
        "permanent",
    ]);
    let started = Instant::now();
    let answer = http(&mesh.client, SocketAddr::new(vip(), 80), "GET", "/v2", &[]);
    let took = started.elapsed();
    assert_eq!(answer.status, 503, "{answer:?}");
    let log = mesh.waypoint.access_log().into_iter().find(|l| l["path"] == "/v2").expect("logged");
    assert_eq!(log["response_flags"], "UF", "{log}");
    let detail = log["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("connectionPool.tcp.connectTimeout"), "{detail}");
    // The waypoint's own bound (10 s) is what would end it without the rule's.
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
}

/// `--idle-timeout-secs`: a keep-alive connection with no request in flight is closed after
/// the bound, while a request that takes longer than the bound is answered in full.
#[test]
fn idle_downstream_connections_are_closed_but_long_requests_are_not() {
    let mesh = Mesh::with(Options { waypoint_args: &["--idle-timeout-secs", "1"], ..Default::default() });
    let slow = HttpRoute {
        matches: prefix("/slow"),
        route: vec![to("v1", 100)],
        fault: Some(Fault {
            delay: Some(FaultDelay { fixed_delay_ms: 2500, percentage: 100.0 }),
            abort: None,
        }),
        ..Default::default()
    };
    let rest = HttpRoute { route: vec![to("v1", 100)], ..Default::default() };
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![slow, rest])],
        destination_rules: vec![subsets()],
        authorizations: vec![],
    });
    let addr = SocketAddr::new(vip(), 80);
    let (slow_answer, idle_closed_after) = mesh.client.ns.run(move || {
        use std::io::{Read, Write};
        // Reads one response: its head, then as many body bytes as content-length says.
        fn response(s: &mut std::net::TcpStream) -> String {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        return text;
                    }
                }
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return text,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        }
        let request = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // 2.5 s in flight on a connection whose idle bound is 1 s.
        s.write_all(request("/slow").as_bytes()).unwrap();
        let slow = response(&mut s);
        // Then nothing: the waypoint closes the connection about a second later.
        let idle_from = Instant::now();
        let mut buf = [0u8; 64];
        let closed = matches!(s.read(&mut buf), Ok(0));
        (slow, closed.then(|| idle_from.elapsed()))
    });
    assert!(slow_answer.starts_with("HTTP/1.1 200"), "{slow_answer}\n{}", mesh.waypoint.log());
    let after = idle_closed_after
        .unwrap_or_else(|| panic!("the idle connection was not closed:\n{}", mesh.waypoint.log()));
    assert!(after >= Duration::from_millis(700) && after < Duration::from_secs(5), "closed after {after:?}");

    // HTTP/2 the same: the slow request holds its connection; idle, the waypoint sends GOAWAY
    // and closes it about a second later while the client still holds it open.
    let tcp = mesh
        .client
        .ns
        .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap();
    tcp.set_nonblocking(true).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, idle_closed_after) = rt.block_on(async move {
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = http::Request::get(format!("http://{HOST}/slow")).body(()).unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        let status = response.status().as_u16();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk.unwrap().len());
        }
        let idle_from = Instant::now();
        // `sender` stays alive: the client alone would never close the connection.
        let closed = tokio::time::timeout(Duration::from_secs(10), connection).await.is_ok();
        drop(sender);
        (status, closed.then(|| idle_from.elapsed()))
    });
    assert_eq!(status, 200, "{}", mesh.waypoint.log());
    let after = idle_closed_after
        .unwrap_or_else(|| panic!("the idle HTTP/2 connection was not closed:\n{}", mesh.waypoint.log()));
    assert!(
        after >= Duration::from_millis(700) && after < Duration::from_secs(5),
        "HTTP/2 closed after {after:?}"
    );
}

/// `--idle-timeout-secs` on TCP passthrough (Envoy's `tcp_proxy` `idle_timeout`): a stream
/// that keeps moving bytes outlives the bound; once silent for it, both ends are closed and
/// the access log says why, with the bytes that had moved.
#[test]
fn idle_tcp_passthrough_is_closed_but_a_busy_one_is_not() {
    use std::io::Read;
    let mesh = Mesh::with(Options { waypoint_args: &["--idle-timeout-secs", "1"], ..Default::default() });
    let (mut c, _servers) = tcp_through_the_waypoint(&mesh);
    // An exchange every 400 ms for 2.4 s: never a second without bytes.
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        let ping = format!("ping {i}");
        assert_eq!(c.echo(&ping).unwrap_or_default(), ping, "{}", mesh.waypoint.log());
    }
    // Then silence: the waypoint closes the stream about a second later.
    let idle_from = Instant::now();
    c.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = c.stream.read(&mut [0u8; 64]);
    let after = idle_from.elapsed();
    let closed = matches!(read, Ok(0))
        || read.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(closed, "{read:?} after {after:?}: not closed\n{}", mesh.waypoint.log());
    assert!(after >= Duration::from_millis(700) && after < Duration::from_secs(5), "closed after {after:?}");
    let logged = wait_until(Duration::from_secs(5), || {
        mesh.waypoint.access_log().iter().any(|l| {
            l["protocol"] == "TCP"
                && l["error"].as_str().is_some_and(|e| e.contains("--idle-timeout-secs"))
                && l["bytes_received"].as_u64().is_some_and(|n| n >= 6 * "ping 0\n".len() as u64)
        })
    });
    assert!(logged, "no idle close with its byte counts logged:\n{}", mesh.waypoint.log());
}
