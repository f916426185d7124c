//! Request bodies that stream through the waypoint: a bidi-streaming gRPC call answered message
//! by message, a body that arrives late and is replayed whole on a retry, and one longer than
//! the retry buffer that streams through without retries.

use crate::mesh::*;

/// A gRPC message: uncompressed, length-prefixed.
fn message(payload: &[u8]) -> bytes::Bytes {
    let mut m = vec![0];
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m.into()
}

/// Reads from `body` until one whole gRPC message is there (the echo answers each at once).
async fn next_message(body: &mut h2::RecvStream, pending: &mut Vec<u8>) -> Vec<u8> {
    loop {
        if pending.len() >= 5 {
            let len = u32::from_be_bytes(pending[1..5].try_into().unwrap()) as usize;
            if pending.len() >= 5 + len {
                return pending.drain(..5 + len).collect();
            }
        }
        let chunk = body.data().await.expect("the answer ended before a whole message").unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        pending.extend_from_slice(&chunk);
    }
}

/// Starts a call of the echo's bidi-streaming gRPC method; the request body stays open.
async fn open_stream_call(
    sender: h2::client::SendRequest<bytes::Bytes>,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut sender = sender.ready().await.unwrap();
    let request = http::Request::post(format!("http://{HOST}/payment.Payment/Stream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    sender.send_request(request, false).unwrap()
}

#[test]
fn a_bidi_streaming_call_gets_each_answer_before_it_sends_the_next() {
    let mesh = Mesh::new(&[]);
    mesh.apply(Routing::default());
    const MESSAGES: usize = 5;
    let outcome = over_http2(&mesh.client, |sender| async move {
        let call = async {
            let (response, mut stream) = open_stream_call(sender).await;
            stream.send_data(message(b"ping 0"), false).unwrap();
            let response = response.await.map_err(|e| format!("no response head: {e}"))?;
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut pending = Vec::new();
            for i in 0..MESSAGES {
                if i > 0 {
                    stream.send_data(message(format!("ping {i}").as_bytes()), false).unwrap();
                }
                // The client waits for each answer before it sends on: a waypoint that holds the
                // request body until it ends never forwards the first message.
                let answer =
                    tokio::time::timeout(Duration::from_secs(5), next_message(&mut body, &mut pending))
                        .await
                        .map_err(|_| format!("no answer to message {i} within 5 s"))?;
                assert_eq!(answer, message(format!("ping {i}").as_bytes()));
            }
            stream.send_data(bytes::Bytes::new(), true).unwrap();
            let trailers = body.trailers().await.unwrap().expect("trailers end the call");
            Ok::<_, String>(trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_string()))
        };
        tokio::time::timeout(Duration::from_secs(30), call).await.unwrap_or_else(|_| Err("timed out".into()))
    });
    assert_eq!(outcome, Ok(Some("0".to_string())), "{}", mesh.waypoint.log());

    let log = mesh.waypoint.access_log();
    let line = log.iter().find(|l| l["path"] == "/payment.Payment/Stream").expect("an access-log line");
    assert_eq!(line["status"], 200, "{line}");
    // Written when the call ended: its status from the trailers, the bytes each way.
    assert_eq!(line["grpc_status"], 0, "{line}");
    assert_eq!(line["response_flags"], "-", "{line}");
    // Every request message counted, though the body streamed past the response head.
    let sent: usize = (0..MESSAGES).map(|i| message(format!("ping {i}").as_bytes()).len()).sum();
    let metrics = mesh.waypoint.metrics();
    assert_eq!(line["bytes_received"], sent as u64, "{line}");
    assert_eq!(line["bytes_sent"], sent as u64, "{line}");
    let grpc_sum = metrics
        .lines()
        .find(|l| l.starts_with("istio_request_bytes_sum") && l.contains("request_protocol=\"grpc\""))
        .unwrap_or_else(|| panic!("no gRPC request size in\n{metrics}"));
    assert!(grpc_sum.ends_with(&format!(" {sent}")), "{grpc_sum} (sent {sent} bytes)");
}

/// POSTs from the client over HTTP/2, each body of `size` bytes sent in 16 KiB frames without
/// a content-length, after `pause` (so that it is not there when the waypoint routes the
/// request); the status and echo JSON of each.
fn late_posts(mesh: &Mesh, count: usize, size: usize, pause: Duration) -> Vec<(u16, serde_json::Value)> {
    over_http2(&mesh.client, |sender| async move {
        let mut answers = Vec::new();
        for _ in 0..count {
            let exchange = async {
                let mut sender = sender.clone().ready().await.unwrap();
                let request = http::Request::post(format!("http://{HOST}/upload")).body(()).unwrap();
                let (response, mut stream) = sender.send_request(request, false).unwrap();
                tokio::time::sleep(pause).await;
                let mut left = size;
                while left > 0 {
                    let n = left.min(16 * 1024);
                    stream.reserve_capacity(n);
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await.unwrap().unwrap();
                    let n = n.min(granted);
                    stream.send_data(bytes::Bytes::from(vec![b'x'; n]), left == n).unwrap();
                    left -= n;
                }
                status_and_json(response.await.unwrap()).await
            };
            answers.push(tokio::time::timeout(Duration::from_secs(20), exchange).await.unwrap());
        }
        answers
    })
}

/// The same over HTTP/1.1 with a chunked body: one connection, requests one after another.
fn late_posts_http1(mesh: &Mesh, count: usize, size: usize) -> Vec<(u16, serde_json::Value)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let dst = SocketAddr::new(vip(), 80);
    let tcp = mesh
        .client
        .ns
        .run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = BufReader::new(tcp.try_clone().unwrap());
    let mut writer = tcp;
    let mut answers = Vec::new();
    for _ in 0..count {
        write!(writer, "POST /upload HTTP/1.1\r\nhost: {HOST}\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut left = size;
        while left > 0 {
            let n = left.min(16 * 1024);
            write!(writer, "{n:x}\r\n").unwrap();
            writer.write_all(&vec![b'x'; n]).unwrap();
            writer.write_all(b"\r\n").unwrap();
            left -= n;
        }
        writer.write_all(b"0\r\n\r\n").unwrap();
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        answers.push((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)));
    }
    answers
}

/// Retries in the access log's lines for `/upload`, in order.
fn upload_attempts(mesh: &Mesh) -> Vec<u64> {
    let log = mesh.waypoint.access_log();
    log.iter().filter(|l| l["path"] == "/upload").map(|l| l["attempts"].as_u64().unwrap()).collect()
}

#[test]
fn a_body_that_arrives_late_is_replayed_whole_on_a_retry() {
    // v1 fails every request with 503; Istio's default policy retries it on v2 — with the whole
    // body, which streamed to v1 first.
    let mesh = Mesh::new(&["--fail-fraction", "1"]);
    mesh.apply(Routing::default());
    const SIZE: usize = 200 * 1024;
    let mut answers = late_posts(&mesh, 6, SIZE, Duration::from_millis(100));
    answers.extend(late_posts_http1(&mesh, 6, SIZE));
    for (status, echo) in &answers {
        assert_eq!(*status, 200, "{echo}\n{}", mesh.waypoint.log());
        assert_eq!(echo["version"], "v2");
        assert_eq!(echo["bodyBytes"], SIZE as u64, "{echo}");
    }
    let attempts = upload_attempts(&mesh);
    let (http2, http1) = attempts.split_at(6);
    for (protocol, attempts) in [("HTTP/2", http2), ("HTTP/1.1", http1)] {
        assert!(attempts.iter().any(|&a| a > 1), "no {protocol} request went to v1 first: {attempts:?}");
    }
    assert!(echo_stats(&mesh.v1)["requests"].as_u64().unwrap() > 0);
}

#[test]
fn a_body_longer_than_the_retry_buffer_streams_through_without_retries() {
    let mesh = Mesh::with(Options {
        v1_echo_args: &["--fail-fraction", "1"],
        waypoint_args: &["--request-buffer-bytes", "65536"],
        ..Default::default()
    });
    mesh.apply(Routing::default());
    const SIZE: usize = 1024 * 1024;
    // Sent late, and at once: then more than the buffer may have arrived by the time the
    // request is routed, which still goes upstream, once.
    let mut answers = late_posts(&mesh, 6, SIZE, Duration::from_millis(100));
    answers.extend(late_posts(&mesh, 6, SIZE, Duration::ZERO));
    let attempts = upload_attempts(&mesh);
    let log = mesh.waypoint.log();
    // v2 gets all of a body sixteen times the buffer; one that went to v1 first cannot be
    // sent again, so v1's 503 reaches the client after one attempt.
    for (status, echo) in &answers {
        match status {
            200 => assert_eq!(echo["bodyBytes"], SIZE as u64, "{echo}"),
            503 => {}
            other => panic!("status {other}: {echo}\n{log}"),
        }
    }
    assert_eq!(attempts, vec![1; answers.len()], "no retries past the buffer\n{log}");
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok > 0 && ok < answers.len(), "round robin sends some to each version: {answers:?}");
}

/// A route's `timeout` counts as Envoy counts it: from the end of the client's request to the
/// end of the response. A call whose client is still streaming is not cut, however long; one
/// whose answer is still streaming when the timeout passes after the client's end is reset.
#[test]
fn a_routes_timeout_counts_from_the_requests_end_to_the_responses() {
    let mesh = Mesh::new(&[]);
    let whole_service = RouteDestination {
        destination: Destination { host: HOST.into(), subset: None, port: None },
        weight: 100,
        headers: Default::default(),
    };
    let route = HttpRoute { route: vec![whole_service], timeout_ms: Some(1500), ..Default::default() };
    mesh.apply(Routing { virtual_services: vec![vs(vec![route])], ..Default::default() });
    // `hold`: how long the server takes to end the call once the client has ended its side.
    let stream_call =
        |sender: h2::client::SendRequest<bytes::Bytes>, path: &'static str, hold: &'static str| async move {
            let mut sender = sender.ready().await.unwrap();
            let request = http::Request::post(format!("http://{HOST}/payment.Payment{path}"))
                .header("content-type", "application/grpc")
                .header("x-echo-delay-ms", hold)
                .body(())
                .unwrap();
            let (response, stream) = sender.send_request(request, false).unwrap();
            (response, stream)
        };
    let end_of = |mut body: h2::RecvStream| async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            match body.data().await {
                Some(Ok(more)) => format!("more data: {more:?}"),
                Some(Err(e)) => format!("reset: {e}"),
                None => format!(
                    "ended, grpc-status {:?}",
                    body.trailers().await.ok().flatten().and_then(|t| t.get("grpc-status").cloned())
                ),
            }
        })
        .await
        .unwrap_or_else(|_| "still open after 10 s".into())
    };

    // The client streams for 2.5 s, past the 1.5 s: answered throughout, then ended normally.
    let (streamed_end, streamed_for) = over_http2(&mesh.client, |sender| async move {
        let started = Instant::now();
        let (response, mut stream) = stream_call(sender, "/Stream", "0").await;
        stream.send_data(message(b"in time"), false).unwrap();
        let mut body = response.await.unwrap().into_body();
        let mut pending = Vec::new();
        assert_eq!(next_message(&mut body, &mut pending).await, message(b"in time"));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        stream.send_data(message(b"still streaming"), true).unwrap();
        assert_eq!(next_message(&mut body, &mut pending).await, message(b"still streaming"));
        (end_of(body).await, started.elapsed())
    });
    assert!(streamed_end.contains("\"0\""), "{streamed_end} after {streamed_for:?}\n{}", mesh.waypoint.log());
    assert!(streamed_for >= Duration::from_millis(2500), "{streamed_for:?}");

    // The client ends its side at once; the server holds the call's end 3 s: cut at 1.5 s.
    let (held_end, held_for) = over_http2(&mesh.client, |sender| async move {
        let started = Instant::now();
        let (response, mut stream) = stream_call(sender, "/Stream", "3000").await;
        stream.send_data(message(b"in time"), true).unwrap();
        let mut body = response.await.unwrap().into_body();
        let mut pending = Vec::new();
        assert_eq!(next_message(&mut body, &mut pending).await, message(b"in time"));
        (end_of(body).await, started.elapsed())
    });
    assert!(held_end.starts_with("reset"), "{held_end} after {held_for:?}\n{}", mesh.waypoint.log());
    assert!(held_for >= Duration::from_millis(1400) && held_for < Duration::from_secs(5), "{held_for:?}");
    // The access log, written when the response ended, says how.
    let log = mesh.waypoint.access_log();
    let cut: Vec<_> = log.iter().filter(|l| l["path"] == "/payment.Payment/Stream").collect();
    assert_eq!(cut.len(), 2, "{log:?}");
    assert_eq!(cut[0]["response_flags"], "-", "{}", cut[0]);
    assert_eq!(cut[1]["response_flags"], "UT", "{}", cut[1]);
    assert!(cut[1]["duration_ms"].as_u64().unwrap() >= 1400, "{}", cut[1]);
}

#[test]
fn many_small_grpc_messages_behind_a_client_that_reads_late_all_arrive() {
    // A streaming call whose server answers with many small messages, each its own DATA frame,
    // faster than the client reads them: the waypoint holds the ones the client has no window
    // for. h2 limits how many small frames a connection may buffer unread (a guard against
    // floods); past it, it closes the connection (GOAWAY ENHANCE_YOUR_CALM), and with it every
    // call on it. The waypoint's upstream connections allow what a window of small messages
    // needs. The client here has h2's default window but not its guard, as clients on other
    // HTTP/2 stacks (Go's, Java's) have none: with it, the client itself would close the
    // connection over these frames, waypoint or not.
    late_reader_call(60_000, false);
}

#[test]
fn a_client_streaming_tiny_messages_into_a_backed_up_call_keeps_its_connection() {
    // The other way: the client sends each small message as a DATA frame of its own and reads
    // the answers late, so the call backs up to the waypoint (the echo answers every message
    // before it reads the next), which then cannot pass the client's frames on. They must
    // not pile up unread in the waypoint's HTTP/2 server past h2's small-frame budget, or the
    // waypoint itself closes the client's connection.
    late_reader_call(200_000, true);
}

/// A `/Stream` call of `messages` 25-byte messages (each in a DATA frame of its own when
/// `frame_each`, else all in one write), whose client reads the answers only 2 s later:
/// every answer arrives and the call ends `grpc-status: 0`.
fn late_reader_call(messages: usize, frame_each: bool) {
    let mesh = Mesh::new(&[]);
    mesh.apply(Routing::default());
    let payload = [b'x'; 20];
    let mut client = h2::client::Builder::new();
    client.data_frame_budget(usize::MAX / 2);
    let outcome = over_http2_with(&mesh.client, client, |sender| async move {
        let call = async {
            let (response, mut stream) = open_stream_call(sender).await;
            if frame_each {
                for _ in 0..messages {
                    stream.send_data(message(&payload), false).unwrap();
                }
                stream.send_data(bytes::Bytes::new(), true).unwrap();
            } else {
                let all: Vec<u8> = (0..messages).flat_map(|_| message(&payload)).collect();
                stream.send_data(all.into(), true).unwrap();
            }
            let response = response.await.map_err(|e| format!("no response head: {e}"))?;
            assert_eq!(response.status(), 200);
            // The client reads nothing for a while: the answers pile up along the way.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut body = response.into_body();
            let mut received = 0;
            while let Some(chunk) = body.data().await {
                let chunk = chunk.map_err(|e| format!("after {received} bytes: {e}"))?;
                let _ = body.flow_control().release_capacity(chunk.len());
                received += chunk.len();
            }
            let trailers = body.trailers().await.map_err(|e| e.to_string())?.expect("trailers end the call");
            Ok::<_, String>((received, trailers.get("grpc-status").map(|v| v.to_str().unwrap().to_string())))
        };
        tokio::time::timeout(Duration::from_secs(60), call).await.unwrap_or_else(|_| Err("timed out".into()))
    });
    let expected = messages * message(&payload).len();
    assert_eq!(
        outcome,
        Ok((expected, Some("0".to_string()))),
        "{}",
        mesh.waypoint.log().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
}
