//! The L7 path: HTTP through client pod → ztunnel → HBONE → waypoint → HBONE → ztunnel →
//! server pod, against the same mesh path without the waypoint (client → ztunnel → HBONE →
//! ztunnel → server), and against two baselines on the same two nodes: direct pod to pod, and
//! a plain TCP relay pair (haproxy, one per node), both between a client and a server pod that
//! are not enrolled. All four interleaved, every process pinned to vCPU 0. The project's load
//! client (`warren-load`) sends HTTP/1.1 keep-alive and HTTP/2 at a fixed 1,000 requests/s
//! (latency, and the proxies' CPU per request) and at saturation (requests/s, latency, CPU);
//! the server is the project's echo server.
//!
//! Targets (waypoint issue): the waypoint adds at most 0.3 ms at p50 at 1,000 requests/s, uses
//! at most 0.1 vCPU per 1,000 requests/s and at most 30 MB RSS.

use std::{
    net::{IpAddr, SocketAddr},
    process::Child,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use warren_core::model::{NodeConfig, Service, ServicePort, WAYPOINT_LABEL};
use warren_e2e::{
    topology::{Cluster, Pod},
    waypoint::{Echo, Waypoint},
    ztunnel::{MeshCa, PIN_CPU, Ztunnel, binary},
};

use super::{datapath, load, stats};

pub struct Settings {
    pub rounds: usize,
    /// Length of each fixed-rate run.
    pub fixed_rate_duration: Duration,
    /// Length of each saturation run.
    pub saturation_duration: Duration,
}

/// The fixed request rate of the L7 runs (and of `bench-waypoint-ab`).
pub const RATE: u32 = 1_000;
const APP_PORT: u16 = 8080;
/// The relay pair's ports: the client connects to node 1's RELAY_PORT, which forwards to
/// node 2's HOP_PORT, which forwards to the server pod.
const RELAY_PORT: u16 = 20080;
const HOP_PORT: u16 = 22080;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Relay,
    Mesh,
    Waypoint,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Relay, Path::Mesh, Path::Waypoint];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct pod to pod",
            Path::Relay => "plain TCP relay pair (haproxy)",
            Path::Mesh => "Warren L4 (ztunnel → ztunnel), no waypoint",
            Path::Waypoint => "Warren L7 (ztunnel → waypoint → ztunnel)",
        }
    }
    fn vip(self) -> IpAddr {
        match self {
            Path::Waypoint => "10.199.1.11".parse().expect("an address"),
            _ => "10.199.1.10".parse().expect("an address"),
        }
    }
}

struct Bed {
    _ca: MeshCa,
    cluster: Cluster,
    client: Pod,
    plain_client: Pod,
    plain_server: Pod,
    ztunnels: Vec<Ztunnel>,
    _waypoint: Waypoint,
    waypoint_pid: u32,
    _echo: Echo,
    _plain_echo: Echo,
    _waypoint_pod: Pod,
    /// `cargo xtask bench-waypoint-ab`: another build's waypoint beside this one's, serving
    /// its own copy of the service ([`BASELINE_VIP`]).
    baseline: Option<Baseline>,
    _server: Pod,
    relays: Vec<Child>,
    config_dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        for r in &mut self.relays {
            let _ = r.kill();
            let _ = r.wait();
        }
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

/// The second waypoint of an A/B comparison.
struct Baseline {
    _waypoint: Waypoint,
    pid: u32,
    _pod: Pod,
}

/// The service the baseline waypoint serves: the same endpoints as [`Path::Waypoint`]'s.
const BASELINE_VIP: &str = "10.199.1.12";

fn setup(work_dir: &std::path::Path, baseline: Option<&std::path::Path>) -> Result<Bed> {
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let client = cluster.nodes[0].add_pod();
    let server = cluster.nodes[1].add_pod();
    let wp = cluster.nodes[1].add_pod();
    let baseline_pod = baseline.map(|_| cluster.nodes[1].add_pod());
    // The baselines' pods: not in the mesh config, so never enrolled.
    let plain_client = cluster.nodes[0].add_pod();
    let plain_server = cluster.nodes[1].add_pod();
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let mut waypoint_workload = wp.workload_as(&n1, false, "waypoint");
    waypoint_workload.labels.insert(WAYPOINT_LABEL.into(), "waypoint".into());
    let mut workloads = vec![
        client.workload_as(&n0, true, "client"),
        server.workload_as(&n1, true, "server"),
        waypoint_workload,
    ];
    if let Some(pod) = &baseline_pod {
        let mut w = pod.workload_as(&n1, false, "waypoint-baseline");
        w.labels.insert(WAYPOINT_LABEL.into(), "waypoint-baseline".into());
        workloads.push(w);
    }
    let service = |name: &str, path: Path, waypoint: Option<&str>| Service {
        name: name.into(),
        namespace: "default".into(),
        vips: vec![path.vip()],
        ports: vec![ServicePort { port: 80, target_port: APP_PORT }],
        endpoints: vec![server.name.clone()],
        waypoint: waypoint.map(str::to_string),
        waypoint_namespace: None,
    };
    let mut services =
        vec![service("plain", Path::Mesh, None), service("routed", Path::Waypoint, Some("waypoint"))];
    if baseline.is_some() {
        services.push(Service {
            vips: vec![BASELINE_VIP.parse().expect("an address")],
            ..service("routed-baseline", Path::Waypoint, Some("waypoint-baseline"))
        });
    }
    let config = NodeConfig { workloads: workloads.clone(), services, ..Default::default() };
    PIN_CPU.store(0, std::sync::atomic::Ordering::Relaxed);
    let ztunnels: Vec<Ztunnel> =
        cluster.nodes.iter().map(|n| Ztunnel::start_with(n, &workloads, &ca, &[])).collect();
    for z in &ztunnels {
        z.apply_config(&config);
    }
    ztunnels[0].wait_enrolled(&client.name);
    ztunnels[1].wait_enrolled(&server.name);
    let config_dir = work_dir.to_path_buf();
    std::fs::create_dir_all(&config_dir)?;
    let config_file = config_dir.join("config.json");
    std::fs::write(&config_file, serde_json::to_vec(&config)?)?;
    // Started from this (pinned) thread, the waypoint and the echo servers inherit vCPU 0.
    let waypoint = Waypoint::start(&wp, "default", "waypoint", &config_file, &ca);
    let waypoint_pid = waypoint.pid();
    let baseline = match (baseline, baseline_pod) {
        (Some(program), Some(pod)) => {
            let waypoint =
                Waypoint::start_build(program, &pod, "default", "waypoint-baseline", &config_file, &ca);
            Some(Baseline { pid: waypoint.pid(), _waypoint: waypoint, _pod: pod })
        }
        _ => None,
    };
    let echo = Echo::start(&server, APP_PORT, "v1", &[]);
    let plain_echo = Echo::start(&plain_server, APP_PORT, "v1", &[]);
    let front = [(RELAY_PORT, SocketAddr::new(cluster.underlay_ips[1], HOP_PORT), None, None)];
    let back = [(HOP_PORT, SocketAddr::new(plain_server.ipv4, APP_PORT), None, None)];
    let relays = datapath::start_relay_pair(&cluster.nodes, &front, &back, &config_dir)?;
    Ok(Bed {
        _ca: ca,
        cluster,
        client,
        plain_client,
        plain_server,
        ztunnels,
        _waypoint: waypoint,
        waypoint_pid,
        _echo: echo,
        _plain_echo: plain_echo,
        _waypoint_pod: wp,
        baseline,
        _server: server,
        relays,
        config_dir,
    })
}

impl Bed {
    /// The load client's pod and URL for `path`.
    fn target(&self, path: Path) -> (&Pod, String) {
        match path {
            Path::Direct => (&self.plain_client, format!("http://{}:{APP_PORT}/", self.plain_server.ipv4)),
            Path::Relay => {
                (&self.plain_client, format!("http://{}:{RELAY_PORT}/", self.cluster.nodes[0].ipv4()))
            }
            Path::Mesh | Path::Waypoint => (&self.client, format!("http://{}:80/", path.vip())),
        }
    }

    fn ztunnel_cpu(&self) -> f64 {
        self.ztunnels.iter().filter_map(Ztunnel::pid).map(load::cpu_seconds).sum()
    }

    fn waypoint_cpu(&self) -> f64 {
        load::cpu_seconds(self.waypoint_pid)
    }

    /// CPU seconds so far of the proxies on `path`: none, both relays, both ztunnels, or both
    /// ztunnels and the waypoint.
    fn proxy_cpu(&self, path: Path) -> f64 {
        match path {
            Path::Direct => 0.0,
            Path::Relay => self.relays.iter().map(|r| load::cpu_seconds(r.id())).sum(),
            Path::Mesh => self.ztunnel_cpu(),
            Path::Waypoint => self.ztunnel_cpu() + self.waypoint_cpu(),
        }
    }
}

/// One `warren-load` run inside the path's client pod.
fn load(
    bed: &Bed,
    path: Path,
    http2: bool,
    rate: u32,
    concurrency: u32,
    duration: Duration,
) -> Result<Value> {
    let (pod, url) = bed.target(path);
    load_url(pod, &url, http2, rate, concurrency, duration).with_context(|| path.name())
}

/// One `warren-load` run from `pod` to `url`; an error when any request failed.
fn load_url(
    pod: &Pod,
    url: &str,
    http2: bool,
    rate: u32,
    concurrency: u32,
    duration: Duration,
) -> Result<Value> {
    let mut args = vec![
        url.to_string(),
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
    let out = pod.ns.command(binary("warren-load")).args(&args).output()?;
    let summary: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("warren-load: {}", String::from_utf8_lossy(&out.stderr)))?;
    if summary["successes"] != summary["total"] {
        bail!("{url}: requests failed during the benchmark: {summary}");
    }
    Ok(summary)
}

/// The figures of one run, named as in the JSON (`suffix` tells the fixed-rate run from the
/// saturated one), with the proxies' CPU seconds per 1,000 requests.
fn figures(
    bed: &Bed,
    path: Path,
    summary: &Value,
    cpu: (f64, f64, f64),
    suffix: &str,
    out: &mut Vec<(String, f64)>,
) {
    let requests = summary["total"].as_f64().unwrap_or(f64::NAN).max(1.0);
    let per_1000 = |used: f64| used / (requests / 1000.0);
    let latency = &summary["latencyUs"];
    let rps = summary["requestsPerSecond"].as_f64().unwrap_or(f64::NAN);
    out.push((format!("rps_{suffix}"), rps));
    for q in ["p50", "p99", "p999"] {
        out.push((format!("{q}_us_{suffix}"), latency[q].as_f64().unwrap_or(f64::NAN)));
    }
    if path != Path::Direct {
        out.push((format!("proxy_cpu_s_per_1000_{suffix}"), per_1000(bed.proxy_cpu(path) - cpu.0)));
    }
    if matches!(path, Path::Mesh | Path::Waypoint) {
        out.push((format!("ztunnel_cpu_s_per_1000_{suffix}"), per_1000(bed.ztunnel_cpu() - cpu.1)));
    }
    if path == Path::Waypoint {
        out.push((format!("waypoint_cpu_s_per_1000_{suffix}"), per_1000(bed.waypoint_cpu() - cpu.2)));
    }
}

pub fn run(settings: &Settings, work_dir: &std::path::Path) -> Result<Value> {
    let bed = setup(work_dir, None)?;
    let protocols = [(false, "HTTP/1.1"), (true, "HTTP/2")];
    // Per (path, protocol): the figures of every round, by name.
    let mut samples: Vec<(usize, usize, String, f64)> = Vec::new();
    // Warm every path (connections, certificates) before measuring.
    for path in PATHS {
        load(&bed, path, false, 0, 4, Duration::from_millis(500))?;
    }
    let cpu = |path: Path| (bed.proxy_cpu(path), bed.ztunnel_cpu(), bed.waypoint_cpu());
    for round in 0..settings.rounds {
        for (pi, path) in PATHS.into_iter().enumerate() {
            for (qi, (http2, proto)) in protocols.iter().enumerate() {
                let mut got = Vec::new();
                let before = cpu(path);
                let fixed = load(&bed, path, *http2, RATE, 4, settings.fixed_rate_duration)?;
                figures(&bed, path, &fixed, before, "at_1000", &mut got);
                let before = cpu(path);
                let saturated = load(&bed, path, *http2, 0, 16, settings.saturation_duration)?;
                figures(&bed, path, &saturated, before, "saturated", &mut got);
                let value = |name: &str| got.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v);
                let cpu = if path == Path::Direct {
                    String::new()
                } else {
                    format!(
                        "; proxy CPU {:.3} / {:.3} s per 1,000 requests",
                        value("proxy_cpu_s_per_1000_at_1000"),
                        value("proxy_cpu_s_per_1000_saturated")
                    )
                };
                println!(
                    "    round {}: {:<45} {proto:<8} p50 {:>5.0} µs  p99 {:>5.0} µs at {RATE}/s; {:>6.0} req/s saturated (p50 {:>5.0} µs){cpu}",
                    round + 1,
                    path.name(),
                    value("p50_us_at_1000"),
                    value("p99_us_at_1000"),
                    value("rps_saturated"),
                    value("p50_us_saturated"),
                );
                samples.extend(got.into_iter().map(|(n, v)| (pi, qi, n, v)));
            }
        }
    }
    let rss = load::rss_mib(bed.waypoint_pid);
    let figure = |pi: usize, qi: usize, name: &str| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|(p, q, n, _)| *p == pi && *q == qi && n == name)
            .map(|(.., v)| *v)
            .collect();
        if v.is_empty() { Value::Null } else { stats(&v) }
    };
    let median =
        |pi: usize, qi: usize, name: &str| figure(pi, qi, name)["median"].as_f64().unwrap_or(f64::NAN);
    let index = |path: Path| PATHS.iter().position(|p| *p == path).expect("a path");
    let names: Vec<String> = ["at_1000", "saturated"]
        .iter()
        .flat_map(|suffix| {
            [
                "rps",
                "p50_us",
                "p99_us",
                "p999_us",
                "proxy_cpu_s_per_1000",
                "ztunnel_cpu_s_per_1000",
                "waypoint_cpu_s_per_1000",
            ]
            .map(|n| format!("{n}_{suffix}"))
        })
        .collect();
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (qi, (_, proto)) in protocols.iter().enumerate() {
        for (pi, path) in PATHS.into_iter().enumerate() {
            let mut row = serde_json::Map::new();
            row.insert("path".into(), json!(path.name()));
            row.insert("protocol".into(), json!(proto));
            for n in &names {
                let f = figure(pi, qi, n);
                if !f.is_null() {
                    row.insert(n.clone(), f);
                }
            }
            rows.push(Value::Object(row));
        }
        let added_ms = (median(index(Path::Waypoint), qi, "p50_us_at_1000")
            - median(index(Path::Mesh), qi, "p50_us_at_1000"))
            / 1000.0;
        targets.push(json!({
            "target": format!("{proto}: the waypoint adds at most 0.3 ms at p50 at 1,000 requests/s"),
            "added_ms": added_ms,
            "met": added_ms <= 0.3,
        }));
    }
    // The waypoint's CPU per 1,000 requests/s at the fixed rate, over both protocols' rounds
    // (CPU seconds per 1,000 requests: the same number).
    let waypoint_per_1000: Vec<f64> = samples
        .iter()
        .filter(|(p, _, n, _)| *p == index(Path::Waypoint) && n == "waypoint_cpu_s_per_1000_at_1000")
        .map(|(.., v)| *v)
        .collect();
    let vcpu = stats(&waypoint_per_1000)["median"].as_f64().unwrap_or(f64::NAN);
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
        "waypoint_vcpu_per_1000_rps": stats(&waypoint_per_1000),
        "waypoint_rss_mib": rss,
        "targets": targets,
    }))
}

/// The L7 section of docs/performance.md.
pub fn markdown(s: &mut String, l7: &Value) {
    use std::fmt::Write as _;

    use super::spread;
    let _ = writeln!(s, "\n## L7 path (waypoint)\n");
    let _ = writeln!(
        s,
        "HTTP from a client pod on node 1 to the project's echo server in a pod on node 2, four ways: \
         direct pod to pod and through a plain TCP relay pair (haproxy, one per node), between pods \
         that are not enrolled; Warren L4 (client pod → ztunnel → HBONE → ztunnel → server pod); and \
         Warren L7 (client pod → ztunnel → HBONE → waypoint → HBONE → ztunnel → server pod). The \
         project's load client (`warren-load`), 4 keep-alive connections at a fixed {}/s for {} s, \
         and 16 connections at saturation for {} s; {} rounds interleaved, every process on one \
         vCPU. Proxy CPU is user + system time per 1,000 requests: both haproxy processes, both \
         ztunnels, or both ztunnels and the waypoint.\n",
        super::thousands(&l7["rate"]),
        l7["fixed_rate_seconds"],
        l7["saturation_seconds"],
        l7["rounds"]
    );
    let rows: Vec<Value> = l7["rows"].as_array().cloned().unwrap_or_default();
    let ms = |v: &Value| {
        if v.is_null() {
            return "—".to_string();
        }
        let mut scaled = v.clone();
        for k in ["median", "min", "max"] {
            scaled[k] = json!(v[k].as_f64().unwrap_or(f64::NAN) / 1000.0);
        }
        spread(&scaled, 3)
    };
    let label = |r: &Value| {
        format!("| {} | {} |", r["path"].as_str().unwrap_or(""), r["protocol"].as_str().unwrap_or(""))
    };
    let _ = writeln!(
        s,
        "At {} requests/s:\n\n| path | protocol | p50 ms | p99 ms | p99.9 ms | proxy CPU s per 1,000 requests |\n|---|---|---|---|---|---|",
        super::thousands(&l7["rate"])
    );
    for r in &rows {
        let _ = writeln!(
            s,
            "{} {} | {} | {} | {} |",
            label(r),
            ms(&r["p50_us_at_1000"]),
            ms(&r["p99_us_at_1000"]),
            ms(&r["p999_us_at_1000"]),
            spread(&r["proxy_cpu_s_per_1000_at_1000"], 3)
        );
    }
    let _ = writeln!(
        s,
        "\nAt saturation:\n\n| path | protocol | requests/s | p50 ms | p99 ms | p99.9 ms | proxy CPU s per 1,000 requests |\n|---|---|---|---|---|---|---|"
    );
    for r in &rows {
        let _ = writeln!(
            s,
            "{} {} | {} | {} | {} | {} |",
            label(r),
            spread(&r["rps_saturated"], 0),
            ms(&r["p50_us_saturated"]),
            ms(&r["p99_us_saturated"]),
            ms(&r["p999_us_saturated"]),
            spread(&r["proxy_cpu_s_per_1000_saturated"], 3)
        );
    }
    // Ratios to the same protocol's direct and relay rows.
    let base = |r: &Value, path: Path| {
        rows.iter()
            .find(|b| b["protocol"] == r["protocol"] && b["path"] == path.name())
            .cloned()
            .unwrap_or_default()
    };
    let med = |r: &Value, k: &str| r[k]["median"].as_f64().unwrap_or(f64::NAN);
    let ratio = |r: &Value, b: &Value, k: &str| {
        let x = med(r, k) / med(b, k);
        if x.is_finite() { format!("{x:.2}×") } else { "—".to_string() }
    };
    let _ = writeln!(
        s,
        "\n| path | protocol | p50 at {0}/s vs direct | vs relay | p99 at {0}/s vs direct | vs relay | saturated requests/s vs direct | vs relay | CPU per request (saturated) vs relay |\n|---|---|---|---|---|---|---|---|---|",
        super::thousands(&l7["rate"])
    );
    for r in &rows {
        let (d, rl) = (base(r, Path::Direct), base(r, Path::Relay));
        let _ = writeln!(
            s,
            "{} {} | {} | {} | {} | {} | {} | {} |",
            label(r),
            ratio(r, &d, "p50_us_at_1000"),
            ratio(r, &rl, "p50_us_at_1000"),
            ratio(r, &d, "p99_us_at_1000"),
            ratio(r, &rl, "p99_us_at_1000"),
            ratio(r, &d, "rps_saturated"),
            ratio(r, &rl, "rps_saturated"),
            ratio(r, &rl, "proxy_cpu_s_per_1000_saturated"),
        );
    }
    let split: Vec<String> = rows
        .iter()
        .filter(|r| !r["waypoint_cpu_s_per_1000_at_1000"].is_null())
        .map(|r| {
            format!(
                "{}: waypoint {} and ztunnels {} at the fixed rate, waypoint {} and ztunnels {} saturated",
                r["protocol"].as_str().unwrap_or(""),
                spread(&r["waypoint_cpu_s_per_1000_at_1000"], 3),
                spread(&r["ztunnel_cpu_s_per_1000_at_1000"], 3),
                spread(&r["waypoint_cpu_s_per_1000_saturated"], 3),
                spread(&r["ztunnel_cpu_s_per_1000_saturated"], 3)
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "\nThe L7 path's CPU per 1,000 requests, split ({}). Waypoint CPU at the fixed rate over both \
         protocols: {} vCPU per 1,000 requests/s (the same number as CPU seconds per 1,000 requests); \
         resident memory after the run {:.1} MiB.\n",
        split.join("; "),
        spread(&l7["waypoint_vcpu_per_1000_rps"], 3),
        l7["waypoint_rss_mib"].as_f64().unwrap_or(f64::NAN)
    );
    super::targets_markdown(s, &l7["targets"]);
}

/// `cargo xtask bench-waypoint-ab`: this build's waypoint (A) against another build (B), side
/// by side on one bed, at the L7 benchmark's fixed rate (or `rate`). Rounds alternate which goes first;
/// the median ratio is what to read, since this machine's speed drifts by tens of percent
/// over minutes while two runs a few seconds apart see the same machine.
pub fn waypoint_ab(
    baseline: &std::path::Path,
    rounds: usize,
    run_for: Duration,
    http2: bool,
    rate: u32,
    work_dir: &std::path::Path,
) -> Result<()> {
    let bed = setup(work_dir, Some(baseline))?;
    let b = bed.baseline.as_ref().expect("set up with a baseline");
    let candidate_url = format!("http://{}:80/", Path::Waypoint.vip());
    let baseline_url = format!("http://{BASELINE_VIP}:80/");
    // One run through the waypoint `pid`: its CPU, write calls and context switches.
    let run = |url: &str, pid: u32| -> Result<Round> {
        let before = Counters::read(pid);
        let summary = load_url(&bed.client, url, http2, rate, 4, run_for)?;
        let after = Counters::read(pid);
        let requests = summary["total"].as_f64().unwrap_or(f64::NAN).max(1.0);
        Ok(Round {
            cpu_per_1000: (after.cpu - before.cpu) / (requests / 1000.0),
            p50_us: summary["latencyUs"]["p50"].as_f64().unwrap_or(f64::NAN),
            writes_per_request: (after.writes - before.writes) as f64 / requests,
            switches_per_request: (after.switches - before.switches) as f64 / requests,
        })
    };
    // Warm both (connections, pools, caches).
    run(&candidate_url, bed.waypoint_pid)?;
    run(&baseline_url, b.pid)?;
    println!(
        "    round  A cpu/1000  A p50 µs  A wr/req  A csw/req  B cpu/1000  B p50 µs  B wr/req  B csw/req  B/A cpu"
    );
    let mut ratios = Vec::new();
    let (mut sum_a, mut sum_b) = (0.0, 0.0);
    for round in 0..rounds {
        let (a, bb) = if round % 2 == 0 {
            let a = run(&candidate_url, bed.waypoint_pid)?;
            (a, run(&baseline_url, b.pid)?)
        } else {
            let bb = run(&baseline_url, b.pid)?;
            (run(&candidate_url, bed.waypoint_pid)?, bb)
        };
        println!("    {:>5}  {a}  {bb}  {:>7.3}", round + 1, bb.cpu_per_1000 / a.cpu_per_1000);
        ratios.push(bb.cpu_per_1000 / a.cpu_per_1000);
        sum_a += a.cpu_per_1000;
        sum_b += bb.cpu_per_1000;
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "==> B/A CPU per request: median {median:.3}, of the sums {:.3} (above 1: this build uses less). \
         Compare with an A/A run (the same binary as baseline) for the rig's own bias and noise.",
        sum_b / sum_a
    );
    Ok(())
}

/// One side of one A/B round.
struct Round {
    cpu_per_1000: f64,
    p50_us: f64,
    /// `write`/`writev` calls (`/proc/PID/io` counts these, not `recvfrom` or `epoll_wait`).
    writes_per_request: f64,
    /// Voluntary and involuntary, over all threads.
    switches_per_request: f64,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>10.4}  {:>8.0}  {:>8.2}  {:>9.2}",
            self.cpu_per_1000, self.p50_us, self.writes_per_request, self.switches_per_request
        )
    }
}

/// A process's cumulative CPU seconds, write calls and context switches.
struct Counters {
    cpu: f64,
    writes: u64,
    switches: u64,
}

impl Counters {
    fn read(pid: u32) -> Self {
        let field = |text: &str, name: &str| -> u64 {
            text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0)
        };
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        let switches = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|task| {
                let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                field(&status, "voluntary_ctxt_switches:") + field(&status, "nonvoluntary_ctxt_switches:")
            })
            .sum();
        Self { cpu: load::cpu_seconds(pid), writes: field(&io, "syscw:"), switches }
    }
}
