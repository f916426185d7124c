//! The echo server and the load client against each other, in-process and as binaries.
//! All traffic goes to the loopback interface.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warren_apps::echo::{self, EchoBody, HeaderValues};
use warren_apps::load::client::{Connection, RequestError};
use warren_apps::load::{self, Summary};

struct Echo {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Echo {
    async fn start(args: &[&str]) -> Echo {
        let argv = ["warren-echo", "--listen", "127.0.0.1:0", "--pod", "echo-0", "--namespace", "test"];
        let config = echo::Config::try_parse_from(argv.iter().chain(args)).unwrap();
        Echo::start_with(config).await
    }

    async fn start_with(config: echo::Config) -> Echo {
        let server = echo::bind(&config).await.unwrap();
        let addr = server.local_addrs()[0];
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Echo { addr, stop, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

async fn load(url: &str, args: &[&str]) -> Summary {
    let argv = ["warren-load", url];
    let config = load::Config::try_parse_from(argv.iter().chain(args)).unwrap();
    load::run(config).await.unwrap()
}

async fn fetch(addr: SocketAddr, http2: bool, request: Request<Full<Bytes>>) -> Response<Bytes> {
    let mut conn = Connection::open(addr, http2).await.unwrap();
    conn.send(request).await.unwrap()
}

fn get(url: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::get(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

fn map<K: Ord + Clone, const N: usize>(pairs: [(K, u64); N]) -> BTreeMap<K, u64> {
    BTreeMap::from(pairs)
}

fn versions(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_all_succeed() {
    let echo = Echo::start(&["--version", "v7"]).await;
    for protocol in [&[][..], &["--http2"][..]] {
        let args = [&["-n", "200", "-c", "4"], protocol].concat();
        let s = load(&echo.url("/load"), &args).await;
        let label = if protocol.is_empty() { "HTTP/1.1" } else { "HTTP/2" };
        assert_eq!(s.protocol, label);
        assert_eq!((s.total, s.responses, s.successes), (200, 200, 200), "{label}: {s:?}");
        assert_eq!(s.errors, load::Errors::default(), "{label}");
        assert_eq!(s.status, map([(200, 200)]), "{label}");
        assert_eq!(s.versions, versions(&[("v7", 200)]), "{label}");
        let l = s.latency_us;
        assert_eq!(l.samples, 200);
        assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.max, "{l:?}");
        assert!(s.requests_per_second > 0.0 && s.elapsed_seconds > 0.0);
    }
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_body_describes_the_request() {
    let echo = Echo::start(&["--version", "v2"]).await;
    for (http2, protocol) in [(false, "HTTP/1.1"), (true, "HTTP/2")] {
        let uri = if http2 { echo.url("/some/path?x=1&y=2") } else { "/some/path?x=1&y=2".to_string() };
        let request = Request::post(uri)
            .header("host", echo.addr.to_string())
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("x-single", "c")
            .body(Full::new(Bytes::from_static(b"hello")))
            .unwrap();
        let request = if http2 {
            // :authority carries the host in HTTP/2.
            let (mut parts, body) = request.into_parts();
            parts.headers.remove("host");
            Request::from_parts(parts, body)
        } else {
            request
        };
        let response = fetch(echo.addr, http2, request).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["x-echo-pod"], "echo-0");
        assert_eq!(response.headers()["x-echo-namespace"], "test");
        assert_eq!(response.headers()["x-echo-version"], "v2");
        let body: EchoBody = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body.protocol, protocol);
        assert_eq!(
            (body.pod.as_str(), body.namespace.as_str(), body.version.as_str()),
            ("echo-0", "test", "v2")
        );
        assert_eq!(body.method, "POST");
        assert_eq!(body.path, "/some/path?x=1&y=2");
        assert_eq!(body.authority, Some(echo.addr.to_string()));
        assert_eq!(body.body_bytes, 5);
        assert_eq!(body.headers["x-multi"], HeaderValues::Many(vec!["a".into(), "b".into()]));
        assert_eq!(body.headers["x-single"], HeaderValues::One("c".into()));
        let peer: SocketAddr = body.peer.parse().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.1");
        // The raw JSON uses the documented camelCase names.
        let raw: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(raw["bodyBytes"], 5);
    }
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fraction_is_exact() {
    let echo = Echo::start(&["--fail-fraction", "0.1"]).await;
    let s = load(&echo.url("/"), &["-n", "200", "-c", "4"]).await;
    assert_eq!(s.status, map([(200, 180), (503, 20)]));
    assert_eq!((s.total, s.responses, s.successes), (200, 200, 180));
    // The schedule runs on: requests 200..400 hold exactly 20 failures as well.
    let s = load(&echo.url("/"), &["-n", "200", "-c", "4", "--http2"]).await;
    assert_eq!(s.status, map([(200, 180), (503, 20)]));
    echo.stop().await;

    let echo = Echo::start(&["--fail-fraction", "0.25", "--fail-status", "500"]).await;
    let s = load(&echo.url("/"), &["-n", "100", "-c", "3"]).await;
    assert_eq!(s.status, map([(200, 75), (500, 25)]));
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_does_not_count_toward_failures() {
    let echo = Echo::start(&["--fail-fraction", "0.5"]).await;
    for _ in 0..3 {
        let response = fetch(echo.addr, false, get("/healthz", &[("host", "echo")])).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.body().as_ref(), b"ok\n");
    }
    // Had the probes counted, request 3 would fail first; instead requests 0, 1 are 200, 503.
    let first = fetch(echo.addr, false, get("/", &[("host", "echo")])).await;
    let second = fetch(echo.addr, true, get(&echo.url("/"), &[])).await;
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE));
    let body: EchoBody = serde_json::from_slice(second.body()).unwrap();
    assert_eq!(body.protocol, "HTTP/2", "a failed request still echoes");
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_header_overrides() {
    let echo = Echo::start(&[]).await;
    for protocol in [&[][..], &["--http2"][..]] {
        let args = [&["-n", "50", "-c", "2", "-H", "x-echo-status: 418"], protocol].concat();
        let s = load(&echo.url("/"), &args).await;
        assert_eq!(s.status, map([(418, 50)]));
        assert_eq!((s.responses, s.successes), (50, 0));
        assert_eq!(s.versions, versions(&[("v1", 50)]));
    }
    let no_content = fetch(echo.addr, false, get("/", &[("host", "e"), ("x-echo-status", "204")])).await;
    assert_eq!(no_content.status(), StatusCode::NO_CONTENT);
    assert!(no_content.body().is_empty());
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_override_headers_are_rejected() {
    let echo = Echo::start(&[]).await;
    for (name, value) in [("x-echo-status", "abc"), ("x-echo-status", "99"), ("x-echo-delay-ms", "60001")] {
        let response = fetch(echo.addr, false, get("/", &[("host", "e"), (name, value)])).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{name}: {value}");
        let text = String::from_utf8_lossy(response.body());
        assert!(text.contains(name), "{name}: {value} answered {text:?}");
    }
    let s = load(&echo.url("/"), &["-n", "10", "-H", "x-echo-delay-ms: soon", "--http2"]).await;
    assert_eq!(s.status, map([(400, 10)]));
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_time_out() {
    let echo = Echo::start(&[]).await;
    for protocol in [&[][..], &["--http2"][..]] {
        let slow = ["-n", "4", "-c", "2", "-H", "x-echo-delay-ms: 2000", "--timeout-ms", "100"];
        let s = load(&echo.url("/"), &[&slow[..], protocol].concat()).await;
        assert_eq!(s.errors, load::Errors { connect: 0, timeout: 4, protocol: 0 }, "{protocol:?}");
        assert_eq!((s.total, s.responses, s.successes), (4, 0, 0));
        assert_eq!(s.latency_us.samples, 0);
        // A fast request right after still works: timeouts left nothing broken behind.
        let s = load(&echo.url("/"), &[&["-n", "4", "-c", "2"][..], protocol].concat()).await;
        assert_eq!(s.successes, 4);
    }
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_delay_shows_in_latency() {
    let echo = Echo::start(&["--delay-ms", "30"]).await;
    let s = load(&echo.url("/"), &["-n", "6", "-c", "3"]).await;
    assert_eq!(s.successes, 6);
    assert!(s.latency_us.p50 >= 30_000, "{:?}", s.latency_us);
    // The header replaces the flag for its request.
    let s = load(&echo.url("/"), &["-n", "2", "-H", "x-echo-delay-ms: 0", "--timeout-ms", "5000"]).await;
    assert_eq!(s.successes, 2);
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_per_request_and_rate() {
    let echo = Echo::start(&[]).await;
    let s = load(&echo.url("/"), &["-n", "30", "-c", "3", "--new-connection-per-request"]).await;
    assert_eq!((s.total, s.successes), (30, 30));
    // 200/s for 97.5 ms: the schedule has exactly 20 slots (0, 5, ..., 95 ms), however late.
    let s = load(&echo.url("/"), &["--duration", "0.0975", "--rate", "200", "-c", "2"]).await;
    assert_eq!((s.total, s.successes), (20, 20));
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_sends_nothing() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let s = load(&format!("http://{closed}/"), &["-n", "5", "-c", "2"]).await;
    assert_eq!(s.errors.connect, 5);
    assert!(s.nothing_sent());
    assert!(matches!(Connection::open(closed, false).await, Err(RequestError::Connect(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback_when_available() {
    let config = echo::Config::try_parse_from(["warren-echo", "--listen", "[::1]:0"]).unwrap();
    let Ok(server) = echo::bind(&config).await else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    let addr = server.local_addrs()[0];
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let s = load(&format!("http://{addr}/"), &["-n", "10", "--http2"]).await;
    assert_eq!(s.successes, 10);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

fn run_load_binary(args: Vec<String>) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_warren-load")).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_binary_prints_parsable_json_and_exit_codes() {
    let echo = Echo::start(&["--version", "v3"]).await;
    let args = vec![echo.url("/"), "-n".into(), "20".into(), "-c".into(), "2".into(), "--json".into()];
    let output = tokio::task::spawn_blocking(move || run_load_binary(args)).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary: Summary = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary.versions, versions(&[("v3", 20)]));

    let args = vec![echo.url("/"), "-n".into(), "3".into()];
    let output = tokio::task::spawn_blocking(move || run_load_binary(args)).await.unwrap();
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("status        200: 3"), "{table}");
    echo.stop().await;

    // Usage errors: no amount, a disallowed scheme, too long a run.
    for args in [
        vec!["http://127.0.0.1:1/"],
        vec!["https://127.0.0.1:1/", "-n", "1"],
        vec!["http://127.0.0.1:1/", "--duration", "601"],
    ] {
        let output = run_load_binary(args.iter().map(|s| s.to_string()).collect());
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty());
    }

    // Nothing reachable: a summary, then a failing exit status.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let output = run_load_binary(vec![format!("http://{closed}/"), "-n".into(), "2".into(), "--json".into()]);
    assert_eq!(output.status.code(), Some(1));
    let summary: Summary = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary.errors.connect, 2);
}

#[test]
fn echo_binary_logs_listeners_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warren-echo"))
        .args(["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--version", "v9"])
        .env("POD_NAME", "from-env")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addrs = Vec::new();
    while addrs.len() < 2 {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "warren-echo exited early");
        if let Some(rest) = line.split("warren-echo listening on ").nth(1) {
            addrs.push(rest.split_whitespace().next().unwrap().parse::<SocketAddr>().unwrap());
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for addr in &addrs {
        let response = runtime.block_on(fetch(*addr, true, get(&format!("http://{addr}/"), &[])));
        assert_eq!(response.headers()["x-echo-pod"], "from-env");
        assert_eq!(response.headers()["x-echo-version"], "v9");
    }
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn calls_forward_trace_headers_and_stats_count_by_authority() {
    let front = Echo::start(&[]).await;
    let back = Echo::start(&["--version", "v9"]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let request = get(
        &front.url("/a"),
        &[("x-echo-call", &back.url("/b?x=1")), ("traceparent", traceparent), ("x-b3-sampled", "1")],
    );
    let response = fetch(front.addr, false, request).await;
    let echo: warren_apps::echo::EchoBody = serde_json::from_slice(response.body()).unwrap();
    let call = echo.call.expect("the call's result");
    assert_eq!(call.status, Some(200), "{call:?}");
    let downstream: warren_apps::echo::EchoBody = serde_json::from_str(&call.body).unwrap();
    assert_eq!(downstream.version, "v9");
    assert_eq!(downstream.path, "/b?x=1");
    let header = |name: &str| match downstream.headers.get(name) {
        Some(warren_apps::echo::HeaderValues::One(v)) => v.clone(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(header("traceparent"), traceparent);
    assert_eq!(header("x-b3-sampled"), "1");

    let stats = fetch(back.addr, false, get(&back.url("/_echo/stats"), &[])).await;
    let stats: warren_apps::echo::Stats = serde_json::from_slice(stats.body()).unwrap();
    assert_eq!(stats.requests, 1, "the stats request itself is not counted");
    assert_eq!(stats.by_authority.get(&back.addr.to_string()), Some(&1), "{stats:?}");

    let broken = fetch(front.addr, false, get(&front.url("/"), &[("x-echo-call", "ftp://x")])).await;
    let echo: warren_apps::echo::EchoBody = serde_json::from_slice(broken.body()).unwrap();
    assert!(echo.call.unwrap().error.contains("http://"));
    front.stop().await;
    back.stop().await;
}

/// One gRPC call over HTTP/2: the answer's status, headers, body and trailers.
async fn grpc_call(addr: SocketAddr, headers: &[(&str, &str)]) -> (Response<Bytes>, Option<http::HeaderMap>) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut request = Request::post(format!("http://{addr}/echo.Echo/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    // One empty, uncompressed message.
    let request = request.body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))).unwrap();
    let (parts, body) = sender.send_request(request).await.unwrap().into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (Response::from_parts(parts, collected.to_bytes()), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_end_in_a_grpc_status() {
    let echo = Echo::start(&["--fail-fraction", "0.5", "--version", "v3"]).await;
    // Request 0 of the schedule succeeds: one length-prefixed JSON message, then trailers.
    let (ok, trailers) = grpc_call(echo.addr, &[]).await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(ok.headers()["content-type"], "application/grpc");
    assert!(ok.headers().get("grpc-status").is_none(), "the status of a success comes in trailers");
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    let body = ok.body();
    assert_eq!(body[0], 0, "not compressed");
    assert_eq!(u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize, body.len() - 5);
    let echoed: EchoBody = serde_json::from_slice(&body[5..]).unwrap();
    assert_eq!((echoed.version.as_str(), echoed.path.as_str()), ("v3", "/echo.Echo/Call"));
    // Request 1 fails: trailers-only, HTTP 200, UNAVAILABLE (the default --fail-grpc-status).
    let (failed, trailers) = grpc_call(echo.addr, &[]).await;
    assert_eq!(failed.status(), StatusCode::OK);
    assert_eq!(failed.headers()["grpc-status"], "14");
    assert!(failed.body().is_empty() && trailers.is_none(), "a trailers-only answer has no body");
    // The header picks the status, over the schedule (request 2 would succeed).
    let (asked, _) = grpc_call(echo.addr, &[("x-echo-grpc-status", "13")]).await;
    assert_eq!(asked.headers()["grpc-status"], "13");
    let (bad, _) = grpc_call(echo.addr, &[("x-echo-grpc-status", "17")]).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(bad.body()).contains("x-echo-grpc-status"));
    echo.stop().await;
}

#[tokio::test]
async fn stats_count_the_requests_waiting_out_a_delay_at_once() {
    let echo = Echo::start(&[]).await;
    let slow = || fetch(echo.addr, false, get(&echo.url("/slow"), &[("x-echo-delay-ms", "300")]));
    let (a, b, c) = tokio::join!(slow(), slow(), slow());
    assert!([a, b, c].iter().all(|r| r.status() == 200));
    // A request without a delay is not counted as one.
    fetch(echo.addr, false, get(&echo.url("/quick"), &[])).await;
    let stats = fetch(echo.addr, false, get(&echo.url("/_echo/stats"), &[])).await;
    let stats: warren_apps::echo::Stats = serde_json::from_slice(stats.body()).unwrap();
    assert_eq!((stats.delayed_now, stats.delayed_max, stats.requests), (0, 3, 4), "{stats:?}");
    echo.stop().await;
}
