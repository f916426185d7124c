//! gRPC through the waypoint: trailers, Istio's default retries, metrics labels, local replies.

use crate::mesh::*;

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

/// A gRPC call's `grpc-timeout` bounds it as a route's `timeout` would, capped by the
/// route's own: Istio sets Envoy's `max_grpc_timeout` to the route's timeout.
#[test]
fn a_grpc_calls_deadline_bounds_it_capped_by_the_routes_timeout() {
    let mesh = Mesh::new(&[]);
    mesh.apply(Routing::default());
    let timed = |headers: &[(&str, &str)]| {
        let started = Instant::now();
        let answer = grpc_calls(&mesh.client, 1, headers).pop().unwrap();
        (answer, started.elapsed())
    };
    let cut = GrpcAnswer { http_status: 200, grpc_status: Some("14".into()), trailers_only: true };
    let ok = GrpcAnswer { http_status: 200, grpc_status: Some("0".into()), trailers_only: false };

    // No route timeout: the call's deadline alone, 300 ms of the 2 s the server takes.
    let (answer, took) = timed(&[("grpc-timeout", "300m"), ("x-echo-delay-ms", "2000")]);
    assert_eq!(answer, cut, "{}", mesh.waypoint.log());
    assert!(took < Duration::from_millis(1500), "cut after {took:?}");
    let line = mesh.waypoint.access_log().pop().unwrap();
    assert_eq!((line["status"].as_u64(), line["response_flags"].as_str()), (Some(200), Some("UT")), "{line}");
    // A deadline the server meets changes nothing.
    let (answer, _) = timed(&[("grpc-timeout", "5S"), ("x-echo-delay-ms", "300")]);
    assert_eq!(answer, ok, "{}", mesh.waypoint.log());

    // A route timeout shorter than the deadline caps it.
    mesh.apply(Routing {
        virtual_services: vec![vs(vec![HttpRoute {
            route: vec![to("v1", 100)],
            timeout_ms: Some(500),
            ..Default::default()
        }])],
        destination_rules: vec![subsets()],
        authorizations: vec![],
    });
    let (answer, took) = timed(&[("grpc-timeout", "10S"), ("x-echo-delay-ms", "2000")]);
    assert_eq!(answer, cut, "{}", mesh.waypoint.log());
    assert!(took < Duration::from_millis(1500), "cut after {took:?}");
}
