//! `cargo xtask up DIR` / `cargo xtask down`: the whole mesh on this machine, built from a
//! directory of Kubernetes manifests, left running in the background.
//!
//! `up` starts a detached supervisor (`xtask cluster-supervise`, see [`supervisor`]) that owns
//! every namespace and process of the cluster, follows its progress log until the cluster is
//! ready, and prints how to use it. `down` asks the supervisor to tear down (SIGTERM), then
//! sweeps whatever a crashed run may have left: processes in the cluster's namespaces, the
//! namespaces, ztunnel's cgroups and BPF pins. Clusters have names, so several can run side by
//! side; state lives in `/run/warren/clusters/<name>/`.

pub mod plan;
pub mod supervisor;

use std::{
    io::{BufRead, BufReader, Seek},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub const DEFAULT_NAME: &str = "warren";

pub fn state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/warren/clusters").join(name)
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("cluster name {name:?}: use up to 20 lower-case letters, digits and '-'");
    }
    Ok(())
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn supervisor_pid(name: &str) -> Option<i32> {
    std::fs::read_to_string(state_dir(name).join("pid")).ok()?.trim().parse().ok()
}

/// The state the supervisor publishes, if the cluster is up.
pub fn state(name: &str) -> Result<Value> {
    let path = state_dir(name).join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("cluster {name:?} is not up (no {}); start it with `cargo xtask up DIR`", path.display())
    })?;
    Ok(serde_json::from_str(&text)?)
}

pub struct Up {
    pub dir: PathBuf,
    pub name: String,
    pub nodes: usize,
    /// Print the summary and how to explore.
    pub quiet: bool,
}

pub fn up(settings: &Up) -> Result<Value> {
    warren_e2e::require_root();
    valid_name(&settings.name)?;
    if !(1..=8).contains(&settings.nodes) {
        bail!("--nodes {}: a local cluster has 1 to 8 nodes", settings.nodes);
    }
    let dir = settings
        .dir
        .canonicalize()
        .with_context(|| format!("manifest directory {}", settings.dir.display()))?;
    plan::read_dir(&dir)?;
    if let Some(pid) = supervisor_pid(&settings.name)
        && alive(pid)
    {
        bail!(
            "cluster {:?} is already up (supervisor pid {pid}); `cargo xtask down --name {}` first",
            settings.name,
            settings.name
        );
    }
    let swept = sweep(&settings.name)?;
    if !swept.is_empty() {
        println!("cleaned up what an earlier run of {:?} left: {}", settings.name, swept.join(", "));
    }
    let state_dir = state_dir(&settings.name);
    std::fs::create_dir_all(&state_dir)?;
    let log_path = state_dir.join("cluster.log");
    let log = std::fs::File::create(&log_path)?;
    // By path, not current_exe(): `up` may have just rebuilt (replaced) its own binary.
    let mut command = Command::new(warren_e2e::ztunnel::binary("xtask"));
    command
        .arg("cluster-supervise")
        .arg("--dir")
        .arg(&dir)
        .args(["--name", &settings.name, "--nodes", &settings.nodes.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the supervisor from this terminal so
    // the cluster outlives `up`.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the cluster supervisor")?;
    std::fs::write(state_dir.join("pid"), child.id().to_string())?;
    println!(
        "cluster {:?}: {} nodes from {} (log: {})",
        settings.name,
        settings.nodes,
        dir.display(),
        log_path.display()
    );

    // Follow the progress log until READY, a failure, or a deadline.
    let mut reader = BufReader::new(std::fs::File::open(&log_path)?);
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut line = String::new();
    loop {
        line.clear();
        let pos = reader.stream_position()?;
        if reader.read_line(&mut line)? > 0 && line.ends_with('\n') {
            let text = line.trim_end();
            if text == "READY" {
                break;
            }
            if !text.starts_with('{') {
                println!("  {text}");
            }
            continue;
        }
        reader.seek(std::io::SeekFrom::Start(pos))?;
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = sweep(&settings.name);
            bail!("the cluster supervisor exited ({status}) before the cluster was ready:\n{log}");
        }
        if Instant::now() > deadline {
            let _ = down(&settings.name);
            bail!("the cluster was not ready within 3 minutes; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = wait_for_state(&settings.name)?;
    if !settings.quiet {
        print_summary(&state);
    }
    Ok(state)
}

fn wait_for_state(name: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match state(name) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn print_summary(state: &Value) {
    let name = state["name"].as_str().unwrap_or(DEFAULT_NAME);
    println!("\ncluster {name:?} is up and stays up until `cargo xtask down --name {name}`\n");
    println!("  {:<40} {:<8} {:<16} netns", "pod", "node", "IPv4");
    for p in state["pods"].as_array().into_iter().flatten() {
        let pod = format!("{}/{}", p["namespace"].as_str().unwrap_or(""), p["name"].as_str().unwrap_or(""));
        println!(
            "  {pod:<40} {:<8} {:<16} {}",
            p["node"].as_str().unwrap_or(""),
            p["ipv4"].as_str().unwrap_or(""),
            p["netns"].as_str().unwrap_or("")
        );
    }
    println!("\n  services:");
    for (svc, vip) in state["services"].as_object().into_iter().flatten() {
        println!("    {svc:<38} {}", vip.as_str().unwrap_or(""));
    }
    println!("\n  nodes (ztunnel admin on 127.0.0.1:15000, metrics on :15020, inside each node's netns):");
    for n in state["nodes"].as_array().into_iter().flatten() {
        println!("    {:<8} netns {}", n["name"].as_str().unwrap_or(""), n["netns"].as_str().unwrap_or(""));
    }
    let client = state["pods"].as_array().and_then(|pods| pods.iter().find(|p| p["waypoint"].is_null()));
    let service = state["services"].as_object().and_then(|s| s.values().next()).and_then(Value::as_str);
    if let (Some(client), Some(vip)) = (client, service) {
        let ns = client["netns"].as_str().unwrap_or("");
        println!("\n  try:");
        println!("    ip netns exec {ns} curl -s http://{vip}/");
        println!("    ip netns exec {ns} target/debug/warren-load http://{vip}/ -n 200 -c 4");
    }
    if let Some(node) = state["nodes"][0]["netns"].as_str() {
        println!("    ip netns exec {node} curl -s 127.0.0.1:15000/config_dump");
        println!("    ip netns exec {node} curl -s 127.0.0.1:15020/metrics");
    }
    println!("    cargo xtask down --name {name}");
}

/// Stops the cluster and removes everything it made.
pub fn down(name: &str) -> Result<Vec<String>> {
    valid_name(name)?;
    let mut removed = Vec::new();
    if let Some(pid) = supervisor_pid(name)
        && alive(pid)
    {
        // SAFETY: signalling our own supervisor.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            // SAFETY: as above; it did not stop in time.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        removed.push(format!("supervisor {pid}"));
    }
    removed.extend(sweep(name)?);
    Ok(removed)
}

/// Removes what the cluster `name` may have left: processes in its namespaces, the
/// namespaces, ztunnel cgroups and BPF pins, the state directory.
fn sweep(name: &str) -> Result<Vec<String>> {
    let dir = state_dir(name);
    let mut removed = Vec::new();
    let state: Option<Value> =
        std::fs::read_to_string(dir.join("state.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let pid = supervisor_pid(name);
    // Namespaces: the ones the state names, and any named after the supervisor's pid (made
    // before the state was first written).
    let mut namespaces: Vec<String> = Vec::new();
    if let Some(s) = &state {
        for list in ["nodes", "pods"] {
            for item in s[list].as_array().into_iter().flatten() {
                if let Some(ns) = item["netns"].as_str() {
                    namespaces.push(ns.to_string());
                }
            }
        }
        if let Some(u) = s["underlayNetns"].as_str() {
            namespaces.push(u.to_string());
        }
    }
    if let Some(pid) = pid {
        let marker = format!("{}x", pid % 100_000);
        for ns in list_netns() {
            let rest = ns.strip_prefix('w').map(|r| r.trim_start_matches(|c: char| c.is_ascii_lowercase()));
            if rest.is_some_and(|r| {
                r.starts_with(&marker) && r[marker.len()..].chars().all(|c| c.is_ascii_digit())
            }) {
                namespaces.push(ns);
            }
        }
    }
    namespaces.sort();
    namespaces.dedup();
    let existing = list_netns();
    for ns in namespaces.iter().filter(|n| existing.contains(n)) {
        for pid in netns_pids(ns) {
            // SAFETY: killing processes that live in the cluster's own namespaces.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
        removed.push(format!("netns {ns}"));
    }
    let node_names: Vec<String> = (1..=8).map(|i| format!("{name}-node-{i}")).collect();
    for node in &node_names {
        let pins = Path::new("/sys/fs/bpf/warren").join(node);
        if pins.exists() && std::fs::remove_dir_all(&pins).is_ok() {
            removed.push(format!("BPF pins {}", pins.display()));
        }
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let cg = Path::new(root).join("warren-e2e").join(node);
            if cg.exists() {
                let _ = kill_cgroup(&cg);
                if std::fs::remove_dir(&cg).is_ok() {
                    removed.push(format!("cgroup {}", cg.display()));
                }
            }
        }
    }
    if let Some(root) = state.as_ref().and_then(|s| s["controller"]["root"].as_str()) {
        let _ = std::fs::remove_dir_all(root);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(removed)
}

fn list_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

fn netns_pids(ns: &str) -> Vec<i32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    })
    .unwrap_or_default()
}

fn kill_cgroup(cg: &Path) -> std::io::Result<()> {
    let procs = std::fs::read_to_string(cg.join("cgroup.procs"))?;
    for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
        // SAFETY: the cgroup is the cluster's ztunnel's own.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}
