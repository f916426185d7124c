//! `cargo xtask demo`, the README's main command: what the mesh gives, shown on this machine.
//!
//! It brings up the local cluster from `deploy/examples/` (namespace `production` in the mesh,
//! payment-service v1 and v2 behind a waypoint, checkout-service, reporting, an un-meshed
//! legacy pod), then shows, measured: mTLS between SPIFFE identities from the proxies' own
//! logs and metrics, the 95/5 canary split, `x-beta-user: true` reaching the canary, STRICT
//! mTLS refusing the legacy pod's plaintext, the AuthorizationPolicy admitting checkout's
//! POST /api/v1/charge and refusing the rest with 403, and a summary of the Istio metrics. The
//! cluster is left running for the user to explore.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use warren_e2e::{waypoint::http_in, ztunnel::binary};

use crate::{
    cluster,
    setup::{run_checked, workspace_root},
};

fn say(step: &str) {
    println!("\n\x1b[1m==> {step}\x1b[0m");
}

/// Builds every binary a cluster runs (ztunnel with its eBPF object, controller, waypoint,
/// the echo application and the load client).
pub fn build_binaries() -> Result<()> {
    run_checked(Command::new("cargo").current_dir(workspace_root()).args(["build", "--quiet", "--bins"]))
}

/// The demo cluster as `state.json` describes it.
struct Demo {
    state: Value,
}

impl Demo {
    fn pod(&self, name: &str) -> Result<&Value> {
        self.state["pods"]
            .as_array()
            .and_then(|pods| pods.iter().find(|p| p["name"] == name))
            .with_context(|| format!("pod {name} is not in the cluster"))
    }

    fn netns(&self, pod: &str) -> Result<PathBuf> {
        let ns = self.pod(pod)?["netns"].as_str().context("netns")?;
        Ok(Path::new("/var/run/netns").join(ns))
    }

    fn node_netns(&self, index: usize) -> Result<PathBuf> {
        let ns = self.state["nodes"][index]["netns"].as_str().context("node netns")?;
        Ok(Path::new("/var/run/netns").join(ns))
    }

    fn vip(&self, service: &str) -> Result<SocketAddr> {
        let ip = self.state["services"][service].as_str().with_context(|| format!("service {service}"))?;
        Ok(SocketAddr::new(ip.parse()?, 80))
    }

    /// `warren-load` inside `pod`; its JSON summary.
    fn load(&self, pod: &str, url: &str, args: &[&str]) -> Result<Value> {
        let ns = self.pod(pod)?["netns"].as_str().context("netns")?.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(binary("warren-load"))
            .arg(url)
            .args(args)
            .args(["--json", "--timeout-ms", "3000"])
            .output()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("warren-load from {pod}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn get(&self, netns: &Path, addr: &str, path: &str) -> Result<String> {
        Ok(http_in(netns, addr.parse()?, "GET", path, &[])?.body)
    }
}

fn count(summary: &Value, group: &str, key: &str) -> u64 {
    summary[group][key].as_u64().unwrap_or(0)
}

/// Sums a metric's samples by the values of `labels`.
fn sum_by(metrics: &str, metric: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with(&format!("{metric}{{"))) {
        let label = |k: &str| {
            line.split(&format!(",{k}=\""))
                .nth(1)
                .or_else(|| line.split(&format!("{{{k}=\"")).nth(1))
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(labels.iter().map(|l| label(l)).collect()).or_insert(0.0) += value;
    }
    out
}

/// The last access-log line of a JSON log file that satisfies `pick`.
fn last_access(log: &Path, pick: impl Fn(&Value) -> bool) -> Option<Value> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "access" && pick(l))
        .last()
}

pub fn run() -> Result<()> {
    warren_e2e::require_root();
    let examples = workspace_root().join("deploy/examples");
    say("building ztunnel (with its eBPF programs), the controller, the waypoint and the demo apps");
    build_binaries()?;

    if cluster::state(cluster::DEFAULT_NAME).is_ok() {
        say("a demo cluster is already up: taking it down first");
        cluster::down(cluster::DEFAULT_NAME)?;
    }
    say(&format!("bringing up the local cluster from {} (cargo xtask up)", examples.display()));
    for file in [
        "00-namespace.yaml",
        "10-payment.yaml",
        "20-clients.yaml",
        "30-waypoint.yaml",
        "40-routing.yaml",
        "50-security.yaml",
    ] {
        println!("    {file}");
    }
    let state = cluster::up(&cluster::Up {
        dir: examples.clone(),
        name: cluster::DEFAULT_NAME.into(),
        nodes: 2,
        quiet: true,
    })?;
    let demo = Demo { state };
    let payment = demo.vip("production/payment-service")?;
    let charge = format!("http://{payment}/api/v1/charge");

    say("1. checkout-service calls payment-service: mTLS between SPIFFE identities, through the waypoint");
    let reply = http_in(&demo.netns("checkout-service-0")?, payment, "POST", "/api/v1/charge", &[])?;
    println!("    POST http://{payment}/api/v1/charge from checkout-service -> {}", reply.status);
    let node1_log = PathBuf::from(demo.state["nodes"][0]["ztunnelLog"].as_str().unwrap_or(""));
    let node2_log = PathBuf::from(demo.state["nodes"][1]["ztunnelLog"].as_str().unwrap_or(""));
    let waypoint_log = PathBuf::from(demo.pod("waypoint-0")?["waypointLog"].as_str().unwrap_or(""));
    std::thread::sleep(std::time::Duration::from_millis(300));
    if let Some(l) = last_access(&node1_log, |l| l["direction"] == "outbound") {
        println!(
            "    node-1 ztunnel  {} -> {}  (HBONE, {} -> {})",
            l["src"], l["dst"], l["src_identity"], l["dst_identity"]
        );
    }
    if let Some(l) = last_access(&waypoint_log, |l| l["path"] == "/api/v1/charge") {
        println!(
            "    waypoint        {} {} from {} -> {} via {} -> {}",
            l["method"], l["path"], l["src_identity"], l["upstream"], l["route"], l["status"]
        );
    }
    let node2_metrics = demo.get(&demo.node_netns(1)?, "127.0.0.1:15020", "/metrics")?;
    for (labels, n) in sum_by(
        &node2_metrics,
        "istio_tcp_connections_opened_total",
        &["reporter", "source_principal", "destination_principal", "connection_security_policy"],
    ) {
        if labels[0] == "destination" {
            println!("    node-2 ztunnel  {} -> {}: {n} connection(s), {}", labels[1], labels[2], labels[3]);
        }
    }
    let _ = node2_log;

    say("2. the canary: 95% of charges to v1, 5% to v2 (1000 requests, measured)");
    let split = demo.load("checkout-service-0", &charge, &["-X", "POST", "-n", "1000", "-c", "4"])?;
    let (v1, v2) = (count(&split, "versions", "v1"), count(&split, "versions", "v2"));
    println!(
        "    v1: {v1}   v2: {v2}   ({:.1}% to the canary; errors: {})",
        v2 as f64 / 10.0,
        split["errors"]
    );
    if v1 + v2 != 1000 {
        bail!("the canary run lost requests: {split}");
    }

    say("3. beta users (x-beta-user: true) always reach the canary");
    let beta =
        demo.load("checkout-service-0", &charge, &["-X", "POST", "-n", "100", "-H", "x-beta-user: true"])?;
    println!("    v2: {} of 100", count(&beta, "versions", "v2"));

    say("4. STRICT mTLS: the legacy pod (outside the mesh) sends plaintext to payment v1");
    let v1_ip = demo.pod("payment-v1-0")?["ipv4"].as_str().unwrap_or("").to_string();
    match http_in(&demo.netns("legacy")?, format!("{v1_ip}:8080").parse()?, "GET", "/", &[]) {
        Ok(r) => println!("    legacy -> {v1_ip}:8080: answered {} (STRICT did not hold!)", r.status),
        Err(e) => println!("    legacy -> {v1_ip}:8080: refused ({e})"),
    }

    say("5. the AuthorizationPolicy on the waypoint: only checkout-service may POST /api/v1/charge");
    for (who, method) in
        [("checkout-service-0", "POST"), ("checkout-service-0", "GET"), ("reporting-0", "POST")]
    {
        let r = http_in(&demo.netns(who)?, payment, method, "/api/v1/charge", &[])?;
        let body = if r.status == 200 { "ok".to_string() } else { r.body.trim().to_string() };
        println!("    {who:<20} {method:<5} /api/v1/charge -> {} {body}", r.status);
    }

    say("6. Istio metrics, scraped from the waypoint (:15020) and both ztunnels");
    let waypoint_metrics = demo.get(&demo.netns("waypoint-0")?, "127.0.0.1:15020", "/metrics")?;
    println!("    istio_requests_total (reporter=waypoint):");
    for (labels, n) in sum_by(
        &waypoint_metrics,
        "istio_requests_total",
        &[
            "source_workload",
            "destination_workload",
            "destination_version",
            "response_code",
            "response_flags",
        ],
    ) {
        println!(
            "      {:<20} -> {:<14} {:<3} {} {:<5} {n}",
            labels[0], labels[1], labels[2], labels[3], labels[4]
        );
    }
    println!("    istio_tcp_connections_opened_total:");
    for node in 0..2 {
        let metrics = demo.get(&demo.node_netns(node)?, "127.0.0.1:15020", "/metrics")?;
        for (labels, n) in sum_by(
            &metrics,
            "istio_tcp_connections_opened_total",
            &["reporter", "source_workload", "destination_workload"],
        ) {
            println!("      node-{} {:<12} {:<20} -> {:<14} {n}", node + 1, labels[0], labels[1], labels[2]);
        }
    }

    say("7. controller analyze, on the objects the controller sees (the pods as the cluster runs them)");
    let generated = demo.state["controller"]["generatedManifests"].as_str().context("generated manifests")?;
    let analyze = Command::new(binary("controller")).args(["analyze", "--dir", generated]).output()?;
    for line in String::from_utf8_lossy(&analyze.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&analyze.stderr).lines())
    {
        println!("    {line}");
    }

    say("the cluster stays up for you to explore");
    let checkout = demo.pod("checkout-service-0")?["netns"].as_str().unwrap_or("").to_string();
    let node1 = demo.state["nodes"][0]["netns"].as_str().unwrap_or("").to_string();
    let waypoint = demo.pod("waypoint-0")?["netns"].as_str().unwrap_or("").to_string();
    println!("    ip netns exec {checkout} curl -s -X POST {charge}");
    println!(
        "    ip netns exec {checkout} {} {charge} -X POST -n 1000 -c 4",
        binary("warren-load").display()
    );
    println!("    ip netns exec {node1} curl -s 127.0.0.1:15000/config_dump     # ztunnel on node-1");
    println!("    ip netns exec {waypoint} curl -s 127.0.0.1:15000/config_dump  # the waypoint");
    println!("    edit deploy/examples/*.yaml: the cluster follows (pods, routes, policies)");
    println!("    cargo xtask down");
    Ok(())
}
