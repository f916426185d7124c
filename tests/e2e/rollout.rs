//! A ztunnel rolling update on one node, new before old (the chart's `maxSurge: 1`,
//! `maxUnavailable: 0`): the new ztunnel starts beside the old one, in its own cgroup, on the
//! same node ports, pins and in-pod addresses; then the old one gets SIGTERM and drains.
//! Real processes, eBPF and network namespaces throughout.

use std::{
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use warren_e2e::{
    app::{Client, Server},
    require_root,
    topology::{Cluster, Pod},
    wait_until,
    ztunnel::{MeshCa, Ztunnel, binary},
};

const APP_PORT: u16 = 8080;
/// The old ztunnel's drain: long enough to see its open connections carry on, short enough
/// for a test.
const DRAIN_SECS: u64 = 4;
/// Bounds of each loop of new connections, whatever happens.
const MAX_CONNECTS: usize = 3000;
const LOOP_DEADLINE: Duration = Duration::from_secs(120);

/// One new connection of a loop: when it started, the client's port (what the ztunnels'
/// access logs show as the source port), and how it went.
struct Attempt {
    started: Instant,
    port: u16,
    result: Result<(), String>,
}

/// New connections from `pod` to `dst`, one after another until `stop` (or the bounds), each
/// a greeting and an echo round trip.
fn connect_loop(pod: &Pod, dst: SocketAddr, stop: &AtomicBool, out: &Mutex<Vec<Attempt>>) {
    let deadline = Instant::now() + LOOP_DEADLINE;
    for i in 0..MAX_CONNECTS {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return;
        }
        let started = Instant::now();
        let mut port = 0;
        let result = Client::connect(pod, dst).map_err(|e| format!("connect: {e}")).and_then(|mut c| {
            port = c.stream.local_addr().map(|a| a.port()).unwrap_or(0);
            c.greeting().map_err(|e| format!("greeting: {e}"))?;
            let text = format!("hello {i}");
            match c.echo(&text) {
                Ok(echo) if echo == text => Ok(()),
                Ok(echo) => Err(format!("echo: got {echo:?}")),
                Err(e) => Err(format!("echo: {e}")),
            }
        });
        out.lock().unwrap().push(Attempt { started, port, result });
        std::thread::sleep(Duration::from_millis(15));
    }
}

fn count_since(attempts: &Mutex<Vec<Attempt>>, since: Instant) -> usize {
    attempts.lock().unwrap().iter().filter(|a| a.started >= since).count()
}

/// Waits until the loop has made `n` more connections since `since`.
fn wait_for_connects(attempts: &Mutex<Vec<Attempt>>, since: Instant, n: usize, what: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || count_since(attempts, since) >= n),
        "{what}: the loop made only {} connections",
        count_since(attempts, since)
    );
}

/// Source ports of the completed connections a ztunnel logged in `direction` towards `dst`
/// from `src_ip`.
fn logged_ports(z: &Ztunnel, direction: &str, src_ip: std::net::IpAddr, dst: SocketAddr) -> Vec<u16> {
    z.access_log(direction)
        .iter()
        .filter(|l| l["dst"] == dst.to_string() && l["error"].as_str().is_none_or(str::is_empty))
        .filter_map(|l| l["src"].as_str()?.parse::<SocketAddr>().ok())
        .filter(|src| src.ip() == src_ip)
        .map(|src| src.port())
        .collect()
}

fn enrolled_in_log(z: &Ztunnel, pod: &Pod) -> bool {
    z.log_lines().iter().any(|l| l["message"] == "enrolled" && l["pod"] == format!("default/{}", pod.name))
}

#[test]
fn a_new_ztunnel_takes_over_before_the_old_one_leaves_and_no_connection_fails() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    // Node 0 is the one rolled: a client pod and a server pod on it.
    let (client, server) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    // And one that joins the mesh while both ztunnels run.
    let late = cluster.nodes[0].add_pod();
    // Node 1: a server (outbound destination), a meshed client (inbound source over HBONE),
    // and an unmeshed one (inbound source in plaintext).
    let (remote, remote_client, legacy) =
        (cluster.nodes[1].add_pod(), cluster.nodes[1].add_pod(), cluster.nodes[1].add_pod());
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let workloads = [
        client.workload(&n0, true),
        server.workload(&n0, true),
        remote.workload(&n1, true),
        remote_client.workload(&n1, true),
        legacy.workload(&n1, false),
    ];
    let drain = DRAIN_SECS.to_string();
    let drain_args = ["--drain-timeout-secs", drain.as_str()];
    let mut old = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &drain_args);
    let z1 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, &[]);
    for (z, pod) in [(&old, &client), (&old, &server), (&z1, &remote), (&z1, &remote_client)] {
        z.wait_enrolled(&pod.name);
    }
    let _remote_app = Server::start(&remote, APP_PORT);
    let _server_app = Server::start(&server, APP_PORT);
    let _late_app = Server::start(&late, APP_PORT);
    let (outbound_dst, inbound_dst) =
        (SocketAddr::new(remote.ipv4, APP_PORT), SocketAddr::new(server.ipv4, APP_PORT));
    let mut with_late = workloads.to_vec();
    with_late.push(late.workload(&n0, true));
    // ztunnel turned on request migration in the pods it entered: what a listener still holds
    // in its queue when it closes goes to its sibling.
    for pod in [&client, &server] {
        let migrate = pod.ns.run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req"));
        assert_eq!(migrate.unwrap().trim(), "1", "tcp_migrate_req in {}", pod.name);
    }

    // (2) Long-lived connections through the old ztunnel, out of and into node 0.
    let mut out_live = Client::connect(&client, outbound_dst).expect("long-lived outbound");
    out_live.greeting().unwrap();
    let mut in_live = Client::connect(&remote_client, inbound_dst).expect("long-lived inbound");
    in_live.greeting().unwrap();
    let both_live = |out_live: &mut Client, in_live: &mut Client, when: &str| {
        for (live, what) in [(out_live, "outbound"), (in_live, "inbound")] {
            let text = format!("{what} {when}");
            assert_eq!(live.echo(&text).ok(), Some(text.clone()), "the long-lived {what} connection, {when}");
        }
    };
    both_live(&mut out_live, &mut in_live, "before the new ztunnel");

    let stop = AtomicBool::new(false);
    let (outbound, inbound) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
    let (mut new, new_ready, old_terminated, old_exited) = std::thread::scope(|scope| {
        // (4) New connections all along, out of node 0 and into it.
        scope.spawn(|| connect_loop(&client, outbound_dst, &stop, &outbound));
        scope.spawn(|| connect_loop(&remote_client, inbound_dst, &stop, &inbound));
        let stop_on_panic = StopOnDrop(&stop);
        let t0 = Instant::now();
        wait_for_connects(&outbound, t0, 20, "before the new ztunnel");
        wait_for_connects(&inbound, t0, 20, "before the new ztunnel");

        // (3) The new ztunnel, beside the old one: its own cgroup, the same everything else.
        // It returns once ready on its own readiness socket.
        let new = Ztunnel::start_beside(&cluster.nodes[0], &workloads, &ca, "new", &drain_args);
        let new_ready = Instant::now();
        assert!(enrolled_in_log(&new, &client) && enrolled_in_log(&new, &server), "{}", new.log());
        let probe = std::process::Command::new(binary("ztunnel"))
            .arg("ready")
            .arg("--socket")
            .arg(new.readiness_socket())
            .output()
            .expect("ztunnel ready");
        assert!(probe.status.success(), "ztunnel ready: {}", String::from_utf8_lossy(&probe.stderr));
        both_live(&mut out_live, &mut in_live, "beside the new ztunnel");
        wait_for_connects(&outbound, new_ready, 30, "with both ztunnels");
        wait_for_connects(&inbound, new_ready, 30, "with both ztunnels");

        // New TCP connections into node 0 go to the new ztunnel at once (the listener map
        // names its sockets; sk_lookup picks exactly those). Plaintext from an unmeshed pod
        // shows it: each is a new connection to the pod, not a stream on a pooled one.
        let mut plaintext_ports = Vec::new();
        for i in 0..20 {
            let mut c = Client::connect(&legacy, inbound_dst).expect("plaintext into node 0");
            c.greeting().unwrap();
            assert_eq!(c.echo(&format!("plain {i}")).unwrap(), format!("plain {i}"));
            plaintext_ports.push(c.stream.local_addr().unwrap().port());
        }

        // A pod enrolled while both run, by the old ztunnel last: the listener map names the old
        // one's sockets for it, and they go when it exits. The new one must put its own back.
        new.set_workloads(&with_late);
        assert!(wait_until(Duration::from_secs(10), || enrolled_in_log(&new, &late)), "{}", new.log());
        old.set_workloads(&with_late);
        assert!(wait_until(Duration::from_secs(10), || enrolled_in_log(&old, &late)), "{}", old.log());

        // (5) SIGTERM to the old one: it drains, its open connections carry on meanwhile.
        old.terminate();
        let old_terminated = Instant::now();
        assert!(wait_until(Duration::from_secs(3), || old.log().contains("SIGTERM: draining")));
        both_live(&mut out_live, &mut in_live, "while the old ztunnel drains");
        wait_for_connects(&outbound, old_terminated, 20, "while the old ztunnel drains");
        wait_for_connects(&inbound, old_terminated, 20, "while the old ztunnel drains");
        assert!(
            old.exits_within(Duration::from_secs(DRAIN_SECS + 10)),
            "the old ztunnel did not exit after its drain:\n{}",
            old.log()
        );
        let old_exited = Instant::now();
        assert!(
            old.log().contains("drain timeout"),
            "the long-lived connections held the drain:\n{}",
            old.log()
        );
        // The old ztunnel must leave the node's pins to the new one.
        old.keep_pins_on_drop();
        assert!(
            wait_until(Duration::from_secs(5), || new.log().contains("listener-map entry restored")),
            "the new ztunnel did not restore the late pod's listener-map entries:\n{}",
            new.log()
        );
        let late_dst = SocketAddr::new(late.ipv4, APP_PORT);
        let mut c = Client::connect(&legacy, late_dst).expect("into the late pod after the old ztunnel left");
        c.greeting().unwrap();
        assert_eq!(c.echo("late").unwrap(), "late");
        let port = c.stream.local_addr().unwrap().port();
        drop(c);
        assert!(
            wait_until(Duration::from_secs(5), || logged_ports(&new, "inbound", legacy.ipv4, late_dst)
                .contains(&port)),
            "the late pod's inbound connection was not the new ztunnel's"
        );
        wait_for_connects(&outbound, old_exited, 50, "after the old ztunnel left");
        wait_for_connects(&inbound, old_exited, 50, "after the old ztunnel left");
        for (what, attempts) in [("outbound", &outbound), ("inbound", &inbound)] {
            let n = attempts.lock().unwrap().len();
            assert!(
                wait_until(Duration::from_secs(30), || attempts.lock().unwrap().len() >= 200),
                "{what}: {n} connections in all"
            );
        }
        drop(stop_on_panic);

        // Plaintext connections made beside both ztunnels went to the new one only.
        let new_plain = logged_ports(&new, "inbound", legacy.ipv4, inbound_dst);
        let old_plain = logged_ports(&old, "inbound", legacy.ipv4, inbound_dst);
        for port in &plaintext_ports {
            assert!(
                new_plain.contains(port) && !old_plain.contains(port),
                "plaintext connection from port {port} not served by the new ztunnel alone\nnew: {new_plain:?}\nold: {old_plain:?}"
            );
        }
        (new, new_ready, old_terminated, old_exited)
    });

    // (6) The long-lived connections lived through the old ztunnel's drain (checked above)
    // and were closed when it ended: they were its connections. Reads see EOF or a reset.
    for (live, what) in [(&mut out_live, "outbound"), (&mut in_live, "inbound")] {
        let answer = live.echo("after the old ztunnel left");
        assert!(
            answer.as_deref().is_ok_and(str::is_empty) || answer.is_err(),
            "the long-lived {what} connection outlived the old ztunnel's drain: {answer:?}"
        );
    }

    // Not one new connection failed, in any phase.
    for (what, attempts) in [("outbound", &outbound), ("inbound", &inbound)] {
        let attempts = attempts.lock().unwrap();
        let failures: Vec<_> = attempts
            .iter()
            .filter_map(|a| a.result.as_ref().err().map(|e| (a.started.duration_since(new_ready), e)))
            .collect();
        let phase = |from: Instant, to: Instant| {
            attempts.iter().filter(|a| a.started >= from && a.started < to).count()
        };
        let far = Instant::now() + Duration::from_secs(3600);
        let t0 = attempts[0].started;
        eprintln!(
            "{what}: {} connections: {} before the new ztunnel, {} beside it, {} during the drain, {} after",
            attempts.len(),
            phase(t0, new_ready),
            phase(new_ready, old_terminated),
            phase(old_terminated, old_exited),
            phase(old_exited, far)
        );
        assert!(
            failures.is_empty(),
            "{what}: {} failed connections (time from the new ztunnel ready): {failures:?}",
            failures.len()
        );
    }

    // Every connection made after the old ztunnel left went through the new one: its access
    // log has each, by the client's source port.
    let access = |z: &Ztunnel, direction, src_ip, dst| logged_ports(z, direction, src_ip, dst);
    let checks = [
        ("outbound", &outbound, client.ipv4, outbound_dst),
        ("inbound", &inbound, remote_client.ipv4, inbound_dst),
    ];
    for (direction, attempts, src_ip, dst) in checks {
        let after: Vec<u16> =
            attempts.lock().unwrap().iter().filter(|a| a.started >= old_exited).map(|a| a.port).collect();
        let mut logged = Vec::new();
        let all_logged = wait_until(Duration::from_secs(10), || {
            logged = access(&new, direction, src_ip, dst);
            after.iter().all(|p| logged.contains(p))
        });
        assert!(
            all_logged,
            "{direction}: connections after the old ztunnel left missing from the new one's access log"
        );
    }

    // The new ztunnel alone is exempt now, and capture is its own: the pins hold its links.
    let view = new.capture();
    assert_eq!(view["exemptCgroups"].as_array().map(Vec::len), Some(1), "{view:#}");
    let pods: Vec<&Value> = view["pods"].as_array().unwrap().iter().collect();
    assert_eq!(pods.len(), 3, "{view:#}");
    new.stop();
}

/// Stops the loops when the scope unwinds on a failed assertion (else the scope would wait
/// for them to run out their bounds).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// An update from a release before hand-over support: its ztunnel shares no port and its
/// programs exempt its own cgroup only. The new ztunnel must start beside it without enrolling
/// (its connections out of pods would be captured by the old programs: a loop), without
/// removing anything the old one enrolled (a bypass), and take over once the old one exits.
/// Connections fail only in that gap, closed (never around the mesh).
///
/// Needs such a binary: `WARREN_EARLIER_ZTUNNEL=/path/to/ztunnel` (built from a commit before
/// hand-over support); skipped without it.
#[test]
fn an_update_from_a_release_without_hand_over_waits_for_it_and_never_loops_or_bypasses() {
    require_root();
    let Some(earlier) = std::env::var_os("WARREN_EARLIER_ZTUNNEL") else {
        eprintln!(
            "skipped: set WARREN_EARLIER_ZTUNNEL to a ztunnel binary of a release before hand-over support"
        );
        return;
    };
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let (client, server) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let (remote, remote_client) = (cluster.nodes[1].add_pod(), cluster.nodes[1].add_pod());
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let workloads = [
        client.workload(&n0, true),
        server.workload(&n0, true),
        remote.workload(&n1, true),
        remote_client.workload(&n1, true),
    ];
    let drain_args = ["--drain-timeout-secs", "2"];
    let mut old =
        Ztunnel::start_earlier_release(&cluster.nodes[0], &workloads, &ca, earlier.into(), &drain_args);
    let z1 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, &[]);
    for (z, pod) in [(&old, &client), (&old, &server), (&z1, &remote), (&z1, &remote_client)] {
        z.wait_enrolled(&pod.name);
    }
    let _remote_app = Server::start(&remote, APP_PORT);
    let _server_app = Server::start(&server, APP_PORT);
    let (outbound_dst, inbound_dst) =
        (SocketAddr::new(remote.ipv4, APP_PORT), SocketAddr::new(server.ipv4, APP_PORT));

    let stop = AtomicBool::new(false);
    let (outbound, inbound) = (Mutex::new(Vec::new()), Mutex::new(Vec::new()));
    let (new, new_ready, old_terminated, new_took_over) = std::thread::scope(|scope| {
        scope.spawn(|| connect_loop(&client, outbound_dst, &stop, &outbound));
        scope.spawn(|| connect_loop(&remote_client, inbound_dst, &stop, &inbound));
        let stop_on_panic = StopOnDrop(&stop);
        let t0 = Instant::now();
        wait_for_connects(&outbound, t0, 20, "before the new ztunnel");

        let new = Ztunnel::start_beside(&cluster.nodes[0], &workloads, &ca, "new", &[]);
        let new_ready = Instant::now();
        let says = |text: &str| new.log().contains(text);
        assert!(says("a ztunnel of a release before hand-over support still runs"), "{}", new.log());
        assert!(!enrolled_in_log(&new, &client), "enrolled beside the earlier release:\n{}", new.log());
        wait_for_connects(&outbound, new_ready, 40, "beside the earlier release");
        wait_for_connects(&inbound, new_ready, 40, "beside the earlier release");

        old.terminate();
        let old_terminated = Instant::now();
        assert!(old.exits_within(Duration::from_secs(15)), "{}", old.log());
        old.keep_pins_on_drop();
        assert!(
            wait_until(Duration::from_secs(10), || enrolled_in_log(&new, &client)
                && enrolled_in_log(&new, &server)),
            "the new ztunnel did not take over:\n{}",
            new.log()
        );
        let new_took_over = Instant::now();
        wait_for_connects(&outbound, new_took_over, 40, "after the take-over");
        wait_for_connects(&inbound, new_took_over, 40, "after the take-over");
        drop(stop_on_panic);
        (new, new_ready, old_terminated, new_took_over)
    });

    for (what, attempts, src_ip, dst) in [
        ("outbound", &outbound, client.ipv4, outbound_dst),
        ("inbound", &inbound, remote_client.ipv4, inbound_dst),
    ] {
        let attempts = attempts.lock().unwrap();
        // Beside the earlier release, and once the new ztunnel took over: not one failure.
        let failed = |from: Instant, to: Instant| {
            attempts.iter().filter(|a| a.started >= from && a.started < to && a.result.is_err()).count()
        };
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(failed(new_ready, old_terminated), 0, "{what}: failures beside the earlier release");
        // One connection may straddle the moment the new ztunnel enrolled.
        assert!(
            failed(new_took_over + Duration::from_millis(500), far) == 0,
            "{what}: failures after the take-over"
        );
        let gap = failed(old_terminated, new_took_over);
        eprintln!("{what}: {} connections, {gap} refused in the old-then-new gap", attempts.len());
        // Every connection that succeeded was carried by a ztunnel: none went around the mesh.
        let mut proxied =
            logged_ports(&new, if what == "outbound" { "outbound" } else { "inbound" }, src_ip, dst);
        let direction = if what == "outbound" { "outbound" } else { "inbound" };
        let old_log: Vec<Value> = old.log_lines();
        proxied.extend(
            old_log
                .iter()
                .filter(|l| {
                    l["target"] == "access" && l["direction"] == direction && l["dst"] == dst.to_string()
                })
                .filter_map(|l| l["src"].as_str()?.parse::<SocketAddr>().ok())
                .filter(|src| src.ip() == src_ip)
                .map(|src| src.port()),
        );
        // The long-running loop's last connections may still be logging.
        let unproxied: Vec<u16> = attempts
            .iter()
            .filter(|a| a.result.is_ok() && !proxied.contains(&a.port))
            .map(|a| a.port)
            .collect();
        assert!(
            unproxied.len() <= 1,
            "{what}: connections no ztunnel logged (around the mesh?): {unproxied:?}"
        );
    }
    let view = new.capture();
    assert_eq!(view["exemptCgroups"].as_array().map(Vec::len), Some(1), "{view:#}");
    assert_eq!(view["pods"].as_array().map(Vec::len), Some(2), "{view:#}");
}

/// A ztunnel killed without draining leaves its cgroup in the exempt map (harmless: nothing
/// runs in it any more); the next ztunnel to start removes it, and pods are served again.
#[test]
fn the_exemption_a_killed_ztunnel_left_is_removed_by_the_next_one() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let (client, server) = (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let node = cluster.nodes[0].name.clone();
    let workloads = [client.workload(&node, true), server.workload(&node, true)];
    let mut killed = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    killed.wait_enrolled(&client.name);
    assert_eq!(killed.capture()["exemptCgroups"].as_array().map(Vec::len), Some(1));
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(killed.pid().expect("running") as i32, libc::SIGKILL) };
    assert!(killed.exits_within(Duration::from_secs(5)));
    killed.keep_pins_on_drop();

    let next = Ztunnel::start_beside(&cluster.nodes[0], &workloads, &ca, "next", &[]);
    assert!(
        next.settled_log().contains("removing the exemption of a ztunnel that is gone"),
        "{}",
        next.log()
    );
    next.wait_enrolled(&client.name);
    assert_eq!(next.capture()["exemptCgroups"].as_array().map(Vec::len), Some(1), "{:#}", next.capture());
    let _app = Server::start(&server, APP_PORT);
    let mut c =
        Client::connect(&client, SocketAddr::new(server.ipv4, APP_PORT)).expect("through the next ztunnel");
    c.greeting().unwrap();
    assert_eq!(c.echo("after a kill").unwrap(), "after a kill");
}
