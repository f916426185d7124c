//! The seed scenario: payment-service with a canary DestinationRule and
//! VirtualService.

use crate::mesh::*;

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
