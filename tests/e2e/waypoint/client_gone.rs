//! A client that leaves before its answer: the request is dropped at once — its upstream
//! request with it — and still logged and counted, as Envoy does (response code 0, `DC`).

use crate::mesh::*;

/// An access-log line of a request the client left: code 0, flag DC, the path asked for.
fn left(mesh: &Mesh, path: &str) -> Option<serde_json::Value> {
    mesh.waypoint.access_log().into_iter().find(|l| {
        l["path"] == path
            && l["status"] == 0
            && l["response_flags"].as_str().is_some_and(|f| f.contains("DC"))
    })
}

#[test]
fn a_client_that_leaves_before_its_answer_is_logged_and_counted() {
    let mesh = Mesh::new(&[]);
    // No routes: requests go to the service's endpoints.
    mesh.apply(Routing::default());
    // Each request asks the echo server to take 3 s; the client leaves after 300 ms.
    let slow = [("x-echo-delay-ms", "3000")];

    // HTTP/2: the client resets its stream, then asks again on the same connection.
    let (reset_at, again) = over_http2(&mesh.client, |sender| async move {
        let mut sender = sender.ready().await.unwrap();
        let mut request = http::Request::get(format!("http://{HOST}/h2-left"));
        for (name, value) in slow {
            request = request.header(name, value);
        }
        let (response, mut stream) = sender.send_request(request.body(()).unwrap(), false).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.send_reset(h2::Reason::CANCEL);
        let reset_at = Instant::now();
        assert!(response.await.is_err(), "a reset stream gets no answer");
        let mut sender = sender.ready().await.unwrap();
        let request = http::Request::get(format!("http://{HOST}/h2-after")).body(()).unwrap();
        let (response, _) = sender.send_request(request, true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response).await.unwrap().unwrap();
        (reset_at, status_and_json(response).await.0)
    });
    assert_eq!(again, 200, "the connection serves on after a reset:\n{}", mesh.waypoint.log());
    // Logged when the client left, not when the upstream would have answered (2.7 s later).
    wait_until(Duration::from_secs(2), || left(&mesh, "/h2-left").is_some());
    let logged_within = reset_at.elapsed();
    let line = left(&mesh, "/h2-left")
        .unwrap_or_else(|| panic!("no DC line within 2 s of the reset:\n{}", mesh.waypoint.log()));
    assert!(
        line["detail"].as_str().is_some_and(|d| d.contains("went away before the response began")),
        "{line}"
    );
    assert_eq!(line["protocol"], "Http2", "{line}");
    assert!(logged_within < Duration::from_millis(2500), "{logged_within:?}");

    // HTTP/1.1: the client closes its connection mid-request.
    let addr = SocketAddr::new(vip(), 80);
    let closed_at = mesh.client.ns.run(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
        let request = format!("GET /h1-left HTTP/1.1\r\nhost: {HOST}\r\nx-echo-delay-ms: 3000\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        Instant::now()
    });
    assert!(
        wait_until(Duration::from_secs(2), || left(&mesh, "/h1-left").is_some()),
        "no DC line for the HTTP/1.1 request within 2 s of the client closing:\n{}",
        mesh.waypoint.log()
    );
    assert!(closed_at.elapsed() < Duration::from_millis(2500));

    // Counted with Istio's labels: code 0, flag DC.
    let m = mesh.waypoint.metrics();
    let dc = m
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"0\"")
                && l.contains("response_flags=\"DC\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    assert_eq!(dc, 2, "{m}");
}
