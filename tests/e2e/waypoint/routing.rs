//! VirtualService routing, L7 policy, retries, timeouts, faults and rewrites; port-level
//! DestinationRule settings; what is not HTTP passing through as TCP.

use crate::mesh::*;

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
            matches: prefix("/nothing"),
            // A 204 goes without its body: hyper never reads it, and no client left early.
            direct_response: Some(DirectResponse { status: 204, body: Some("dropped".into()) }),
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
    // HEAD: hyper reads no body of the answer, which is not the client leaving early (DC).
    assert_eq!(http(&mesh.client, vip80, "HEAD", "/ghost", &[]).status, 503);
    let log = mesh.waypoint.access_log();
    let head = log.iter().find(|l| l["path"] == "/ghost" && l["method"] == "HEAD").expect("HEAD logged");
    assert_eq!(head["response_flags"], "NR", "{head}");

    assert_eq!(http(&mesh.client, vip80, "GET", "/nothing", &[]).status, 204);
    let log = mesh.waypoint.access_log();
    let nothing = log.iter().find(|l| l["path"] == "/nothing").expect("/nothing logged");
    assert_eq!(nothing["response_flags"], "-", "{nothing}");
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
pub(crate) fn tcp_through_the_waypoint(mesh: &Mesh) -> (Client, [Server; 2]) {
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

/// DestinationRule `consistentHash.httpCookie` with a `ttl`: a client without the cookie is
/// sent anywhere and given one; with it, every request reaches the same endpoint. Without the
/// cookie (or a hashed header) requests spread rather than all hashing "" to one endpoint.
#[test]
fn sticky_sessions_by_a_cookie_the_waypoint_makes() {
    let mesh = Mesh::new(&[]);
    let mut rule = subsets();
    rule.traffic_policy.load_balancer = Some(LoadBalancer::ConsistentHash(HashKey::HttpCookie(HashCookie {
        name: "session".into(),
        path: Some("/".into()),
        ttl_ms: Some(3_600_000),
    })));
    mesh.apply(Routing { virtual_services: vec![], destination_rules: vec![rule], authorizations: vec![] });
    let dst = SocketAddr::new(vip(), 80);

    let fresh: Vec<_> = (0..20).map(|_| http(&mesh.client, dst, "GET", "/sticky", &[])).collect();
    let mut versions = std::collections::BTreeSet::new();
    for r in &fresh {
        assert_eq!(r.status, 200, "{r:?}");
        let set = r.header("set-cookie").unwrap_or_else(|| panic!("no cookie made: {r:?}"));
        assert!(set.starts_with("session=") && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"), "{set}");
        versions.insert(r.header("x-echo-version").unwrap().to_string());
    }
    assert_eq!(versions.len(), 2, "clients without the cookie go to either version: {versions:?}");

    for r in fresh.iter().take(4) {
        let cookie = r.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
        let first = r.header("x-echo-version").unwrap();
        for _ in 0..8 {
            let again = http(&mesh.client, dst, "GET", "/sticky", &[("cookie", &cookie)]);
            assert_eq!(again.status, 200, "{again:?}");
            assert_eq!(again.header("x-echo-version"), Some(first), "{cookie} moved");
            assert_eq!(again.header("set-cookie"), None, "a client with the cookie gets no new one");
        }
    }
}
