//! HBONE end to end: real mTLS between SPIFFE identities, HTTP/2 CONNECT, across nodes joined
//! by an underlay, and wire compatibility checked against an independent HTTP/2 peer written
//! here with the `h2` crate (not Warren's code).

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use rustls_pki_types::ServerName;
use warren_core::{
    ca::{Ca, WorkloadCertificate, new_key_and_csr, workload_certificate},
    identity::SpiffeId,
    tls::{self, TrustBundle},
};
use warren_e2e::{
    app::{Client, Server},
    netns::Netns,
    require_root,
    topology::{Cluster, Pod},
    wait_until,
    ztunnel::{MeshCa, Ztunnel},
};

const APP_PORT: u16 = 8080;

fn identity(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A TCP socket connected from inside `ns` (the connect happens there; the socket stays).
fn tcp_from(ns: &Netns, dst: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    ns.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
}

#[test]
fn pods_talk_over_hbone_within_and_across_nodes_with_their_identities() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let (a, c) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let b = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let workloads = [
        a.workload_as(&n0, true, "checkout"),
        c.workload_as(&n0, true, "payment"),
        b.workload_as(&n1, true, "payment"),
    ];
    let z0 = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    let z1 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, &[]);
    z0.wait_enrolled(&a.name);
    z0.wait_enrolled(&c.name);
    z1.wait_enrolled(&b.name);
    let _sb = Server::start(&b, APP_PORT);
    let _sc = Server::start(&c, APP_PORT);

    for (dst_pod, dst_ztunnel, what) in [(&b, &z1, "cross-node"), (&c, &z0, "same-node")] {
        for dst_ip in [dst_pod.ipv4, dst_pod.ipv6] {
            let dst = SocketAddr::new(dst_ip, APP_PORT);
            let mut client = Client::connect(&a, dst).unwrap_or_else(|e| panic!("{what} {dst}: {e}"));
            assert_eq!(
                client.greeting().unwrap().ip(),
                dst_ip,
                "{what}: delivered inside the destination pod"
            );
            assert_eq!(client.echo(what).unwrap(), what);
            drop(client);
            let outbound = |z: &Ztunnel| {
                z.access_log("outbound").into_iter().any(|l| {
                    l["protocol"] == "HBONE"
                        && l["dst"] == dst.to_string()
                        && l["src_identity"] == identity("checkout").to_string()
                        && l["dst_identity"] == identity("payment").to_string()
                        && l["error"] == ""
                })
            };
            let inbound = |z: &Ztunnel| {
                z.access_log("inbound").into_iter().any(|l| {
                    l["protocol"] == "HBONE"
                        && l["dst"] == dst.to_string()
                        && l["src_identity"] == identity("checkout").to_string()
                        && l["src"].as_str().unwrap_or("").contains(&a.ip_like(dst_ip).to_string())
                })
            };
            assert!(
                wait_until(Duration::from_secs(5), || outbound(&z0)),
                "{what} {dst}: no outbound HBONE log:\n{}",
                z0.log()
            );
            assert!(
                wait_until(Duration::from_secs(5), || inbound(dst_ztunnel)),
                "{what} {dst}: no inbound HBONE log:\n{}",
                dst_ztunnel.log()
            );
        }
    }
    assert_eq!(z1.stat("inbound_plaintext_accepted"), 0, "cross-node traffic went in plaintext");
}

trait IpLike {
    fn ip_like(&self, like: IpAddr) -> IpAddr;
}

impl IpLike for Pod {
    fn ip_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv4() { self.ipv4 } else { self.ipv6 }
    }
}

fn issue(ca: &Ca, id: &SpiffeId, lifetime: Duration, now: SystemTime) -> WorkloadCertificate {
    let (key, csr) = new_key_and_csr(id).unwrap();
    workload_certificate(id.clone(), &key, ca.sign(&csr, id, lifetime, now).unwrap()).unwrap()
}

/// An HBONE client made of the `h2` crate and rustls directly: TLS with `own`, expecting
/// `server`, then one CONNECT to `target`. Returns the status and, on 200, what the
/// application greeted with and echoed.
async fn independent_connect(
    tcp: std::net::TcpStream,
    own: &WorkloadCertificate,
    bundle: &TrustBundle,
    server: &SpiffeId,
    target: SocketAddr,
) -> Result<(StatusCode, String), String> {
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let config = tls::client_config(own, bundle, server).unwrap();
    let name = ServerName::IpAddress(target.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (send, connection) = h2::client::handshake(tls).await.map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(connection);
    let mut send = send.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
    let request = Request::builder().method(Method::CONNECT).uri(target.to_string()).body(()).unwrap();
    let (response, mut stream) = send.send_request(request, false).map_err(|e| format!("send: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let status = response.status();
    if status != StatusCode::OK {
        return Ok((status, String::new()));
    }
    stream.send_data(Bytes::from_static(b"over hbone\n"), true).map_err(|e| e.to_string())?;
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("over hbone") {
            break;
        }
    }
    Ok((status, text))
}

#[test]
fn an_independent_http2_client_speaks_to_ztunnels_hbone_server() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let (b, x) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let node = cluster.nodes[0].name.clone();
    let z = Ztunnel::start_with(
        &cluster.nodes[0],
        &[b.workload_as(&node, true, "payment"), x.workload(&node, false)],
        &ca,
        &[],
    );
    z.wait_enrolled(&b.name);
    let _server = Server::start(&b, APP_PORT);
    let bundle = TrustBundle::new(std::slice::from_ref(ca.ca.root())).unwrap();
    let tester = issue(&ca.ca, &identity("tester"), Duration::from_secs(3600), SystemTime::now());
    let hbone = SocketAddr::new(b.ipv4, 15008);
    let rt = runtime();

    // CONNECT to B:8080: 200, then bytes both ways.
    let (status, text) = rt
        .block_on(independent_connect(
            tcp_from(&x.ns, hbone).unwrap(),
            &tester,
            &bundle,
            &identity("payment"),
            SocketAddr::new(b.ipv4, APP_PORT),
        ))
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(text.starts_with("peer=") && text.contains("over hbone"), "{text:?}");

    // CONNECT to an IP that is not this pod's: 400.
    let elsewhere = SocketAddr::new(x.ipv4, APP_PORT);
    let (status, _) = rt
        .block_on(independent_connect(
            tcp_from(&x.ns, hbone).unwrap(),
            &tester,
            &bundle,
            &identity("payment"),
            elsewhere,
        ))
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Nothing listening on the port: 503.
    let (status, _) = rt
        .block_on(independent_connect(
            tcp_from(&x.ns, hbone).unwrap(),
            &tester,
            &bundle,
            &identity("payment"),
            SocketAddr::new(b.ipv4, 9),
        ))
        .unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // Client certificates ztunnel must refuse: another CA, another trust domain, expired.
    let stranger_ca = Ca::generate("cluster.local").unwrap();
    let stranger = issue(&stranger_ca, &identity("tester"), Duration::from_secs(3600), SystemTime::now());
    let foreign_domain = issue(
        &ca.ca,
        &"spiffe://evil.example/ns/default/sa/tester".parse().unwrap(),
        Duration::from_secs(3600),
        SystemTime::now(),
    );
    let expired = issue(
        &ca.ca,
        &identity("tester"),
        Duration::from_secs(60),
        SystemTime::now() - Duration::from_secs(3600),
    );
    for (what, cert) in
        [("another CA", &stranger), ("another trust domain", &foreign_domain), ("expired", &expired)]
    {
        let result = rt.block_on(independent_connect(
            tcp_from(&x.ns, hbone).unwrap(),
            cert,
            &bundle,
            &identity("payment"),
            SocketAddr::new(b.ipv4, APP_PORT),
        ));
        assert!(result.is_err(), "a client certificate from {what} was accepted: {result:?}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || z.log().matches("mTLS handshake failed").count() >= 3),
        "{}",
        z.log()
    );
}

#[test]
fn ztunnels_client_speaks_to_an_independent_hbone_server() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let (a, d) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let node = cluster.nodes[0].name.clone();
    // d is meshed but lives on a node with no Warren ztunnel: the test's own HBONE server,
    // built from h2 and rustls, answers on its 15008.
    let workloads =
        [a.workload_as(&node, true, "checkout"), d.workload_as("another-node", true, "inventory")];
    let z = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    z.wait_enrolled(&a.name);

    let d_cert = issue(&ca.ca, &identity("inventory"), Duration::from_secs(3600), SystemTime::now());
    let bundle = TrustBundle::new(std::slice::from_ref(ca.ca.root())).unwrap();
    let listener = d.ns.run(|| std::net::TcpListener::bind("0.0.0.0:15008")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let server_config = Arc::new(tls::server_config(&d_cert, &bundle).unwrap());
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (tcp, _) =
                tokio::time::timeout(Duration::from_secs(10), listener.accept()).await.unwrap().unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(server_config).accept(tcp).await.unwrap();
            let client_id = tls::peer_identity(tls.get_ref().1.peer_certificates());
            let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            let mut conn = h2::server::handshake(tls).await.unwrap();
            let (request, mut respond) = conn.accept().await.unwrap().unwrap();
            let headers: Vec<(String, String)> = request
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            seen_tx
                .send((request.method().clone(), request.uri().to_string(), headers, client_id, alpn, sni))
                .unwrap();
            let mut send =
                respond.send_response(Response::builder().status(200).body(()).unwrap(), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = request.into_body();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
                send.send_data(chunk, false).unwrap();
            }
            let _ = send.send_data(Bytes::new(), true);
        })
    });

    let dst = SocketAddr::new(d.ipv4, APP_PORT);
    let stream = tcp_from(&a.ns, dst).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writeln!(writer, "hello inventory").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    assert_eq!(line, "hello inventory\n");

    let (method, uri, headers, client_id, alpn, sni) = seen_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(method, Method::CONNECT);
    assert_eq!(uri, dst.to_string());
    assert_eq!(client_id, Some(identity("checkout")));
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(sni, None, "HBONE clients send no SNI");
    let header =
        |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    assert!(header("forwarded").starts_with(&format!("for=\"{}:", a.ipv4)), "{headers:?}");
    assert!(header("baggage").contains("k8s.namespace.name=default"), "{headers:?}");
    let traceparent = header("traceparent");
    assert_eq!(traceparent.split('-').map(str::len).collect::<Vec<_>>(), [2, 32, 16, 2], "{traceparent}");
    drop(writer);
    let _ = server.join();
}

/// Pod `a` on node 0 and pod `b` (serving on APP_PORT) on node 1, both meshed, a ztunnel each.
struct TwoNodes {
    a: Pod,
    b: Pod,
    z0: Ztunnel,
    z1: Ztunnel,
    _server: Server,
    cluster: Cluster,
    _ca: MeshCa,
}

fn two_nodes(z0_args: &[&str], z1_args: &[&str]) -> TwoNodes {
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let a = cluster.nodes[0].add_pod();
    let b = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let workloads = [a.workload(&n0, true), b.workload(&n1, true)];
    let z0 = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, z0_args);
    let z1 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, z1_args);
    z0.wait_enrolled(&a.name);
    z1.wait_enrolled(&b.name);
    let _server = Server::start(&b, APP_PORT);
    TwoNodes { a, b, z0, z1, _server, cluster, _ca: ca }
}

#[test]
fn certificates_rotate_under_live_traffic_without_dropping_anything() {
    require_root();
    // Four-second certificates: renewed every two seconds.
    let args = ["--cert-lifetime-secs", "4"];
    // Bound whole: its other fields (the server, the cluster) must live as long as the test.
    let mesh = two_nodes(&args, &args);
    let (a, b, z0, z1) = (&mesh.a, &mesh.b, &mesh.z0, &mesh.z1);
    let dst = SocketAddr::new(b.ipv4, APP_PORT);

    let mut live = Client::connect(a, dst).unwrap();
    live.greeting().unwrap();
    let started = Instant::now();
    let mut exchanges = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let text = format!("message {exchanges}");
        assert_eq!(live.echo(&text).unwrap(), text, "the live connection broke during rotation");
        // A new connection each second also works with whatever certificate is current.
        if exchanges % 10 == 0 {
            let mut fresh = Client::connect(a, dst).unwrap();
            fresh.greeting().unwrap();
            assert_eq!(fresh.echo("fresh").unwrap(), "fresh");
        }
        exchanges += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    for z in [z0, z1] {
        let rotations = z.config_dump()["certificateRotations"].as_u64().unwrap();
        assert!(rotations >= 2, "{} renewed {rotations} times in 7 s with 4 s certificates", z.node);
    }
    assert_eq!(z0.stat("upstream_connect_failures"), 0);
}

#[test]
fn many_connections_share_pooled_hbone_connections() {
    require_root();
    let mesh = two_nodes(&["--pool-max-streams", "5"], &[]);
    let (a, b, z0) = (&mesh.a, &mesh.b, &mesh.z0);
    let dst = SocketAddr::new(b.ipv4, APP_PORT);

    // 20 connections open at once, 5 streams per connection: 4 HBONE connections.
    let mut clients: Vec<Client> = (0..20).map(|_| Client::connect(a, dst).unwrap()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.greeting().unwrap();
        assert_eq!(c.echo(&i.to_string()).unwrap(), i.to_string());
    }
    let pool = &z0.capture()["hbonePool"];
    assert_eq!(pool["opened"], 4, "{pool}");
    drop(clients);
    assert!(wait_until(Duration::from_secs(5), || z0.capture()["hbonePool"]["activeStreams"] == 0));
    // Later connections reuse the pooled ones.
    for _ in 0..10 {
        let mut c = Client::connect(a, dst).unwrap();
        c.greeting().unwrap();
    }
    assert_eq!(z0.capture()["hbonePool"]["opened"], 4);
}

/// The value of the first sample of `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
    metrics.lines().filter(|l| l.starts_with(&format!("{name}{{"))).find_map(|l| {
        let all = labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")));
        all.then(|| l.rsplit(' ').next()?.parse().ok())?
    })
}

#[test]
fn metrics_and_readiness_speak_istios_language() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let a = cluster.nodes[0].add_pod();
    let b = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let mut b_w = b.workload_as(&n1, true, "payment");
    b_w.labels.insert("app".into(), "payment".into());
    b_w.labels.insert("version".into(), "v2".into());
    let workloads = [a.workload_as(&n0, true, "checkout"), b_w];
    let z0 = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    let z1 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, &[]);
    z0.wait_enrolled(&a.name);
    z1.wait_enrolled(&b.name);
    let _server = Server::start(&b, APP_PORT);
    assert_eq!(z0.get_at("127.0.0.1:15021".parse().unwrap(), "/healthz/ready").unwrap(), "ready\n");

    let mut client = Client::connect(&a, SocketAddr::new(b.ipv4, APP_PORT)).unwrap();
    client.greeting().unwrap();
    assert_eq!(client.echo("0123456789").unwrap(), "0123456789");
    drop(client);

    let principals = [
        ("source_principal", "spiffe://cluster.local/ns/default/sa/checkout"),
        ("destination_principal", "spiffe://cluster.local/ns/default/sa/payment"),
        ("connection_security_policy", "mutual_tls"),
        ("destination_canonical_service", "payment"),
        ("destination_canonical_revision", "v2"),
        ("destination_workload_namespace", "default"),
    ];
    for (z, reporter) in [(&z0, "source"), (&z1, "destination")] {
        let mut labels = principals.to_vec();
        labels.push(("reporter", reporter));
        let ok = wait_until(Duration::from_secs(5), || {
            let m = z.get_at("127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap_or_default();
            sample(&m, "istio_tcp_connections_closed_total", &labels) == Some(1)
                && sample(&m, "istio_tcp_connections_opened_total", &labels) == Some(1)
                // 11 bytes each way, plus the greeting in the response direction.
                && sample(&m, "istio_tcp_received_bytes_total", &labels) == Some(11)
                && sample(&m, "istio_tcp_sent_bytes_total", &labels).is_some_and(|n| n > 11)
        });
        let m = z.get_at("127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap_or_default();
        assert!(ok, "{reporter} metrics wrong:\n{m}");
    }
}

/// How many file descriptors process `pid` has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("its descriptors").count()
}

/// Of connections a client opened to `port` and never wrote to, how many the server has
/// closed already. Non-blocking reads: hundreds take milliseconds, well inside the 10 s after
/// which a server lets every silent connection go anyway.
fn closed_by_server(held: &[std::net::TcpStream], port: &str) -> usize {
    use std::io::Read;
    held.iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            match (&**s).read(&mut [0u8; 1]) {
                Ok(0) => true,
                Ok(_) => panic!("bytes from {port} before the client sent any"),
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count()
}

/// The metrics port is open to the pod network; clients that connect and never send a
/// request must not pile up in ztunnel (each a task and a descriptor the data path needs):
/// beyond 64 open ones it closes new ones at once, and it closes silent ones after 10 s.
#[test]
fn silent_clients_cannot_hold_the_metrics_port() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let a = cluster.nodes[0].add_pod();
    let node = cluster.nodes[0].name.clone();
    let z = Ztunnel::start_with(&cluster.nodes[0], &[a.workload_as(&node, true, "checkout")], &ca, &[]);
    z.wait_enrolled(&a.name);
    let pid = z.pid().expect("running");
    let before = open_descriptors(pid);
    let metrics: SocketAddr = "127.0.0.1:15020".parse().unwrap();
    let held: Vec<std::net::TcpStream> = cluster.nodes[0].ns.run(move || {
        (0..200)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&metrics, Duration::from_secs(1)).ok())
            .collect()
    });
    assert_eq!(held.len(), 200, "the kernel accepts them all");
    // Those beyond the limit are closed right away (giving ztunnel a moment to take them all
    // from its accept queue).
    std::thread::sleep(Duration::from_millis(500));
    let grew = open_descriptors(pid).saturating_sub(before);
    let closed_now = closed_by_server(&held, "the metrics port");
    assert!(grew <= 64 + 4, "ztunnel holds {grew} more descriptors with 200 silent clients");
    assert!(closed_now >= 200 - 64 - 4, "only {closed_now} of 200 closed at once");
    assert!(
        wait_until(Duration::from_secs(5), || z.log().contains("the most it serves at once")),
        "no word of the refused connections:\n{}",
        z.log()
    );
    // The silent ones are let go after 10 s, while the test still holds its ends, and the
    // port answers again.
    let answered = wait_until(Duration::from_secs(20), || z.get_at(metrics, "/metrics").is_ok());
    assert!(answered, "the metrics port did not answer again:\n{}", z.log());
    drop(held);
}

/// One source that opens HBONE connections and never handshakes is held to its share
/// (`MAX_HANDSHAKES_PER_SOURCE`, 128): the rest are closed at once, ztunnel keeps its
/// descriptors, and another pod's traffic to the same pod still flows.
#[test]
fn one_source_cannot_fill_the_hbone_port_with_unfinished_handshakes() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let (server, client, flooder) =
        (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let node = cluster.nodes[0].name.clone();
    // The flooder is not enrolled: its connections to port 15008 reach ztunnel as they are.
    let z = Ztunnel::start_with(
        &cluster.nodes[0],
        &[server.workload(&node, true), client.workload(&node, true), flooder.workload(&node, false)],
        &ca,
        &[],
    );
    z.wait_enrolled(&server.name);
    z.wait_enrolled(&client.name);
    let _app = Server::start(&server, APP_PORT);
    let pid = z.pid().expect("running");
    let before = open_descriptors(pid);
    let hbone = SocketAddr::new(server.ipv4, 15008);
    let held: Vec<std::net::TcpStream> = flooder.ns.run(move || {
        // In batches, so that the listener's queue never overflows: what ztunnel closes is
        // then its own doing, not the kernel's.
        (0..300)
            .filter_map(|i| {
                if i % 20 == 19 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::net::TcpStream::connect_timeout(&hbone, Duration::from_secs(1)).ok()
            })
            .collect()
    });
    assert_eq!(held.len(), 300, "the kernel accepts them all");
    // Time for ztunnel to take them all from the listener's queue.
    std::thread::sleep(Duration::from_secs(2));
    let grew = open_descriptors(pid).saturating_sub(before);
    let closed_now = closed_by_server(&held, "the HBONE port");
    assert!(
        grew <= 128 + 8,
        "ztunnel holds {grew} more descriptors for one silent source ({closed_now} closed)"
    );
    assert!(closed_now >= 300 - 128 - 8, "only {closed_now} of 300 closed at once (ztunnel grew {grew})");
    assert!(
        wait_until(Duration::from_secs(5), || z
            .log()
            .contains("have not finished their TLS and HTTP/2 handshakes")),
        "no word of the refused connections:\n{}",
        z.log()
    );
    let metrics = z.get_at("127.0.0.1:15020".parse().unwrap(), "/metrics").expect("metrics");
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("warren_hbone_handshake_limit_refused_total "))
        .and_then(|n| n.trim().parse::<usize>().ok());
    assert!(
        counted.is_some_and(|n| n >= closed_now),
        "{closed_now} closed at once but {counted:?} counted:\n{metrics}"
    );
    // Meanwhile another source's connection to the same pod is served.
    let mut c = Client::connect(&client, SocketAddr::new(server.ipv4, APP_PORT)).expect("connect");
    c.greeting().expect("greeting through HBONE while the flood is held");
    assert_eq!(c.echo("unaffected").unwrap(), "unaffected");
    drop(held);
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let (a, b) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let node = cluster.nodes[0].name.clone();
    let mut z = Ztunnel::start_with(
        &cluster.nodes[0],
        &[a.workload(&node, true), b.workload(&node, true)],
        &ca,
        &["--drain-timeout-secs", "10"],
    );
    z.wait_enrolled(&a.name);
    z.wait_enrolled(&b.name);
    let _server = Server::start(&b, APP_PORT);
    let dst = SocketAddr::new(b.ipv4, APP_PORT);
    let mut live = Client::connect(&a, dst).unwrap();
    live.greeting().unwrap();

    z.terminate();
    assert!(wait_until(Duration::from_secs(3), || z.log().contains("SIGTERM: draining")));
    assert!(
        wait_until(Duration::from_secs(3), || Client::connect(&a, dst).is_err()),
        "new connections were still accepted while draining"
    );
    assert_eq!(
        live.echo("still draining").unwrap(),
        "still draining",
        "an open connection was cut by the drain"
    );
    assert!(!z.exits_within(Duration::from_millis(500)), "ztunnel exited with a connection open");
    drop(live);
    assert!(
        z.exits_within(Duration::from_secs(5)),
        "ztunnel did not exit once its connections closed:\n{}",
        z.log()
    );
    assert!(z.log().contains("drained"));
}

#[test]
fn a_service_vip_spreads_connections_over_endpoints_on_both_nodes() {
    use warren_core::model::{NodeConfig, Service, ServicePort};
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let (a, e0) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let e1 = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let workloads = vec![a.workload(&n0, true), e0.workload(&n0, true), e1.workload(&n1, true)];
    // A ClusterIP inside the test's own range: captured in the pod, it never hits the wire.
    let vip: IpAddr = "10.199.0.10".parse().unwrap();
    let service = Service {
        name: "payment".into(),
        namespace: "default".into(),
        vips: vec![vip],
        ports: vec![ServicePort { port: 80, target_port: APP_PORT }],
        endpoints: vec![e0.name.clone(), e1.name.clone()],
        waypoint: None,
        waypoint_namespace: None,
    };
    let config = NodeConfig { workloads: workloads.clone(), services: vec![service], ..Default::default() };
    let z0 = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    let z1 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, &[]);
    z0.apply_config(&config);
    z1.apply_config(&config);
    z0.wait_enrolled(&a.name);
    z0.wait_enrolled(&e0.name);
    z1.wait_enrolled(&e1.name);
    let (_s0, _s1) = (Server::start(&e0, APP_PORT), Server::start(&e1, APP_PORT));

    let mut answered_by = std::collections::HashMap::new();
    for _ in 0..20 {
        let mut c = Client::connect(&a, SocketAddr::new(vip, 80)).unwrap();
        // Delivered inside the endpoint pod: the greeting names the endpoint.
        *answered_by.entry(c.greeting().unwrap().ip()).or_insert(0) += 1;
    }
    assert_eq!(answered_by.get(&e0.ipv4), Some(&10), "{answered_by:?}");
    assert_eq!(answered_by.get(&e1.ipv4), Some(&10), "{answered_by:?}");
    let m = z0.get_at("127.0.0.1:15020".parse().unwrap(), "/metrics").unwrap();
    assert!(m.contains("destination_service=\"payment.default.svc.cluster.local\""), "{m}");
}

/// As a container runtime runs an unprivileged container: ztunnel in its own cgroup, seen
/// through a private cgroup namespace (its cgroup reads as `/`). It must still find its real
/// cgroup id, or its own HBONE connections from inside pods would be captured back into it.
#[test]
fn ztunnel_in_a_private_cgroup_namespace_still_exempts_its_own_sockets() {
    use std::os::unix::fs::MetadataExt;
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let (a, b) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let node = cluster.nodes[0].name.clone();
    let workloads = [a.workload_as(&node, true, "checkout"), b.workload_as(&node, true, "payment")];
    let z = Ztunnel::start_in_private_cgroup_namespace(&cluster.nodes[0], &workloads, &ca);
    z.wait_enrolled(&a.name);
    z.wait_enrolled(&b.name);
    let expected =
        std::fs::metadata(warren_e2e::cgroup2_mount().join("warren-e2e").join(&node)).unwrap().ino();
    let loaded = z
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "capture loaded; ztunnel's own sockets are exempt");
    let loaded = loaded.unwrap_or_else(|| panic!("{}", z.log()));
    assert_eq!(loaded["cgroup"], "/", "not in a private cgroup namespace: {loaded}");
    assert_eq!(loaded["cgroup_id"], expected, "{loaded}");
    let _server = Server::start(&b, APP_PORT);
    let mut c = Client::connect(&a, SocketAddr::new(b.ipv4, APP_PORT)).unwrap();
    c.greeting().unwrap();
    assert_eq!(c.echo("through the mesh").unwrap(), "through the mesh");
    assert_eq!(z.stat("hbone_streams_served"), 1, "not carried over HBONE:\n{}", z.log());
    // Its /proc/sys is read-only, as in the chart's unprivileged container: the hand-over
    // setting reaches the pods through a procfs of its own.
    for pod in [&a, &b] {
        let migrate = pod.ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req"));
        assert_eq!(migrate.unwrap().trim(), "1", "tcp_migrate_req in {}:\n{}", pod.name, z.log());
    }
}

/// A peer node that drops everything (as a node that died): the client's connection fails
/// after `--connect-timeout-ms`, reset by ztunnel, with an access line saying why — not after
/// the kernel's two minutes of SYN retries (the client would see its own read time out).
#[test]
fn a_peer_node_that_drops_everything_fails_the_connection_after_the_connect_timeout() {
    require_root();
    let mesh = two_nodes(&["--connect-timeout-ms", "1000"], &[]);
    let (a, b, z0) = (&mesh.a, &mesh.b, &mesh.z0);
    black_hole_node_1(&mesh);
    let mut c = Client::connect(a, SocketAddr::new(b.ipv4, APP_PORT)).expect("captured by ztunnel");
    let failed = c.greeting().expect_err("reached a pod on a node that drops everything");
    // The client's own read timeout (5 s) would be WouldBlock/TimedOut.
    assert!(
        matches!(failed.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof),
        "{failed:?}: the connection was not ended by ztunnel's connect timeout"
    );
    let outbound = z0.access_log("outbound");
    assert!(
        outbound.iter().any(|l| l["error"].as_str().is_some_and(|e| e.contains("within 1s"))),
        "{outbound:#?}"
    );
}

/// Node 1's underlay address now resolves to a MAC no one has: node 0's frames to it are
/// dropped without a word, SYNs included. (Before any connection, so none is pooled.)
fn black_hole_node_1(mesh: &TwoNodes) {
    let node1 = mesh.cluster.underlay_ips[1].to_string();
    mesh.cluster.nodes[0].ns.ip(&[
        "neigh",
        "replace",
        &node1,
        "lladdr",
        "02:00:5e:00:00:99",
        "dev",
        "uplink",
        "nud",
        "permanent",
    ]);
}

/// Eight connections at once to a pod on a node that drops everything: they wait behind one
/// HBONE dial and fail with it, after one connect timeout together. Before, each dialed the
/// dead node in turn when the one before had failed: the last waited eight timeouts, and
/// the pool counted eight failed dials.
#[test]
fn connections_waiting_behind_a_failed_hbone_dial_fail_with_it() {
    require_root();
    let mesh = two_nodes(&["--connect-timeout-ms", "1000"], &[]);
    let (a, b, z0) = (&mesh.a, &mesh.b, &mesh.z0);
    black_hole_node_1(&mesh);
    let dst = SocketAddr::new(b.ipv4, APP_PORT);
    let mut clients: Vec<Client> =
        (0..8).map(|_| Client::connect(a, dst).expect("captured by ztunnel")).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let failed = c.greeting().expect_err("reached a pod on a node that drops everything");
        assert!(
            matches!(failed.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof),
            "connection {i}: {failed:?}: not ended with the dial it waited behind\n{}",
            z0.log()
        );
    }
    let pool = &z0.capture()["hbonePool"];
    assert_eq!(pool["dialsFailed"], 1, "{pool}");
    assert_eq!(pool["opened"], 0, "{pool}");
    let outbound = z0.access_log("outbound");
    let failed =
        outbound.iter().filter(|l| l["error"].as_str().is_some_and(|e| e.contains("within 1s"))).count();
    assert_eq!(failed, 8, "every connection's access line names the timeout: {outbound:#?}");
}

/// A listener in `pod` on `port` whose connections are accepted with the smallest receive
/// buffer and never read: a stuck application.
fn stuck_server(pod: &Pod, port: u16) -> std::net::TcpListener {
    pod.ns
        .run(move || {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            // Set before listen: inherited by accepted sockets, and their window scale follows it.
            socket.set_recv_buffer_size(4096)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            socket.listen(64)?;
            Ok::<_, std::io::Error>(socket.into())
        })
        .unwrap()
}

#[test]
fn a_stuck_receiver_fed_tiny_writes_does_not_break_other_connections_on_its_hbone_connection() {
    require_root();
    // Connections from one pod to pods of one node share an HBONE connection. One of them
    // carries a trickle of 1-byte writes to an application that never reads: every write
    // is its own DATA frame, and they wait at the receiving ztunnel until the application
    // reads. h2 guards a connection against floods of small frames (past a budget it
    // closes the whole connection, GOAWAY ENHANCE_YOUR_CALM), so that trickle must not reach
    // h2's budget, or every other connection sharing the HBONE connection dies with it.
    let mesh = two_nodes(&[], &[]);
    let (a, b, z0) = (&mesh.a, &mesh.b, &mesh.z0);
    const STUCK_PORT: u16 = 9000;
    let _stuck = stuck_server(b, STUCK_PORT);
    let mut live = Client::connect(a, SocketAddr::new(b.ipv4, APP_PORT)).unwrap();
    live.greeting().unwrap();

    const CONNECTIONS: usize = 4;
    const TINY_WRITES: usize = 20_000;
    let stuck_dst = SocketAddr::new(b.ipv4, STUCK_PORT);
    let writers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let mut stream = tcp_from(&a.ns, stuck_dst).unwrap();
            stream.set_nodelay(true).unwrap();
            stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            std::thread::spawn(move || {
                // The receiving side's socket buffers first (large frames), then the trickle.
                let mut written = 0usize;
                let big = vec![b'x'; 64 * 1024];
                for _ in 0..48 {
                    if stream.write_all(&big).is_err() {
                        return (written, stream);
                    }
                    written += big.len();
                }
                let started = Instant::now();
                for _ in 0..TINY_WRITES {
                    if started.elapsed() > Duration::from_secs(30) || stream.write_all(b"y").is_err() {
                        break;
                    }
                    written += 1;
                    std::thread::sleep(Duration::from_micros(20));
                }
                (written, stream)
            })
        })
        .collect();
    let mut echoes = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let text = format!("still here {echoes}");
        assert_eq!(
            live.echo(&text).unwrap_or_else(|e| panic!(
                "the live connection broke after {echoes} echoes: {e}\n{}",
                mesh.z1.log()
            )),
            text
        );
        echoes += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let written: Vec<usize> = writers.into_iter().map(|w| w.join().unwrap().0).collect();
    eprintln!("written per stuck connection: {written:?}; {echoes} echoes");
    assert_eq!(live.echo("after").unwrap(), "after", "{}", mesh.z1.log());
    assert_eq!(z0.capture()["hbonePool"]["opened"], 1, "the HBONE connection was replaced: {}", z0.capture());
}
