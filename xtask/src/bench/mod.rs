//! `cargo xtask bench`: Warren's measurements, as ratios against baselines run in the same
//! invocation and interleaved (A B C A B C ...), so machine drift cancels out. Every figure is
//! the median over rounds with its spread: the cost of eBPF capture on connect(); the L4 data
//! path (latency, connections/s, throughput, proxy CPU per GB, ztunnel memory at 1,000 and
//! 10,000 open connections) against direct and against relay pairs, through the waypoint too;
//! HTTP/1.1 and HTTP/2 at a fixed rate and at saturation through the waypoint, the mesh, a
//! relay pair and direct; and the controller at scale.
//!
//! Results go to target/bench/results.json and docs/performance.md (with `--only GROUP`, to
//! target/bench/results-GROUP.json and target/bench/performance-GROUP.md).

mod controller;
mod controller_kube;
mod datapath;
mod l7;
mod load;

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use warren_e2e::{app::Server, topology::Node, topology::Pod, ztunnel::Ztunnel};

use crate::setup::{run_checked, workspace_root};

pub use load::hold_main;

/// The connect() target of the capture benchmark (issue: capture adds < 2 µs at the median).
const CAPTURE_TARGET_NS: f64 = 2_000.0;

pub fn run(quick: bool, only: Option<&str>) -> Result<()> {
    let wants = |group: &str| only.is_none_or(|o| o == group);
    if let Some(o) = only {
        anyhow::ensure!(
            matches!(o, "capture" | "datapath" | "l7" | "controller"),
            "--only takes capture, datapath, l7 or controller, not {o:?}"
        );
    }
    warren_e2e::require_root();
    let root = workspace_root();
    let mut seconds = serde_json::Map::new();
    let mut phase = Instant::now();
    // Ends a phase: prints and records how long it took.
    let mut took = |name: &str, seconds: &mut serde_json::Map<String, Value>| {
        let s = phase.elapsed().as_secs_f64();
        println!("    ({name}: {s:.0} s)");
        seconds.insert(name.into(), json!(s));
        phase = Instant::now();
    };
    build_release(&root)?;

    crate::setup::ensure_debian_packages(&["haproxy"])?;
    took("build", &mut seconds);
    let (rounds, connects) = if quick { (3, 2_000) } else { (5, 10_000) };
    // Before pinning: the machine's own CPU count.
    let machine = machine();
    load::pin_to_cpu(0)?;
    let capture = if wants("capture") {
        println!(
            "==> capture: connect() latency, {rounds} rounds x {connects} connects per variant, pinned to CPU 0"
        );
        let c = capture_bench(rounds, connects)?;
        took("capture", &mut seconds);
        c
    } else {
        Value::Null
    };
    let settings = if quick {
        datapath::Settings {
            rounds: 3,
            rr_iterations: 3_000,
            crr_duration: Duration::from_millis(500),
            throughput_duration: Duration::from_secs(1),
            held_connections: 10_000,
            hold_limit: Duration::from_secs(30),
        }
    } else {
        datapath::Settings {
            rounds: 5,
            rr_iterations: 20_000,
            crr_duration: Duration::from_secs(3),
            throughput_duration: Duration::from_secs(5),
            held_connections: 10_000,
            hold_limit: Duration::from_secs(60),
        }
    };
    let data_path = if wants("datapath") {
        println!("==> L4 data path: {} rounds per path, every process pinned to CPU 0", settings.rounds);
        let d = datapath::run(&settings, root.join("target/bench/relay"))?;
        took("data_path", &mut seconds);
        d
    } else {
        Value::Null
    };

    let l7 = if wants("l7") {
        let settings = if quick {
            l7::Settings {
                rounds: 3,
                fixed_rate_duration: Duration::from_secs(1),
                saturation_duration: Duration::from_millis(750),
            }
        } else {
            l7::Settings {
                rounds: 5,
                fixed_rate_duration: Duration::from_secs(5),
                saturation_duration: Duration::from_secs(3),
            }
        };
        println!("==> L7 path (waypoint): {} rounds, every process pinned to CPU 0", settings.rounds);
        let l = l7::run(&settings, &root.join("target/bench/relay-l7"))?;
        took("l7", &mut seconds);
        l
    } else {
        Value::Null
    };

    let controller = if wants("controller") {
        let scale = controller::Scale {
            pods: 10_000,
            services: 2_000,
            policies: 500,
            rounds: if quick { 3 } else { 5 },
        };
        println!(
            "==> controller at scale: {} pods, {} services, {} policies",
            scale.pods, scale.services, scale.policies
        );
        let c = controller::run(&scale, &root.join("target/bench/controller"))?;
        took("controller", &mut seconds);
        c
    } else {
        Value::Null
    };

    let results = json!({
        "machine": machine,
        "quick": quick,
        "capture_connect": capture,
        "data_path": data_path,
        "l7": l7,
        "controller": controller,
        "seconds": seconds,
    });
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    // A run of one group leaves the full run's results and docs/performance.md alone.
    let (json_path, report_path) = match only {
        None => (dir.join("results.json"), root.join("docs/performance.md")),
        Some(group) => {
            (dir.join(format!("results-{group}.json")), dir.join(format!("performance-{group}.md")))
        }
    };
    fs::write(&json_path, serde_json::to_string_pretty(&results)?)?;
    let report = markdown(&results);
    fs::write(&report_path, &report)?;
    println!("\n{report}");
    let shown = |p: &std::path::Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    println!("raw numbers: {}; report: {}", shown(&json_path), shown(&report_path));
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// No Warren programs attached.
    Baseline,
    /// Programs attached to the root cgroup; the client pod is not enrolled (the tax every
    /// connect on the node pays).
    AttachedNotEnrolled,
    /// The client pod is enrolled: connect() is rewritten to ztunnel's in-pod listener.
    Enrolled,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "no capture programs",
            Variant::AttachedNotEnrolled => "programs attached, pod not enrolled",
            Variant::Enrolled => "pod enrolled (connect to ztunnel's in-pod listener)",
        }
    }
}

struct Sample {
    median_ns: f64,
    p99_ns: f64,
    per_second: f64,
}

fn capture_bench(rounds: usize, connects: usize) -> Result<Value> {
    let mut node = Node::new();
    let (client, server_pod) = (node.add_pod(), node.add_pod());
    let _server = Server::start(&server_pod, 8080);
    let dst = SocketAddr::new(server_pod.ipv4, 8080);
    let variants = [Variant::Baseline, Variant::AttachedNotEnrolled, Variant::Enrolled];
    let mut samples: Vec<(Variant, Sample)> = Vec::new();
    for round in 1..=rounds {
        for variant in variants {
            let ztunnel = match variant {
                Variant::Baseline => None,
                Variant::AttachedNotEnrolled | Variant::Enrolled => {
                    let enrolled = variant == Variant::Enrolled;
                    let z = Ztunnel::start(&node, &[client.workload(&node.name, enrolled)]);
                    if enrolled {
                        z.wait_enrolled(&client.name);
                    }
                    Some(z)
                }
            };
            let sample = measure_connects(&client, dst, connects)?;
            println!(
                "    round {round}: {:<52} median {:>7.2} µs  p99 {:>7.2} µs  {:>8.0} connects/s",
                variant.name(),
                sample.median_ns / 1e3,
                sample.p99_ns / 1e3,
                sample.per_second
            );
            drop(ztunnel);
            samples.push((variant, sample));
        }
    }
    let summary = |v: Variant| {
        let of = |f: fn(&Sample) -> f64| -> Vec<f64> {
            samples.iter().filter(|(x, _)| *x == v).map(|(_, s)| f(s)).collect()
        };
        json!({
            "variant": v.name(),
            "median_ns": stats(&of(|s| s.median_ns)),
            "p99_ns": stats(&of(|s| s.p99_ns)),
            "connects_per_second": stats(&of(|s| s.per_second)),
        })
    };
    let base = median(
        &samples
            .iter()
            .filter(|(v, _)| *v == Variant::Baseline)
            .map(|(_, s)| s.median_ns)
            .collect::<Vec<_>>(),
    );
    let attached = median(
        &samples
            .iter()
            .filter(|(v, _)| *v == Variant::AttachedNotEnrolled)
            .map(|(_, s)| s.median_ns)
            .collect::<Vec<_>>(),
    );
    let enrolled = median(
        &samples
            .iter()
            .filter(|(v, _)| *v == Variant::Enrolled)
            .map(|(_, s)| s.median_ns)
            .collect::<Vec<_>>(),
    );
    Ok(json!({
        "connects_per_round": connects,
        "rounds": rounds,
        "variants": variants.iter().map(|v| summary(*v)).collect::<Vec<_>>(),
        "attached_added_ns": attached - base,
        "attached_ratio": attached / base,
        "enrolled_added_ns": enrolled - base,
        "enrolled_ratio": enrolled / base,
        "target_added_ns": CAPTURE_TARGET_NS,
        "target_met": (attached - base) < CAPTURE_TARGET_NS && (enrolled - base) < CAPTURE_TARGET_NS,
    }))
}

/// `connects` sequential connect() calls from inside `pod`, each closed with a reset (no
/// TIME_WAIT to exhaust ports). Only connect() itself is timed.
fn measure_connects(pod: &Pod, dst: SocketAddr, connects: usize) -> Result<Sample> {
    let deadline = Duration::from_secs(120);
    let timings = pod.ns.run(move || -> std::io::Result<(Vec<u64>, Duration)> {
        load::pin_to_cpu(0)?;
        let mut timings = Vec::with_capacity(connects);
        let started = Instant::now();
        while timings.len() < connects && started.elapsed() < deadline {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_linger(Some(Duration::ZERO))?;
            let t = Instant::now();
            let ok = s.connect(&dst.into()).is_ok();
            let took = t.elapsed().as_nanos() as u64;
            if ok {
                timings.push(took);
            }
        }
        Ok((timings, started.elapsed()))
    });
    let (mut timings, elapsed) = timings.context("connect loop")?;
    anyhow::ensure!(timings.len() == connects, "only {} of {connects} connects succeeded", timings.len());
    timings.sort_unstable();
    let at = |q: f64| timings[((timings.len() as f64 * q) as usize).min(timings.len() - 1)] as f64;
    Ok(Sample { median_ns: at(0.5), p99_ns: at(0.99), per_second: connects as f64 / elapsed.as_secs_f64() })
}

/// Builds the release binaries the benchmarks run and points the harness at them.
fn build_release(root: &std::path::Path) -> Result<()> {
    println!("==> building release binaries");
    run_checked(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--quiet",
        "--bin",
        "ztunnel",
        "--bin",
        "waypoint",
        "--bin",
        "warren-echo",
        "--bin",
        "warren-load",
        "--bin",
        "controller",
    ]))?;
    // The harness finds binaries beside the running executable; point it at the release ones
    // (where cargo put them: CARGO_TARGET_DIR when set).
    // SAFETY: called before any thread is started.
    unsafe { std::env::set_var("WARREN_BIN_DIR", target_dir().join("release")) };
    Ok(())
}

/// The L7 benchmark's fixed request rate.
pub const L7_RATE: u32 = l7::RATE;

/// `cargo xtask bench-waypoint-ab`: see [`l7::waypoint_ab`].
pub fn waypoint_ab(
    baseline: &std::path::Path,
    rounds: usize,
    seconds: f64,
    http2: bool,
    rate: u32,
) -> Result<()> {
    anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!((1..=l7::RATE * 10).contains(&rate), "--rate takes 1 to {}, not {rate}", l7::RATE * 10);
    anyhow::ensure!((0.5..=120.0).contains(&seconds), "--seconds takes 0.5 to 120, not {seconds}");
    let baseline = std::fs::canonicalize(baseline)
        .with_context(|| format!("--baseline {}: no such waypoint binary", baseline.display()))?;
    warren_e2e::require_root();
    let root = workspace_root();
    build_release(&root)?;
    // The L7 bed starts the haproxy relay pair too.
    crate::setup::ensure_debian_packages(&["haproxy"])?;
    load::pin_to_cpu(0)?;
    let protocol = if http2 { "HTTP/2" } else { "HTTP/1.1" };
    println!(
        "==> waypoint A/B: A = this build, B = {}; {rounds} rounds of {seconds} s each at {rate}/s over {protocol}, every process on CPU 0",
        baseline.display(),
    );
    l7::waypoint_ab(
        &baseline,
        rounds,
        Duration::from_secs_f64(seconds),
        http2,
        rate,
        &root.join("target/bench/waypoint-ab"),
    )
}

/// Cargo's target directory: CARGO_TARGET_DIR (relative to the workspace) or `target/`.
fn target_dir() -> std::path::PathBuf {
    let root = workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

pub(crate) fn stats(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "median": median(v), "min": min, "max": max, "rounds": v })
}

fn machine() -> Value {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "kernel": out("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "date": out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": out("git", &["-C", workspace_root().to_str().unwrap_or("."), "rev-parse", "--short", "HEAD"]),
        "load_average": fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn markdown(r: &Value) -> String {
    let m = &r["machine"];
    let c = &r["capture_connect"];
    let mut s = String::new();
    let _ = writeln!(s, "# Warren performance\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}` on {} (kernel {}, {} vCPUs, load {}), commit {}. \
         Every figure is the median over rounds, [min–max] across rounds; variants run \
         interleaved in one invocation, all pinned to one vCPU.\n",
        if r["quick"] == true { " --quick" } else { "" },
        m["date"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["cpus"],
        m["load_average"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or("")
    );
    if let Some(secs) = r["seconds"].as_object() {
        // In the order they ran.
        let parts: Vec<String> = ["capture", "data_path", "l7", "controller"]
            .iter()
            .filter_map(|k| Some(format!("{} {:.0} s", k.replace('_', " "), secs.get(*k)?.as_f64()?)))
            .collect();
        let total: f64 = secs.iter().filter(|(k, _)| *k != "build").filter_map(|(_, v)| v.as_f64()).sum();
        let _ = writeln!(s, "Measuring took {total:.0} s ({}), after the release build.\n", parts.join(", "));
    }
    if !c.is_null() {
        capture_markdown(&mut s, c);
    }
    if !r["data_path"].is_null() {
        data_path_markdown(&mut s, &r["data_path"]);
    }
    if !r["l7"].is_null() {
        l7::markdown(&mut s, &r["l7"]);
    }
    if !r["controller"].is_null() {
        controller::markdown(&mut s, &r["controller"]);
    }
    s
}

fn capture_markdown(s: &mut String, c: &Value) {
    let _ = writeln!(s, "## eBPF capture: cost per connect()\n");
    let _ = writeln!(
        s,
        "{} sequential connect() calls per round from a pod to a server pod on the same node, {} rounds.\n",
        c["connects_per_round"], c["rounds"]
    );
    let _ = writeln!(s, "| variant | connect() median | p99 | connects/s |");
    let _ = writeln!(s, "|---|---|---|---|");
    for v in c["variants"].as_array().into_iter().flatten() {
        let f = |k: &str, scale: f64| {
            format!(
                "{:.2} [{:.2}–{:.2}]",
                v[k]["median"].as_f64().unwrap_or(f64::NAN) / scale,
                v[k]["min"].as_f64().unwrap_or(f64::NAN) / scale,
                v[k]["max"].as_f64().unwrap_or(f64::NAN) / scale
            )
        };
        let _ = writeln!(
            s,
            "| {} | {} µs | {} µs | {} |",
            v["variant"].as_str().unwrap_or(""),
            f("median_ns", 1e3),
            f("p99_ns", 1e3),
            f("connects_per_second", 1.0)
        );
    }
    let met = |b: bool| if b { "met" } else { "NOT met" };
    let _ = writeln!(
        s,
        "\nAdded by the attached programs for a pod that is not enrolled: {:+.2} µs ({:.2}× the baseline). \
         Added for an enrolled pod (rewritten to ztunnel's in-pod listener): {:+.2} µs ({:.2}×). \
         Target, under 2 µs added at the median: **{}**.\n\n\
         The enrolled connect() completes against ztunnel's listener over loopback inside the \
         pod, a shorter path than the veth to the server pod; what relaying then costs belongs \
         to the data-path figures.",
        c["attached_added_ns"].as_f64().unwrap_or(f64::NAN) / 1e3,
        c["attached_ratio"].as_f64().unwrap_or(f64::NAN),
        c["enrolled_added_ns"].as_f64().unwrap_or(f64::NAN) / 1e3,
        c["enrolled_ratio"].as_f64().unwrap_or(f64::NAN),
        met(c["target_met"] == true)
    );
}

fn data_path_markdown(s: &mut String, d: &Value) {
    let _ = writeln!(s, "\n## L4 data path\n");
    let _ = writeln!(
        s,
        "Client pod on node 1, server pod on node 2 (same node for the same-node row), {} rounds. \
         The waypoint row connects to a service VIP whose traffic goes through a waypoint pod on \
         node 2; the benchmark's bytes are not HTTP, so the waypoint passes them through as TCP \
         (its sniffer decides on the first byte, 0x07, without waiting for its timeout; the \
         request/response figures are one connection's steady state after 200 warm-up \
         exchanges). Ratios are to the direct path's and the plain relay pair's medians.\n",
        d["rounds"]
    );
    let paths = d["paths"].as_array().cloned().unwrap_or_default();
    let med = |p: &Value, k: &str| p[k]["median"].as_f64().unwrap_or(f64::NAN);
    let direct = paths.first().cloned().unwrap_or_default();
    let relay = paths.get(1).cloned().unwrap_or_default();
    let _ = writeln!(
        s,
        "| path | 1-byte RR p50 µs | p99 µs | p99.9 µs | RR tps | new conn/s | Gb/s 1 stream | Gb/s 8 streams | proxy CPU s/GB |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for p in &paths {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p["path"].as_str().unwrap_or(""),
            spread(&p["rr_p50_us"], 1),
            spread(&p["rr_p99_us"], 1),
            spread(&p["rr_p999_us"], 1),
            spread(&p["rr_tps"], 0),
            spread(&p["new_connections_per_s"], 0),
            spread(&p["throughput_1_stream_gbps"], 2),
            spread(&p["throughput_8_streams_gbps"], 2),
            spread(&p["proxy_cpu_s_per_gb"], 2),
        );
    }
    let _ = writeln!(
        s,
        "\n| path | p50 vs direct | p50 vs relay | conn/s vs direct | conn/s vs relay | 1-stream vs direct | 1-stream vs relay | 8-stream vs direct | 8-stream vs relay | CPU/GB vs relay |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for p in &paths {
        let ratio = |k: &str, base: &Value| {
            let r = med(p, k) / med(base, k);
            if r.is_finite() { format!("{r:.2}×") } else { "—".to_string() }
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p["path"].as_str().unwrap_or(""),
            ratio("rr_p50_us", &direct),
            ratio("rr_p50_us", &relay),
            ratio("new_connections_per_s", &direct),
            ratio("new_connections_per_s", &relay),
            ratio("throughput_1_stream_gbps", &direct),
            ratio("throughput_1_stream_gbps", &relay),
            ratio("throughput_8_streams_gbps", &direct),
            ratio("throughput_8_streams_gbps", &relay),
            ratio("proxy_cpu_s_per_gb", &relay),
        );
    }
    let waypoint = paths.iter().find(|p| !p["waypoint_cpu_s_per_gb"].is_null());
    let _ = writeln!(
        s,
        "\nProxy CPU is user + system time over both throughput runs (1 and 8 streams) per GB \
         delivered to the server: both haproxy processes for the relay rows, both ztunnels for \
         Warren L4{}.",
        waypoint
            .map(|w| format!(
                ", both ztunnels and the waypoint for the waypoint row (ztunnels {}, waypoint {} s/GB)",
                spread(&w["ztunnel_cpu_s_per_gb"], 2),
                spread(&w["waypoint_cpu_s_per_gb"], 2)
            ))
            .unwrap_or_default()
    );
    let rss = &d["ztunnel_rss_mib"];
    let fmt = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.1}", x.as_f64().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
            .unwrap_or_default()
    };
    let loaded: Vec<String> = rss["with_connections"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let (want, opened, at_server) = (&m["connections"], &m["opened"], &m["at_server"]);
            let short = if opened != want || at_server.as_u64() < want.as_u64() {
                format!(" (only {opened} opened, {at_server} reached the server in the time allowed)")
            } else {
                String::new()
            };
            format!(
                "with {} connections open through the mesh {} MiB{short}",
                thousands(want),
                fmt(&m["rss_mib"])
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "\nztunnel resident memory (node 1 / node 2): idle {} MiB; {}.\n",
        fmt(&rss["idle"]),
        loaded.join("; ")
    );
    targets_markdown(s, &d["targets"]);
}

/// A figure as "median [min–max]" with `decimals`, or "—" when absent.
pub(crate) fn spread(v: &Value, decimals: usize) -> String {
    if v.is_null() {
        return "—".to_string();
    }
    format!(
        "{:.*} [{:.*}–{:.*}]",
        decimals,
        v["median"].as_f64().unwrap_or(f64::NAN),
        decimals,
        v["min"].as_f64().unwrap_or(f64::NAN),
        decimals,
        v["max"].as_f64().unwrap_or(f64::NAN)
    )
}

/// 10000 as "10,000".
pub(crate) fn thousands(v: &Value) -> String {
    let digits = v.as_u64().map(|n| n.to_string()).unwrap_or_else(|| v.to_string());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The "Targets:" list every section ends with: met or not, and the figures behind it.
pub(crate) fn targets_markdown(s: &mut String, targets: &Value) {
    let _ = writeln!(s, "Targets:\n");
    for t in targets.as_array().into_iter().flatten() {
        let detail = t
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| *k != "target" && *k != "met")
                    .map(|(k, v)| format!("{k} = {:.3}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "- {}: **{}** ({detail})",
            t["target"].as_str().unwrap_or(""),
            if t["met"] == true { "met" } else { "NOT met" }
        );
    }
}
