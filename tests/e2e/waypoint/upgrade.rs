//! WebSocket through the waypoint: the upgrade request is routed like any other, and after
//! the upstream's 101 the connection carries bytes both ways; other upgrades go on as plain
//! HTTP.

use std::io::{BufRead, BufReader, Read, Write};

use crate::mesh::*;

/// Opens an HTTP/1.1 connection from the client pod to the service and sends `head` (a request
/// without a body); returns the status line, the response headers (lower-case names) and the
/// connection, positioned after the head.
fn request_head(
    mesh: &Mesh,
    head: &str,
) -> (String, BTreeMap<String, String>, BufReader<std::net::TcpStream>) {
    let dst = SocketAddr::new(vip(), 80);
    let mut tcp = mesh
        .client
        .ns
        .run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(tcp);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
    }
    (status.trim_end().to_string(), headers, reader)
}

#[test]
fn a_websocket_upgrade_through_the_waypoint_carries_bytes_both_ways() {
    let mesh = Mesh::new(&[]);
    mesh.apply(Routing::default());
    let (status, headers, mut connection) = request_head(
        &mesh,
        &format!(
            "GET /chat HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        ),
    );
    assert!(status.starts_with("HTTP/1.1 101"), "{status} {headers:?}\n{}", mesh.waypoint.log());
    assert_eq!(headers.get("upgrade").map(String::as_str), Some("websocket"), "{headers:?}");
    // The echo on the far side sends every byte back: each message is answered before the next.
    let mut sent = 0;
    for i in 0..5 {
        let message = format!("message {i} over the upgraded connection\n");
        connection.get_mut().write_all(message.as_bytes()).unwrap();
        let mut back = vec![0; message.len()];
        connection.read_exact(&mut back).unwrap();
        assert_eq!(String::from_utf8(back).unwrap(), message);
        sent += message.len() as u64;
    }
    drop(connection);

    let relayed = wait_until(Duration::from_secs(10), || {
        mesh.waypoint.access_log().iter().any(|l| l["message"] == "upgraded connection complete")
    });
    assert!(relayed, "no line for the upgraded connection\n{}", mesh.waypoint.log());
    let log = mesh.waypoint.access_log();
    let request = log.iter().find(|l| l["path"] == "/chat").expect("the upgrade request's line");
    assert_eq!(request["status"], 101, "{request}");
    let relay = log.iter().find(|l| l["message"] == "upgraded connection complete").unwrap();
    assert_eq!(relay["bytes_received"], sent, "{relay}");
    assert_eq!(relay["bytes_sent"], sent, "{relay}");
    assert_eq!(relay["error"], "", "{relay}");
}

#[test]
fn an_upgrade_other_than_websocket_goes_on_as_plain_http() {
    let mesh = Mesh::new(&[]);
    mesh.apply(Routing::default());
    let (status, headers, mut connection) = request_head(
        &mesh,
        &format!(
            "GET /h2c HTTP/1.1\r\nhost: {HOST}\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n\
             http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        ),
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {headers:?}\n{}", mesh.waypoint.log());
    let length: usize = headers["content-length"].parse().unwrap();
    let mut body = vec![0; length];
    connection.read_exact(&mut body).unwrap();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for hop in ["upgrade", "connection", "http2-settings"] {
        assert!(echo["headers"][hop].is_null(), "{hop} reached the upstream: {echo}");
    }
}

#[test]
fn an_idle_websocket_is_closed_after_the_idle_timeout() {
    let mesh = Mesh::with(Options { waypoint_args: &["--idle-timeout-secs", "2"], ..Default::default() });
    mesh.apply(Routing::default());
    let (status, _, mut connection) = request_head(
        &mesh,
        &format!("GET /chat HTTP/1.1\r\nhost: {HOST}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"),
    );
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    connection.get_mut().write_all(b"ping").unwrap();
    let mut back = [0; 4];
    connection.read_exact(&mut back).unwrap();
    // Then nothing either way: the waypoint closes both sides once 2 s have passed.
    let quiet = Instant::now();
    let mut rest = Vec::new();
    let closed = connection.read_to_end(&mut rest);
    assert!(closed.is_ok() && rest.is_empty(), "{closed:?} {rest:?}");
    let waited = quiet.elapsed();
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_secs(8), "{waited:?}");
    let log = mesh.waypoint.access_log();
    let relay = log.iter().find(|l| l["message"] == "upgraded connection complete").expect("a relay line");
    assert!(relay["error"].as_str().unwrap().contains("--idle-timeout-secs"), "{relay}");
    assert_eq!(relay["bytes_received"], 4, "{relay}");
}
