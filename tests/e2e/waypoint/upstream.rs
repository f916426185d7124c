//! Upstream connections: request bodies, pooling, maxRequestsPerConnection, HTTP/2 stream
//! limits, idle timeouts, maxConnections and the connect timeout.

use crate::mesh::*;

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
        // The client sent no length. A body that is all there when the request is routed gets
        // one, as HTTP/1.1 upstreams get it; one that streams (past the first window) has no
        // length to tell, as with hyper's and Envoy's clients. Never a wrong one.
        let length = &echo["headers"]["content-length"];
        assert!(
            length.is_null() || length.as_str() == Some(&size.to_string()),
            "POST of {size} bytes: {echo}"
        );
        if *size <= 16_384 {
            assert_eq!(*length, size.to_string(), "{echo}");
        }
    }
    // A length the client sends goes upstream with the streamed body.
    for size in [70_000, 1 << 20] {
        let declared = size.to_string();
        let (status, echo) = http2_posts(&mesh.client, &[size], &[("content-length", &declared)]).remove(0);
        assert_eq!(status, 200, "{echo}");
        assert_eq!(echo["bodyBytes"], size as u64, "{echo}");
        assert_eq!(echo["headers"]["content-length"], declared, "{echo}");
    }
    // gRPC's `te: trailers` is the one `te` forwarded; the other hop-by-hop headers stay behind.
    let (status, echo) = http2_posts(&mesh.client, &[1], &[("te", "trailers")]).remove(0);
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["te"], "trailers", "{echo}");
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
fn a_burst_of_http2_requests_on_a_cold_pool_waits_for_the_connections_being_opened() {
    // 250 slow requests at once, none pooled yet. Each used to open an upstream connection of
    // its own (a new one joined the pool only after its first response); now requests wait
    // for a connection being opened while it is assumed to have a stream for them (100 until
    // the server's SETTINGS), as Envoy attaches pending streams to a connecting client.
    let mesh = Mesh::new(&[]);
    mesh.apply(all_to_v1());
    let answers = http2_posts(&mesh.client, &[0; 250], &[("x-echo-delay-ms", "1000")]);
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}\n{}", mesh.waypoint.log());
    let echoes: Vec<serde_json::Value> = answers.into_iter().map(|(_, echo)| echo).collect();
    let per_connection = requests_per_upstream_connection(&echoes);
    assert!(
        per_connection.len() <= 3,
        "250 requests at once opened {} upstream connections: {per_connection:?}",
        per_connection.len()
    );
    let held = echo_stats(&mesh.v1)["delayedMax"].as_u64().unwrap();
    assert!(held >= 250, "v1 held at most {held} of the 250 requests at once: some waited behind others");
}

#[test]
fn a_burst_of_http1_requests_on_a_cold_waypoint_shares_one_hbone_connection_per_node() {
    // 150 slow HTTP/1.1 requests at once: 150 upstream connections (one request each, as
    // HTTP/1.1 has it), all to v1's node. Each used to dial its own mTLS connection to that
    // node's ztunnel; now the first dials and the rest open their CONNECT streams over it.
    let mesh = Mesh::new(&[]);
    mesh.apply(all_to_v1());
    let summary = load(
        &mesh.client,
        &url("/burst"),
        &["-n", "150", "-c", "150", "-H", "x-echo-delay-ms: 1000", "--timeout-ms", "20000"],
    );
    assert_eq!(summary.successes, 150, "{summary:?}\n{}", mesh.waypoint.log());
    let held = echo_stats(&mesh.v1)["delayedMax"].as_u64().unwrap();
    assert!(held >= 150, "v1 held at most {held} of the 150 requests at once");
    let opened = mesh.waypoint.config_dump()["hboneConnectionsOpened"].as_u64().unwrap();
    assert_eq!(opened, 1, "HBONE connections the waypoint opened to v1's node");
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
    mesh.cluster.nodes[0].ns.ip(&[
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
