//! `--idle-timeout-secs`: downstream HTTP connections and TCP passthrough.

use crate::mesh::*;

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
    let (mut c, _servers) = crate::routing::tcp_through_the_waypoint(&mesh);
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

/// SIGTERM: a request in flight on a client's HTTP/2 connection is answered, and the
/// connection is told to go (GOAWAY) so the client takes its next requests elsewhere; the
/// waypoint exits as soon as that request is done, not at the end of its drain timeout.
#[test]
fn sigterm_answers_requests_in_flight_and_sends_http2_clients_elsewhere() {
    let mesh = Mesh::new(&[]);
    mesh.apply(Routing::default());
    let pid = mesh.waypoint.pid() as i32;
    let (answered, refused_after, drained_in) = over_http2(&mesh.client, |sender| async move {
        let mut sender = sender.ready().await.unwrap();
        let slow = http::Request::get(format!("http://{HOST}/slow"))
            .header("x-echo-delay-ms", "1000")
            .body(())
            .unwrap();
        let (response, _) = sender.send_request(slow, true).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let signalled = Instant::now();
        // SAFETY: a signal to the waypoint process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let answered = match tokio::time::timeout(Duration::from_secs(10), response).await {
            Ok(Ok(response)) => Ok(response.status().as_u16()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 10 s".to_string()),
        };
        // Told to go: the connection takes no new request.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = http::Request::get(format!("http://{HOST}/again")).body(()).unwrap();
        let refused = match sender.ready().await {
            Err(_) => true,
            Ok(mut sender) => match sender.send_request(again, true) {
                Err(_) => true,
                Ok((response, _)) => {
                    tokio::time::timeout(Duration::from_secs(5), response).await.map_or(true, |r| r.is_err())
                }
            },
        };
        (answered, refused, signalled.elapsed())
    });
    assert_eq!(answered, Ok(200), "the request in flight at SIGTERM:\n{}", mesh.waypoint.log());
    assert!(refused_after, "the connection served a new request after SIGTERM");
    assert!(
        wait_until(Duration::from_secs(3), || mesh.waypoint.log().contains("drained: no stream open")),
        "the waypoint did not drain before its timeout ({drained_in:?} after SIGTERM):\n{}",
        mesh.waypoint.log()
    );
}
