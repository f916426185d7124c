//! The L7 path: HTTP through client pod → ztunnel → HBONE → waypoint → HBONE → ztunnel →
//! server pod, against the same mesh path without the waypoint (client → ztunnel → HBONE →
//! ztunnel → server), interleaved, every process pinned to vCPU 0. The project's load client
//! (`warren-load`) sends HTTP/1.1 keep-alive and HTTP/2 at a fixed 1,000 requests/s (latency,
//! and the waypoint's CPU and memory) and at saturation (requests/s); the server is the
//! project's echo server.
//!
//! Targets (waypoint issue): the waypoint adds at most 0.3 ms at p50 at 1,000 requests/s, uses
//! at most 0.1 vCPU per 1,000 requests/s and at most 30 MB RSS.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use warren_core::model::{NodeConfig, Service, ServicePort, WAYPOINT_LABEL};
use warren_e2e::{
    topology::{Cluster, Pod},
    waypoint::{Echo, Waypoint},
    ztunnel::{MeshCa, PIN_CPU, Ztunnel, binary},
};

use super::stats;

pub struct Settings {
    pub rounds: usize,
    /// Length of each fixed-rate run.
    pub fixed_rate_duration: Duration,
    /// Length of each saturation run.
    pub saturation_duration: Duration,
}

const RATE: u32 = 1_000;
const APP_PORT: u16 = 8080;

#[derive(Clone, Copy)]
enum Path {
    Mesh,
    Waypoint,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Mesh => "Warren L4 (ztunnel → ztunnel), no waypoint",
            Path::Waypoint => "Warren L7 (ztunnel → waypoint → ztunnel)",
        }
    }
    fn vip(self) -> IpAddr {
        match self {
            Path::Mesh => "10.199.1.10".parse().expect("an address"),
            Path::Waypoint => "10.199.1.11".parse().expect("an address"),
        }
    }
}

struct Bed {
    _ca: MeshCa,
    _cluster: Cluster,
    client: Pod,
    _ztunnels: Vec<Ztunnel>,
    _waypoint: Waypoint,
    waypoint_pid: u32,
    _echo: Echo,
    _waypoint_pod: Pod,
    _server: Pod,
    config_dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

fn setup() -> Result<Bed> {
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let client = cluster.nodes[0].add_pod();
    let server = cluster.nodes[1].add_pod();
    let wp = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let mut waypoint_workload = wp.workload_as(&n1, false, "waypoint");
    waypoint_workload.labels.insert(WAYPOINT_LABEL.into(), "waypoint".into());
    let workloads = vec![
        client.workload_as(&n0, true, "client"),
        server.workload_as(&n1, true, "server"),
        waypoint_workload,
    ];
    let service = |name: &str, path: Path, waypoint: Option<&str>| Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![path.vip()],
        ports: vec![ServicePort { port: 80, target_port: APP_PORT }],
        endpoints: vec![server.name.clone()],
        waypoint: waypoint.map(str::to_string),
    };
    let config = NodeConfig {
        workloads: workloads.clone(),
        services: vec![
            service("plain", Path::Mesh, None),
            service("routed", Path::Waypoint, Some("waypoint")),
        ],
        ..Default::default()
    };
    PIN_CPU.store(0, std::sync::atomic::Ordering::Relaxed);
    let ztunnels: Vec<Ztunnel> =
        cluster.nodes.iter().map(|n| Ztunnel::start_with(n, &workloads, &ca, &[])).collect();
    for z in &ztunnels {
        z.apply_config(&config);
    }
    ztunnels[0].wait_enrolled(&client.name);
    ztunnels[1].wait_enrolled(&server.name);
    let config_dir = std::env::temp_dir().join("warren-bench-l7");
    std::fs::create_dir_all(&config_dir)?;
    let config_file = config_dir.join("config.json");
    std::fs::write(&config_file, serde_json::to_vec(&config)?)?;
    // Started from this (pinned) thread, the waypoint and the echo server inherit vCPU 0.
    let waypoint = Waypoint::start(&wp, "default", "waypoint", &config_file, &ca);
    let waypoint_pid = waypoint.pid();
    let echo = Echo::start(&server, APP_PORT, "v1", &[]);
    Ok(Bed {
        _ca: ca,
        _cluster: cluster,
        client,
        _ztunnels: ztunnels,
        _waypoint: waypoint,
        waypoint_pid,
        _echo: echo,
        _waypoint_pod: wp,
        _server: server,
        config_dir,
    })
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

/// One `warren-load` run inside the client pod.
fn load(
    bed: &Bed,
    path: Path,
    http2: bool,
    rate: u32,
    concurrency: u32,
    duration: Duration,
) -> Result<Value> {
    let url = format!("http://{}:80/", path.vip());
    let mut args = vec![
        url,
        "--duration".into(),
        format!("{:.1}", duration.as_secs_f64()),
        "--rate".into(),
        rate.to_string(),
        "-c".into(),
        concurrency.to_string(),
        "--json".into(),
    ];
    if http2 {
        args.push("--http2".into());
    }
    let out = bed.client.ns.command(binary("warren-load")).args(&args).output()?;
    let summary: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("warren-load: {}", String::from_utf8_lossy(&out.stderr)))?;
    if summary["successes"] != summary["total"] {
        bail!("{}: requests failed during the benchmark: {summary}", path.name());
    }
    Ok(summary)
}

pub fn run(settings: &Settings) -> Result<Value> {
    let bed = setup()?;
    let protocols = [(false, "HTTP/1.1"), (true, "HTTP/2")];
    // Per (path, protocol): p50 and p99 at the fixed rate, requests/s at saturation.
    let mut p50 = vec![vec![Vec::new(); 2]; 2];
    let mut p99 = vec![vec![Vec::new(); 2]; 2];
    let mut rps = vec![vec![Vec::new(); 2]; 2];
    let mut waypoint_vcpu_per_krps = Vec::new();
    // Warm both paths (connections, certificates) before measuring.
    for path in [Path::Mesh, Path::Waypoint] {
        load(&bed, path, false, 0, 4, Duration::from_millis(500))?;
    }
    for round in 0..settings.rounds {
        for (pi, path) in [Path::Mesh, Path::Waypoint].into_iter().enumerate() {
            for (qi, (http2, proto)) in protocols.iter().enumerate() {
                let before = cpu_seconds(bed.waypoint_pid)?;
                let fixed = load(&bed, path, *http2, RATE, 4, settings.fixed_rate_duration)?;
                let used = cpu_seconds(bed.waypoint_pid)? - before;
                let elapsed = fixed["elapsedSeconds"].as_f64().unwrap_or(1.0);
                let achieved = fixed["requestsPerSecond"].as_f64().unwrap_or(0.0);
                p50[pi][qi].push(fixed["latencyUs"]["p50"].as_f64().unwrap_or(f64::NAN));
                p99[pi][qi].push(fixed["latencyUs"]["p99"].as_f64().unwrap_or(f64::NAN));
                if matches!(path, Path::Waypoint) && achieved > 0.0 {
                    waypoint_vcpu_per_krps.push(used / elapsed / (achieved / 1000.0));
                }
                let saturated = load(&bed, path, *http2, 0, 16, settings.saturation_duration)?;
                rps[pi][qi].push(saturated["requestsPerSecond"].as_f64().unwrap_or(f64::NAN));
                println!(
                    "    round {}: {:<45} {proto:<8} p50 {:>6.0} µs  p99 {:>6.0} µs at {RATE}/s; {:>7.0} req/s saturated",
                    round + 1,
                    path.name(),
                    p50[pi][qi].last().unwrap(),
                    p99[pi][qi].last().unwrap(),
                    rps[pi][qi].last().unwrap()
                );
            }
        }
    }
    let rss = rss_mib(bed.waypoint_pid)?;
    let median = |v: &[f64]| stats(v)["median"].as_f64().unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (qi, (_, proto)) in protocols.iter().enumerate() {
        for (pi, path) in [Path::Mesh, Path::Waypoint].into_iter().enumerate() {
            rows.push(json!({
                "path": path.name(),
                "protocol": proto,
                "p50_us_at_1000": stats(&p50[pi][qi]),
                "p99_us_at_1000": stats(&p99[pi][qi]),
                "saturated_rps": stats(&rps[pi][qi]),
            }));
        }
        let added_ms = (median(&p50[1][qi]) - median(&p50[0][qi])) / 1000.0;
        targets.push(json!({
            "target": format!("{proto}: the waypoint adds at most 0.3 ms at p50 at 1,000 requests/s"),
            "added_ms": added_ms,
            "met": added_ms <= 0.3,
        }));
    }
    let vcpu = median(&waypoint_vcpu_per_krps);
    targets.push(json!({
        "target": "the waypoint uses at most 0.1 vCPU per 1,000 requests/s",
        "vcpu_per_1000_rps": vcpu,
        "met": vcpu <= 0.1,
    }));
    targets.push(json!({"target": "the waypoint's RSS is at most 30 MB", "rss_mib": rss, "met": rss <= 30.0 / 1.048_576}));
    Ok(json!({
        "rounds": settings.rounds,
        "rate": RATE,
        "fixed_rate_seconds": settings.fixed_rate_duration.as_secs_f64(),
        "saturation_seconds": settings.saturation_duration.as_secs_f64(),
        "rows": rows,
        "waypoint_vcpu_per_1000_rps": stats(&waypoint_vcpu_per_krps),
        "waypoint_rss_mib": rss,
        "targets": targets,
    }))
}

/// The L7 section of docs/performance.md.
pub fn markdown(s: &mut String, l7: &Value) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "\n## L7 path (waypoint)\n");
    let _ = writeln!(
        s,
        "HTTP through client pod → ztunnel → HBONE → waypoint → HBONE → ztunnel → server pod (the project's echo \
         server), against the same mesh path without the waypoint; the project's load client (`warren-load`), \
         4 keep-alive connections at a fixed {}/s for {} s, and 16 connections at saturation for {} s; {} rounds \
         interleaved, every process on one vCPU.\n",
        l7["rate"], l7["fixed_rate_seconds"], l7["saturation_seconds"], l7["rounds"]
    );
    let _ = writeln!(s, "| path | protocol | p50 at 1,000/s | p99 at 1,000/s | requests/s saturated |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    let f = |v: &Value, scale: f64, digits: usize| {
        format!(
            "{:.d$} [{:.d$}–{:.d$}]",
            v["median"].as_f64().unwrap_or(f64::NAN) / scale,
            v["min"].as_f64().unwrap_or(f64::NAN) / scale,
            v["max"].as_f64().unwrap_or(f64::NAN) / scale,
            d = digits
        )
    };
    for r in l7["rows"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} ms | {} ms | {} |",
            r["path"].as_str().unwrap_or(""),
            r["protocol"].as_str().unwrap_or(""),
            f(&r["p50_us_at_1000"], 1000.0, 3),
            f(&r["p99_us_at_1000"], 1000.0, 3),
            f(&r["saturated_rps"], 1.0, 0)
        );
    }
    let _ = writeln!(
        s,
        "\nWaypoint CPU at the fixed rate: {} vCPU per 1,000 requests/s; resident memory after the run {:.1} MiB.\n",
        f(&l7["waypoint_vcpu_per_1000_rps"], 1.0, 3),
        l7["waypoint_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
    super::targets_markdown(s, &l7["targets"]);
}
