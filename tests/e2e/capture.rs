//! eBPF capture and pod enrollment, end to end: the real ztunnel binary, its eBPF programs in
//! this kernel, pods in network namespaces. Traffic stays inside the namespaces made here.

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use warren_e2e::{
    app::{Client, Server},
    cgroup2_mount,
    foreign::PortRewrite,
    require_root,
    topology::Node,
    wait_until,
    ztunnel::Ztunnel,
};

const APP_PORT: u16 = 8080;
const ZTUNNEL_MARK: u32 = 0x539;

fn outbound_listener(dst: IpAddr) -> SocketAddr {
    if dst.is_ipv4() { "127.0.0.1:15001".parse().unwrap() } else { "[::1]:15001".parse().unwrap() }
}

#[test]
fn enrolled_pods_outbound_connects_reach_ztunnel_with_their_original_destination() {
    require_root();
    let mut node = Node::new();
    let (a, b) = (node.add_pod(), node.add_pod());
    let z = Ztunnel::start(&node, &[a.workload(&node.name, true), b.workload(&node.name, false)]);
    z.wait_enrolled(&a.name);
    let _server = Server::start(&b, APP_PORT);

    for dst_ip in [b.ipv4, b.ipv6] {
        let dst = SocketAddr::new(dst_ip, APP_PORT);
        let mut client = Client::connect(&a, dst).unwrap();
        // The kernel rewrote the connect to ztunnel's outbound listener in A's netns...
        assert_eq!(client.peer(), outbound_listener(dst_ip));
        // ...ztunnel read B:8080 as the original destination and connected there from A's
        // netns, so B sees A's own address.
        let seen = client.greeting().unwrap();
        let expected_src = if dst_ip.is_ipv4() { a.ipv4 } else { a.ipv6 };
        assert_eq!(seen.ip(), expected_src);
        assert_eq!(client.echo("ping").unwrap(), "ping");
        drop(client);
        assert!(
            wait_until(Duration::from_secs(5), || z
                .access_log("outbound")
                .iter()
                .any(|l| l["dst"] == dst.to_string())),
            "no outbound access-log line for {dst}:\n{}",
            z.log()
        );
    }

    // An IPv6 socket connecting to a v4-mapped address is captured too, over IPv4.
    let mapped = SocketAddr::new(
        match b.ipv4 {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        },
        APP_PORT,
    );
    let mut client = Client::connect(&a, mapped).unwrap();
    assert_eq!(client.peer(), "127.0.0.1:15001".parse().unwrap());
    assert_eq!(client.greeting().unwrap().ip(), a.ipv4);
    assert_eq!(z.stat("outbound_without_original_dst"), 0);
}

#[test]
fn an_unenrolled_pod_and_the_node_itself_are_not_captured() {
    require_root();
    let mut node = Node::new();
    let (a, b, c) = (node.add_pod(), node.add_pod(), node.add_pod());
    let z = Ztunnel::start(
        &node,
        &[a.workload(&node.name, true), b.workload(&node.name, false), c.workload(&node.name, false)],
    );
    z.wait_enrolled(&a.name);
    let _server = Server::start(&b, APP_PORT);

    for dst_ip in [b.ipv4, b.ipv6] {
        let dst = SocketAddr::new(dst_ip, APP_PORT);
        let mut client = Client::connect(&c, dst).unwrap();
        assert_eq!(client.peer(), dst, "the unenrolled pod's connect was rewritten");
        assert_eq!(client.greeting().unwrap().ip(), if dst_ip.is_ipv4() { c.ipv4 } else { c.ipv6 });
    }
    // The node's own netns (the test plays a node process there).
    let dst = SocketAddr::new(b.ipv4, APP_PORT);
    let node_stream =
        node.ns.run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))).unwrap();
    assert_eq!(node_stream.peer_addr().unwrap(), dst);
    assert_eq!(z.stat("outbound_accepted"), 0);
}

#[test]
fn ztunnels_own_sockets_are_exempt_but_a_pod_carrying_its_mark_is_captured() {
    require_root();
    let mut node = Node::new();
    let (a, b) = (node.add_pod(), node.add_pod());
    // Both enrolled: ztunnel's outbound connect from A's netns and its delivery inside B's
    // netns would loop back into ztunnel if they were captured.
    let z = Ztunnel::start(&node, &[a.workload(&node.name, true), b.workload(&node.name, true)]);
    z.wait_enrolled(&a.name);
    z.wait_enrolled(&b.name);
    let _server = Server::start(&b, APP_PORT);

    let mut client = Client::connect(&a, SocketAddr::new(b.ipv4, APP_PORT)).unwrap();
    // ztunnel delivers to the application from inside B's netns, so B sees its own IP.
    assert_eq!(client.greeting().unwrap().ip(), b.ipv4);
    assert_eq!(client.echo("no loop").unwrap(), "no loop");
    assert_eq!(z.stat("outbound_accepted"), 1);
    // Both meshed: ztunnel's HBONE connection from A's netns reached B's 15008 (not its own
    // 15001 again), and its delivery inside B reached the application (not 15006).
    assert_eq!(z.stat("hbone_streams_served"), 1);
    assert_eq!(z.stat("inbound_plaintext_accepted"), 0);

    // A pod that sets ztunnel's mark on its own socket is still captured: the exemption also
    // needs ztunnel's cgroup.
    let marked =
        Client::connect_with_mark(&a, SocketAddr::new(b.ipv4, APP_PORT), Some(ZTUNNEL_MARK)).unwrap();
    assert_eq!(marked.peer(), "127.0.0.1:15001".parse().unwrap());
}

#[test]
fn inbound_goes_to_ztunnels_listeners_and_fails_closed_without_them() {
    require_root();
    let mut node = Node::new();
    let (a, b, c) = (node.add_pod(), node.add_pod(), node.add_pod());
    let mut z = Ztunnel::start(
        &node,
        &[a.workload(&node.name, true), b.workload(&node.name, true), c.workload(&node.name, false)],
    );
    z.wait_enrolled(&a.name);
    z.wait_enrolled(&b.name);
    let server = Server::start(&b, APP_PORT);

    // Plaintext from an unenrolled pod lands on ztunnel's 15006 with B:8080 as its local
    // address, and ztunnel delivers it.
    let dst = SocketAddr::new(b.ipv4, APP_PORT);
    let mut client = Client::connect(&c, dst).unwrap();
    assert_eq!(client.greeting().unwrap().ip(), b.ipv4, "delivered by ztunnel inside B");
    assert_eq!(client.echo("in").unwrap(), "in");
    drop(client);
    assert!(wait_until(Duration::from_secs(5), || z
        .access_log("inbound")
        .iter()
        .any(|l| l["dst"] == dst.to_string()
            && l["src"].as_str().unwrap_or("").starts_with(&c.ipv4.to_string()))));
    // IPv6 too.
    let mut client6 = Client::connect(&c, SocketAddr::new(b.ipv6, APP_PORT)).unwrap();
    assert_eq!(client6.greeting().unwrap().ip(), b.ipv6);
    assert_eq!(z.stat("inbound_plaintext_accepted"), 2);

    // Port 15008 goes to the HBONE listener.
    let hbone = Client::connect(&c, SocketAddr::new(b.ipv4, 15008));
    assert!(hbone.is_ok(), "HBONE listener not reached: {:?}", hbone.err());
    assert!(wait_until(Duration::from_secs(5), || z.stat("hbone_accepted") == 1));

    // With ztunnel gone (its listeners closed, its programs still pinned), nothing reaches
    // the application: inbound is dropped, captured outbound is refused.
    z.stop();
    let before = server.accepted_count();
    let inbound = Client::connect(&c, dst);
    assert!(inbound.is_err(), "inbound connection bypassed the stopped ztunnel");
    let outbound = Client::connect(&a, SocketAddr::new(b.ipv4, APP_PORT));
    assert_eq!(outbound.err().map(|e| e.kind()), Some(ErrorKind::ConnectionRefused));
    assert_eq!(server.accepted_count(), before, "the application saw a connection");

    // A restarted ztunnel takes over the pinned state: capture works again.
    z.restart(&node);
    z.wait_enrolled(&b.name);
    z.wait_enrolled(&a.name);
    let mut again = Client::connect(&c, dst).unwrap();
    assert_eq!(again.greeting().unwrap().ip(), b.ipv4);
}

#[test]
fn enrolling_and_unenrolling_keep_live_connections_and_clean_up() {
    require_root();
    let mut node = Node::new();
    let (a, b) = (node.add_pod(), node.add_pod());
    let z = Ztunnel::start(&node, &[a.workload(&node.name, false), b.workload(&node.name, false)]);
    let _server = Server::start(&b, APP_PORT);
    let dst = SocketAddr::new(b.ipv4, APP_PORT);

    let mut direct = Client::connect(&a, dst).unwrap();
    assert_eq!(direct.peer(), dst);
    direct.greeting().unwrap();

    z.set_workloads(&[a.workload(&node.name, true), b.workload(&node.name, false)]);
    let enrolled = z.wait_enrolled(&a.name);
    let cookie = enrolled["netns_cookie"].as_u64().unwrap();
    assert!(z.capture()["enrolledMapCookies"].as_array().unwrap().contains(&cookie.into()));
    assert_eq!(direct.echo("still here").unwrap(), "still here", "enrollment broke a live connection");

    let mut captured = Client::connect(&a, dst).unwrap();
    assert_eq!(captured.peer(), "127.0.0.1:15001".parse().unwrap());
    captured.greeting().unwrap();

    z.set_workloads(&[a.workload(&node.name, false), b.workload(&node.name, false)]);
    z.wait_unenrolled(&a.name);
    assert_eq!(captured.echo("relayed").unwrap(), "relayed", "unenrollment broke a relayed connection");
    assert_eq!(direct.echo("direct").unwrap(), "direct");
    let after = Client::connect(&a, dst).unwrap();
    assert_eq!(after.peer(), dst, "still captured after unenrolling");
    let view = z.capture();
    assert!(!view["enrolledMapCookies"].as_array().unwrap().contains(&cookie.into()));
    assert!(!z.pin_dir().join(format!("links/sk_lookup-{cookie}")).exists(), "sk_lookup pin left behind");

    // Deleting an enrolled pod's netns unenrolls it and removes its entries.
    let mut d = node.add_pod();
    z.set_workloads(&[d.workload(&node.name, true)]);
    let cookie = z.wait_enrolled(&d.name)["netns_cookie"].as_u64().unwrap();
    assert!(z.pin_dir().join(format!("links/sk_lookup-{cookie}")).exists());
    d.ns.delete();
    z.wait_unenrolled(&d.name);
    assert!(!z.capture()["enrolledMapCookies"].as_array().unwrap().contains(&cookie.into()));
    assert!(!z.pin_dir().join(format!("links/sk_lookup-{cookie}")).exists());
}

#[test]
fn a_foreign_connect4_program_on_the_same_cgroup_keeps_working_beside_ours() {
    require_root();
    let mut node = Node::new();
    let (a, b, c) = (node.add_pod(), node.add_pod(), node.add_pod());
    let z = Ztunnel::start(
        &node,
        &[a.workload(&node.name, true), b.workload(&node.name, false), c.workload(&node.name, false)],
    );
    z.wait_enrolled(&a.name);
    let _server = Server::start(&b, APP_PORT);
    let IpAddr::V4(b4) = b.ipv4 else { unreachable!() };
    // Another agent's socket load balancer: B:9999 is really B:8080.
    let _foreign = PortRewrite::attach(&cgroup2_mount(), b4, 9999, APP_PORT).unwrap();

    // Unenrolled pod: only the foreign program acts.
    let mut direct = Client::connect(&c, SocketAddr::new(b.ipv4, 9999)).unwrap();
    assert_eq!(direct.peer(), SocketAddr::new(b.ipv4, APP_PORT));
    direct.greeting().unwrap();
    // Enrolled pod: ours captures to ztunnel; ztunnel's own connect to B:9999 then passes
    // through the foreign program, which still rewrites it.
    let mut captured = Client::connect(&a, SocketAddr::new(b.ipv4, 9999)).unwrap();
    assert_eq!(captured.peer(), "127.0.0.1:15001".parse().unwrap());
    assert_eq!(captured.greeting().unwrap().ip(), a.ipv4);
    assert_eq!(captured.echo("both ran").unwrap(), "both ran");
}

#[test]
fn ten_thousand_short_connections_leave_no_stale_map_entries() {
    require_root();
    const CONNECTIONS: usize = 10_000;
    let mut node = Node::new();
    let (a, b) = (node.add_pod(), node.add_pod());
    let z = Ztunnel::start(&node, &[a.workload(&node.name, true), b.workload(&node.name, false)]);
    z.wait_enrolled(&a.name);
    let server = Server::start(&b, APP_PORT);
    let dst = SocketAddr::new(b.ipv4, APP_PORT);

    let done = a.ns.run(move || {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut done = 0;
        while done < CONNECTIONS && Instant::now() < deadline {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut byte = [0u8; 1];
            if s.read_exact(&mut byte).is_ok() {
                done += 1;
            }
        }
        done
    });
    assert_eq!(done, CONNECTIONS, "connections did not complete in time");
    assert!(server.accepted_count() >= CONNECTIONS);
    let clean = wait_until(Duration::from_secs(10), || {
        let v = z.capture();
        v["originalDstEntries"] == 0 && v["pendingDstEntries"] == 0
    });
    let v = z.capture();
    assert!(
        clean,
        "stale entries: originalDst={} pendingDst={}",
        v["originalDstEntries"], v["pendingDstEntries"]
    );
    assert_eq!(v["stats"]["outbound_without_original_dst"], 0);
}

#[test]
fn pods_without_an_ip_or_sharing_one_are_not_enrolled_and_say_why() {
    require_root();
    let mut node = Node::new();
    let (a, b, c) = (node.add_pod(), node.add_pod(), node.add_pod());
    let mut no_ip = a.workload(&node.name, true);
    no_ip.ips.clear();
    let first = b.workload(&node.name, true);
    let mut second = c.workload(&node.name, true);
    second.ips = first.ips.clone();
    let z = Ztunnel::start(&node, &[no_ip, first, second]);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let log = z.log();
            log.contains("has no IP yet") && log.contains("both claim IP")
        }),
        "{}",
        z.log()
    );
    assert!(z.capture()["pods"].as_array().unwrap().is_empty());
    assert!(z.capture()["enrolledMapCookies"].as_array().unwrap().is_empty());
    // Nothing is half-enrolled: B's traffic goes direct.
    let _server = Server::start(&c, APP_PORT);
    let dst = SocketAddr::new(c.ipv4, APP_PORT);
    assert_eq!(Client::connect(&b, dst).unwrap().peer(), dst);
}
