//! The L4 data path: client pod -> (path) -> server pod, with the paths measured in one run,
//! interleaved:
//!
//! - direct: pod to pod, nothing in between (the physical limit);
//! - relay: a plain user-space TCP relay on each node (haproxy, one per node);
//! - relay+mTLS: the same pair with mutual TLS between them (what two TLS-terminating proxies
//!   cost);
//! - Warren cross-node: client pod -> ztunnel -> HBONE -> ztunnel -> server pod;
//! - Warren same-node: both pods on one node, through its ztunnel twice;
//! - Warren through the waypoint: client pod -> ztunnel -> HBONE -> waypoint -> HBONE ->
//!   ztunnel -> server pod, for a service that uses a waypoint. The benchmark's bytes are not
//!   HTTP, so the waypoint sniffs them and passes them through as TCP. Its sniffer decides on
//!   the first byte here (0x07 and 0x01 are neither an HTTP method's first letter nor the
//!   start of the HTTP/2 preface; the throughput payload is 128 KiB of 'Z', past the 8-byte
//!   method window at once), so no connection waits for the sniff timeout; the request/response
//!   figures come after 200 warm-up exchanges in any case (the steady state of one connection).
//!
//! Every process of the path is pinned to vCPU 0 (see shared/benchmarking.md).

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use warren_core::model::{NodeConfig, Service, ServicePort, WAYPOINT_LABEL};
use warren_e2e::{
    topology::{Cluster, Node, Pod},
    wait_until,
    waypoint::Waypoint,
    ztunnel::{MeshCa, PIN_CPU, Ztunnel, pin_command},
};

use super::{load, stats};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Direct,
    Relay,
    RelayMtls,
    WarrenCrossNode,
    WarrenSameNode,
    WarrenWaypoint,
}

pub const PATHS: [Path; 6] = [
    Path::Direct,
    Path::Relay,
    Path::RelayMtls,
    Path::WarrenCrossNode,
    Path::WarrenSameNode,
    Path::WarrenWaypoint,
];

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct pod to pod",
            Path::Relay => "plain TCP relay pair (haproxy)",
            Path::RelayMtls => "mTLS relay pair (haproxy)",
            Path::WarrenCrossNode => "Warren L4, cross-node (HBONE)",
            Path::WarrenSameNode => "Warren L4, same node (HBONE)",
            Path::WarrenWaypoint => "Warren via the waypoint, cross-node (TCP passthrough)",
        }
    }
    fn enrolled(self) -> bool {
        matches!(self, Path::WarrenCrossNode | Path::WarrenSameNode | Path::WarrenWaypoint)
    }
}

/// The VIP of the service whose traffic goes through the waypoint (ports as the server's).
const WAYPOINT_VIP: &str = "10.199.2.10";

/// Relay ports on the client's node (plain, mTLS); each is base + the server port's offset.
const RELAY_BASE: u16 = 20000;
const RELAY_MTLS_BASE: u16 = 21000;
const HOP_BASE: u16 = 22000;
const HOP_MTLS_BASE: u16 = 23000;

pub struct Settings {
    pub rounds: usize,
    pub rr_iterations: usize,
    pub crr_duration: Duration,
    pub throughput_duration: Duration,
    /// The most connections held open through the mesh for the memory figure (1,000 is
    /// always measured first).
    pub held_connections: usize,
    /// Time allowed to open (and reach the server with) each batch of held connections.
    pub hold_limit: Duration,
}

struct Bed {
    cluster: Cluster,
    client: Pod,
    server: Pod,
    same_node_server: Pod,
    config_off: NodeConfig,
    config_on: NodeConfig,
    ztunnels: Vec<Ztunnel>,
    waypoint: Waypoint,
    _waypoint_pod: Pod,
    _ca: MeshCa,
    relays: Vec<Child>,
    relay_dir: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for r in &mut self.relays {
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = fs::remove_dir_all(&self.relay_dir);
    }
}

/// One relay frontend: listen port, upstream, TLS on the bind side, TLS to the upstream.
pub(super) type Frontend<'a> = (u16, SocketAddr, Option<&'a str>, Option<&'a str>);

pub(super) fn haproxy_config(frontends: &[Frontend]) -> String {
    let mut cfg = String::from(
        "global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    );
    for (i, (port, upstream, bind_tls, server_tls)) in frontends.iter().enumerate() {
        cfg.push_str(&format!(
            "listen l{i}\n  bind 0.0.0.0:{port}{}\n  server s {upstream}{}\n",
            bind_tls.map(|t| format!(" {t}")).unwrap_or_default(),
            server_tls.map(|t| format!(" {t}")).unwrap_or_default(),
        ));
    }
    cfg
}

fn setup(settings_dir: PathBuf) -> Result<Bed> {
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let client = cluster.nodes[0].add_pod();
    let same_node_server = cluster.nodes[0].add_pod();
    let server = cluster.nodes[1].add_pod();
    let waypoint_pod = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    // The waypoint pod is not enrolled: it speaks HBONE itself.
    let mut waypoint_workload = waypoint_pod.workload_as(&n1, false, "waypoint");
    waypoint_workload.labels.insert(WAYPOINT_LABEL.into(), "waypoint".into());
    let waypoint_service = Service {
        name: "through-waypoint".into(),
        namespace: "default".into(),
        vips: vec![WAYPOINT_VIP.parse().expect("an address")],
        ports: [load::ECHO_PORT, load::SINK_PORT, load::HOLD_PORT]
            .into_iter()
            .map(|port| ServicePort { port, target_port: port })
            .collect(),
        endpoints: vec![server.name.clone()],
        waypoint: Some("waypoint".into()),
        waypoint_namespace: None,
    };
    let config = |on: bool| NodeConfig {
        workloads: vec![
            client.workload(&n0, on),
            same_node_server.workload(&n0, on),
            server.workload(&n1, on),
            waypoint_workload.clone(),
        ],
        services: vec![waypoint_service.clone()],
        ..Default::default()
    };
    let (config_off, config_on) = (config(false), config(true));
    PIN_CPU.store(0, std::sync::atomic::Ordering::Relaxed);
    let ztunnels: Vec<Ztunnel> =
        cluster.nodes.iter().map(|n| Ztunnel::start_with(n, &config_off.workloads, &ca, &[])).collect();

    // The relay pairs: node 0 listens for the client, node 1 forwards to the server pod.
    fs::create_dir_all(&settings_dir)?;
    let identity = |sa: &str| format!("spiffe://cluster.local/ns/bench/sa/{sa}").parse().expect("valid");
    let (c_cert, c_key) = ca.ca.issue_pem(&identity("relay-client"), Duration::from_secs(3600))?;
    let (s_cert, s_key) = ca.ca.issue_pem(&identity("relay-server"), Duration::from_secs(3600))?;
    let pem = |name: &str, body: String| -> Result<String> {
        let path = settings_dir.join(name);
        fs::write(&path, body)?;
        Ok(path.display().to_string())
    };
    let root = pem("root.pem", ca.ca.root_pem().to_string())?;
    let client_pem = pem("client.pem", c_cert + &c_key)?;
    let server_pem = pem("server.pem", s_cert + &s_key)?;
    let ports = [load::ECHO_PORT, load::SINK_PORT, load::HOLD_PORT];
    let node1 = cluster.underlay_ips[1];
    let client_tls = format!("ssl verify required ca-file {root} crt {client_pem}");
    let server_tls = format!("ssl crt {server_pem} verify required ca-file {root}");
    let mut front = Vec::new();
    let mut back = Vec::new();
    for port in ports {
        let off = port - load::ECHO_PORT;
        front.push((RELAY_BASE + off, SocketAddr::new(node1, HOP_BASE + off), None, None));
        front.push((
            RELAY_MTLS_BASE + off,
            SocketAddr::new(node1, HOP_MTLS_BASE + off),
            None,
            Some(client_tls.as_str()),
        ));
        back.push((HOP_BASE + off, SocketAddr::new(server.ipv4, port), None, None));
        back.push((HOP_MTLS_BASE + off, SocketAddr::new(server.ipv4, port), Some(server_tls.as_str()), None));
    }
    let relays = start_relay_pair(&cluster.nodes, &front, &back, &settings_dir)?;
    // The waypoint reads the mesh config from a file (enrollment as when its path is measured);
    // started from this pinned thread, it runs on vCPU 0 too.
    let waypoint_config = settings_dir.join("waypoint-config.json");
    fs::write(&waypoint_config, serde_json::to_vec(&config_on)?)?;
    let waypoint = Waypoint::start(&waypoint_pod, "default", "waypoint", &waypoint_config, &ca);
    Ok(Bed {
        cluster,
        client,
        server,
        same_node_server,
        config_off,
        config_on,
        ztunnels,
        waypoint,
        _waypoint_pod: waypoint_pod,
        _ca: ca,
        relays,
        relay_dir: settings_dir,
    })
}

/// A haproxy on each of the first two nodes (`front` on node 0, `back` on node 1), pinned to
/// vCPU 0, configs and logs in `dir`; checked to be running.
pub(super) fn start_relay_pair(
    nodes: &[Node],
    front: &[Frontend],
    back: &[Frontend],
    dir: &std::path::Path,
) -> Result<Vec<Child>> {
    fs::create_dir_all(dir)?;
    let mut relays = Vec::new();
    let kill = |relays: &mut Vec<Child>| {
        for r in relays.iter_mut() {
            let _ = r.kill();
            let _ = r.wait();
        }
    };
    for (i, frontends) in [front, back].iter().enumerate() {
        let path = dir.join(format!("haproxy{i}.cfg"));
        fs::write(&path, haproxy_config(frontends))?;
        let mut cmd = nodes[i].ns.command("haproxy");
        pin_command(&mut cmd, 0);
        let log = fs::File::create(dir.join(format!("haproxy{i}.log")))?;
        match cmd.arg("-f").arg(&path).arg("-db").stdout(Stdio::null()).stderr(log).spawn() {
            Ok(child) => relays.push(child),
            Err(e) => {
                kill(&mut relays);
                return Err(e).context("starting haproxy");
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..relays.len() {
        if let Some(status) = relays[i].try_wait()? {
            let log = fs::read_to_string(dir.join(format!("haproxy{i}.log"))).unwrap_or_default();
            kill(&mut relays);
            anyhow::bail!("haproxy on node {i} exited ({status}):\n{log}");
        }
    }
    Ok(relays)
}

impl Bed {
    fn set_enrolled(&self, on: bool) {
        let config = if on { &self.config_on } else { &self.config_off };
        for z in &self.ztunnels {
            z.set_config(config);
        }
        let want = on as usize;
        let ok = wait_until(Duration::from_secs(10), || {
            self.ztunnels.iter().enumerate().all(|(i, z)| {
                let expected = if i == 0 { 2 } else { 1 } * want;
                z.capture()["pods"].as_array().map_or(0, Vec::len) == expected
            })
        });
        assert!(ok, "enrollment did not settle");
    }

    /// Where the client connects for `port` on `path`.
    fn target(&self, path: Path, port: u16) -> SocketAddr {
        let off = port - load::ECHO_PORT;
        let gateway: IpAddr = self.cluster.nodes[0].ipv4();
        match path {
            Path::Direct | Path::WarrenCrossNode => SocketAddr::new(self.server.ipv4, port),
            Path::WarrenSameNode => SocketAddr::new(self.same_node_server.ipv4, port),
            Path::Relay => SocketAddr::new(gateway, RELAY_BASE + off),
            Path::RelayMtls => SocketAddr::new(gateway, RELAY_MTLS_BASE + off),
            Path::WarrenWaypoint => SocketAddr::new(WAYPOINT_VIP.parse().expect("an address"), port),
        }
    }

    fn ztunnel_cpu(&self) -> f64 {
        self.ztunnels.iter().filter_map(Ztunnel::pid).map(load::cpu_seconds).sum()
    }

    fn waypoint_cpu(&self) -> f64 {
        load::cpu_seconds(self.waypoint.pid())
    }

    /// CPU seconds so far of the proxies on `path`: both relays, both ztunnels, or both
    /// ztunnels and the waypoint.
    fn proxy_cpu(&self, path: Path) -> f64 {
        match path {
            Path::Direct => 0.0,
            Path::Relay | Path::RelayMtls => self.relays.iter().map(|r| load::cpu_seconds(r.id())).sum(),
            Path::WarrenCrossNode | Path::WarrenSameNode => self.ztunnel_cpu(),
            Path::WarrenWaypoint => self.ztunnel_cpu() + self.waypoint_cpu(),
        }
    }
}

/// Runs the data-path benchmark and returns its JSON section.
pub fn run(settings: &Settings, work_dir: PathBuf) -> Result<Value> {
    // Room for the held connections: their server ends live in this process (the client ends
    // in a holder process of their own), and the ztunnels started below inherit the limit
    // (each holds one socket per connection). Raising the hard limit needs CAP_SYS_RESOURCE;
    // without it the count is bounded by the hard limit.
    load::raise_open_file_limit(settings.held_connections as u64 + 1024);
    let most_held = settings.held_connections.min((load::open_file_limit() as usize).saturating_sub(1024));
    let bed = setup(work_dir)?;
    // Idle memory first, before any traffic has grown ztunnel's buffers and allocator caches.
    bed.set_enrolled(true);
    std::thread::sleep(Duration::from_millis(500));
    let rss = |b: &Bed| b.ztunnels.iter().filter_map(Ztunnel::pid).map(load::rss_mib).collect::<Vec<_>>();
    let idle = rss(&bed);
    let servers_far = load::Servers::start(&bed.server)?;
    let servers_near = load::Servers::start(&bed.same_node_server)?;
    let sunk_for =
        |path: Path| if path == Path::WarrenSameNode { &servers_near.sunk } else { &servers_far.sunk };

    let mut samples: Vec<(Path, &'static str, f64)> = Vec::new();
    for round in 1..=settings.rounds {
        for path in PATHS {
            bed.set_enrolled(path.enrolled());
            let rr = load::request_response(
                &bed.client,
                bed.target(path, load::ECHO_PORT),
                settings.rr_iterations,
            )?;
            let pct = |q: f64| rr[((rr.len() as f64 * q) as usize).min(rr.len() - 1)] as f64 / 1e3;
            let crr = load::connections_per_second(
                &bed.client,
                bed.target(path, load::ECHO_PORT),
                settings.crr_duration,
            )?;
            let (proxy_before, ztunnel_before, waypoint_before) =
                (bed.proxy_cpu(path), bed.ztunnel_cpu(), bed.waypoint_cpu());
            let sink = sunk_for(path);
            let before_bytes = sink.load(std::sync::atomic::Ordering::Relaxed);
            let tp1 = load::throughput(
                &bed.client,
                bed.target(path, load::SINK_PORT),
                1,
                settings.throughput_duration,
                sink,
            )?;
            let tp8 = load::throughput(
                &bed.client,
                bed.target(path, load::SINK_PORT),
                8,
                settings.throughput_duration,
                sink,
            )?;
            let moved_gb =
                ((sink.load(std::sync::atomic::Ordering::Relaxed) - before_bytes) as f64 / 1e9).max(1e-9);
            let proxy_per_gb = (bed.proxy_cpu(path) - proxy_before) / moved_gb;
            println!(
                "    round {round}: {:<53} rr p50 {:>7.1} µs p99 {:>7.1} µs | {:>7.0} conn/s | {:>6.2} Gb/s 1 stream, {:>6.2} Gb/s 8 streams{}",
                path.name(),
                pct(0.5),
                pct(0.99),
                crr,
                tp1 * 8.0 / 1e9,
                tp8 * 8.0 / 1e9,
                if path == Path::Direct {
                    String::new()
                } else {
                    format!(" | {proxy_per_gb:.2} proxy CPU s/GB")
                },
            );
            samples.extend([
                (path, "rr_p50_us", pct(0.5)),
                (path, "rr_p99_us", pct(0.99)),
                (path, "rr_p999_us", pct(0.999)),
                (path, "rr_tps", 1e6 / (rr.iter().sum::<u64>() as f64 / rr.len() as f64 / 1e3)),
                (path, "new_connections_per_s", crr),
                (path, "throughput_1_stream_gbps", tp1 * 8.0 / 1e9),
                (path, "throughput_8_streams_gbps", tp8 * 8.0 / 1e9),
            ]);
            if path != Path::Direct {
                samples.push((path, "proxy_cpu_s_per_gb", proxy_per_gb));
            }
            if path.enrolled() {
                samples.push((path, "ztunnel_cpu_s_per_gb", (bed.ztunnel_cpu() - ztunnel_before) / moved_gb));
            }
            if path == Path::WarrenWaypoint {
                samples.push((
                    path,
                    "waypoint_cpu_s_per_gb",
                    (bed.waypoint_cpu() - waypoint_before) / moved_gb,
                ));
            }
        }
    }

    // Memory with connections held open through the mesh (cross-node): 1,000, then as many
    // as the settings ask for. Each count is measured once the server holds them all (or
    // the time allowed has passed: then the count reached is what is reported).
    bed.set_enrolled(true);
    let mut memory = Vec::new();
    let mut holders: Vec<load::Holder> = Vec::new();
    let dst = bed.target(Path::WarrenCrossNode, load::HOLD_PORT);
    for want in [1_000, most_held] {
        let open_now: usize = holders.iter().map(|h| h.opened).sum();
        if want <= open_now && !memory.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        // The holder exits by itself if this process dies; the measurement needs seconds.
        let hold_for = settings.hold_limit * 3;
        holders.push(load::Holder::start(&bed.client, dst, want - open_now, settings.hold_limit, hold_for)?);
        let opened: usize = holders.iter().map(|h| h.opened).sum();
        wait_until(settings.hold_limit.saturating_sub(started.elapsed()), || {
            servers_far.held_count() >= opened
        });
        std::thread::sleep(Duration::from_millis(1000));
        let at_server = servers_far.held_count();
        let mib = rss(&bed);
        println!(
            "    {opened} connections open through the mesh ({at_server} reached the server, {:.1} s): ztunnel RSS {} MiB",
            started.elapsed().as_secs_f64(),
            mib.iter().map(|m| format!("{m:.1}")).collect::<Vec<_>>().join(" / ")
        );
        memory.push(json!({ "connections": want, "opened": opened, "at_server": at_server, "rss_mib": mib }));
    }
    drop(holders);
    servers_far.release_held();

    let figure = |path: Path, name: &str| {
        let v: Vec<f64> =
            samples.iter().filter(|(p, n, _)| *p == path && *n == name).map(|(_, _, v)| *v).collect();
        stats(&v)
    };
    let names = [
        "rr_p50_us",
        "rr_p99_us",
        "rr_p999_us",
        "rr_tps",
        "new_connections_per_s",
        "throughput_1_stream_gbps",
        "throughput_8_streams_gbps",
        "proxy_cpu_s_per_gb",
        "ztunnel_cpu_s_per_gb",
        "waypoint_cpu_s_per_gb",
    ];
    let paths: Vec<Value> = PATHS
        .iter()
        .map(|p| {
            let mut obj = serde_json::Map::new();
            obj.insert("path".into(), json!(p.name()));
            for n in names {
                if samples.iter().any(|(q, m, _)| q == p && *m == n) {
                    obj.insert(n.into(), figure(*p, n));
                }
            }
            Value::Object(obj)
        })
        .collect();
    let median = |p: Path, n: &str| figure(p, n)["median"].as_f64().unwrap_or(f64::NAN);
    let direct_p50 = median(Path::Direct, "rr_p50_us");
    let warren_added = median(Path::WarrenCrossNode, "rr_p50_us") - direct_p50;
    let mtls_added = median(Path::RelayMtls, "rr_p50_us") - direct_p50;
    let tp_ratio = median(Path::WarrenCrossNode, "throughput_1_stream_gbps")
        / median(Path::Direct, "throughput_1_stream_gbps");
    let idle_max = idle.iter().copied().fold(0.0, f64::max);
    Ok(json!({
        "rounds": settings.rounds,
        "paths": paths,
        "ztunnel_rss_mib": { "idle": idle, "with_connections": memory },
        "targets": [
            { "target": "single-stream throughput at least 0.5x direct", "value": tp_ratio, "met": tp_ratio >= 0.5 },
            { "target": "added p50 latency no more than two TLS-terminating relays add",
              "value_us": warren_added, "relay_mtls_added_us": mtls_added, "met": warren_added <= mtls_added },
            { "target": "ztunnel RSS at most 20 MB idle", "value_mib": idle_max, "met": idle_max <= 20.0 * 1e6 / (1024.0 * 1024.0) },
        ],
    }))
}
