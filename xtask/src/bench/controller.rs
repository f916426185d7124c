//! The controller at scale: translating 10,000 pods, 2,000 services and 500 policies (the
//! `controller translate` command end to end: reading the YAML, translating, writing the
//! config), and how long one pod change takes to reach 10 proxies subscribed to `controller
//! serve`'s config stream: in local mode (from the manifest write to the last proxy applying the
//! update), then in Kubernetes mode against a real kube-apiserver (controller_kube.rs).
//! Targets (controller issue): under 1 s, and under 100 ms.

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use warren_e2e::ztunnel::binary;

use super::stats;

pub struct Scale {
    pub pods: usize,
    pub services: usize,
    pub policies: usize,
    pub rounds: usize,
}

pub(super) const NAMESPACES: usize = 20;
pub(super) const NODES: usize = 10;

/// Writes the manifests: namespaces, pods spread over nodes and namespaces with IPs, services
/// selecting them, AuthorizationPolicies selecting services.
pub(super) fn generate(dir: &Path, scale: &Scale) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = String::new();
    for n in 0..NAMESPACES {
        let _ = writeln!(
            text,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n---"
        );
    }
    std::fs::write(dir.join("namespaces.yaml"), &text)?;
    text.clear();
    for i in 0..scale.pods {
        let (ns, svc) = (i % NAMESPACES, i % scale.services);
        let _ = writeln!(
            text,
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns{ns}, labels: {{app: svc{svc}, version: v{}}}}}\n\
             spec: {{serviceAccountName: sa{svc}, nodeName: node-{}, containers: [{{name: app, image: x, ports: [{{containerPort: 8080}}]}}]}}\n\
             status: {{phase: Running, podIPs: [{{ip: 10.{}.{}.{}}}]}}\n---",
            i % 2,
            i % NODES,
            100 + i / 62500,
            (i / 250) % 250,
            i % 250 + 1
        );
    }
    std::fs::write(dir.join("pods.yaml"), &text)?;
    text.clear();
    for i in 0..scale.services {
        let _ = writeln!(
            text,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: ns{}}}\n\
             spec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc{i}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---",
            i % NAMESPACES,
            i / 250,
            i % 250 + 1
        );
    }
    std::fs::write(dir.join("services.yaml"), &text)?;
    text.clear();
    for i in 0..scale.policies {
        let ns = i % NAMESPACES;
        let _ = writeln!(
            text,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{i}, namespace: ns{ns}}}\n\
             spec: {{selector: {{matchLabels: {{app: svc{i}}}}}, action: ALLOW, rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns{ns}/sa/sa{i}]}}}}]}}]}}\n---"
        );
    }
    std::fs::write(dir.join("policies.yaml"), &text)?;
    Ok(())
}

fn changed_pod(dir: &Path, round: usize) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: changing, namespace: ns0, labels: {{app: svc0, round: r{round}}}}}\n\
         spec: {{nodeName: node-0, containers: [{{name: app, image: x}}]}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.250.0.1}}]}}\n"
    );
    let tmp = dir.join(".changing.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join("changing.yaml"))?;
    Ok(())
}

/// A child process killed (and reaped) when dropped, even on an early error.
pub(super) struct KillOnDrop(pub(super) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The proxies: `controller subscribe` processes (the release build, one process per node as
/// ztunnels are), each printing a line per update it has applied; a thread per proxy notes when
/// each line arrives.
pub(super) struct Proxies {
    _children: Vec<KillOnDrop>,
    /// Per proxy: the version it last applied, and when its line arrived.
    applied: Arc<Mutex<HashMap<usize, (String, Instant)>>>,
    /// Per proxy: how many workloads its last update held.
    sizes: Arc<Mutex<HashMap<usize, usize>>>,
}

impl Proxies {
    /// One subscriber per node, as `ztunnel/node-<n>`, authenticating with `token_file(n)`;
    /// their error output goes to `work/subscribe-<n>.log`.
    pub(super) fn start(
        listen: u16,
        root: &Path,
        token_file: impl Fn(usize) -> std::path::PathBuf,
        work: &Path,
    ) -> Result<Self> {
        let applied: Arc<Mutex<HashMap<usize, (String, Instant)>>> = Default::default();
        let sizes: Arc<Mutex<HashMap<usize, usize>>> = Default::default();
        let mut children = Vec::new();
        for n in 0..NODES {
            let mut child = KillOnDrop(
                Command::new(binary("controller"))
                    .args(["subscribe", "--controller", &format!("127.0.0.1:{listen}"), "--root"])
                    .arg(root)
                    .arg("--token-file")
                    .arg(token_file(n))
                    .args(["--node", &format!("node-{n}"), "--proxy", &format!("ztunnel/node-{n}")])
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(work.join(format!("subscribe-{n}.log")))?)
                    .spawn()
                    .context("starting controller subscribe")?,
            );
            let stdout = child.0.stdout.take().expect("piped");
            let (applied, sizes) = (applied.clone(), sizes.clone());
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let at = Instant::now();
                    let Ok(update) = serde_json::from_str::<Value>(&line) else { continue };
                    let version = update["version"].as_str().unwrap_or_default().to_string();
                    applied.lock().expect("poisoned").insert(n, (version, at));
                    let workloads = update["workloads"].as_u64().unwrap_or(0) as usize;
                    sizes.lock().expect("poisoned").insert(n, workloads);
                }
            });
            children.push(child);
        }
        Ok(Proxies { _children: children, applied, sizes })
    }

    /// Waits until every proxy's last update held `workloads` workloads.
    pub(super) fn wait_complete(&self, workloads: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let sizes = self.sizes.lock().expect("poisoned").clone();
            if sizes.len() == NODES && sizes.values().all(|n| *n == workloads) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut got: Vec<_> = sizes.into_iter().collect();
                got.sort();
                bail!(
                    "the {NODES} proxies did not all get the whole config ({workloads} workloads) within \
                     {timeout:?}; workloads per proxy that got any: {got:?} (their errors: subscribe-<n>.log)"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The versions the proxies run now.
    pub(super) fn versions(&self) -> Vec<String> {
        self.applied.lock().expect("poisoned").values().map(|(v, _)| v.clone()).collect()
    }

    /// Waits until every proxy has applied a version not in `before`; when the last one did.
    pub(super) fn wait_new_version(&self, before: &[String], deadline: Instant) -> Result<Instant> {
        loop {
            {
                let a = self.applied.lock().expect("poisoned");
                if a.len() == NODES && a.values().all(|(v, _)| !before.contains(v)) {
                    return Ok(a.values().map(|(_, t)| *t).max().expect("ten"));
                }
                if Instant::now() > deadline {
                    let updated = a.values().filter(|(v, _)| !before.contains(v)).count();
                    bail!("the change reached {updated} of the {NODES} proxies in time");
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub fn run(scale: &Scale, work: &Path) -> Result<Value> {
    let _ = std::fs::remove_dir_all(work);
    let dir = work.join("manifests");
    generate(&dir, scale)?;
    changed_pod(&dir, 0)?;

    // Translation, end to end.
    let mut translate_ms = Vec::new();
    for _ in 0..scale.rounds {
        let started = Instant::now();
        let out = Command::new(binary("controller"))
            .args(["translate", "--dir"])
            .arg(&dir)
            .arg("--out")
            .arg(work.join("config.json"))
            .stderr(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("controller translate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        translate_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let translated: Value = serde_json::from_slice(&std::fs::read(work.join("config.json"))?)?;
    println!(
        "    translated {} workloads, {} services, {} policies: {:.0} ms (median of {})",
        translated["workloads"].as_array().map_or(0, Vec::len),
        translated["services"].as_array().map_or(0, Vec::len),
        translated["authorizations"].as_array().map_or(0, Vec::len),
        stats(&translate_ms)["median"].as_f64().unwrap_or(f64::NAN),
        scale.rounds
    );

    // Propagation to 10 subscribed proxies.
    let (listen, admin) = (free_port()?, free_port()?);
    let tokens: String = (0..NODES).map(|n| format!("node-{n} token-{n}\n")).collect();
    std::fs::write(work.join("tokens"), tokens)?;
    for n in 0..NODES {
        std::fs::write(work.join(format!("token-{n}")), format!("token-{n}"))?;
    }
    let controller = KillOnDrop(
        Command::new(binary("controller"))
            .args(["serve", "--interval-ms", "10", "--listen", &format!("127.0.0.1:{listen}")])
            .args(["--admin", &format!("127.0.0.1:{admin}"), "--dir"])
            .arg(&dir)
            .arg("--out")
            .arg(work.join("served.json"))
            .arg("--ca-dir")
            .arg(work.join("ca"))
            .arg("--tokens")
            .arg(work.join("tokens"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("controller.log"))?)
            .spawn()
            .context("starting controller serve")?,
    );
    let root = work.join("ca/root-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(root.exists() && std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()) {
        if Instant::now() > deadline {
            bail!("controller serve did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let proxies = Proxies::start(listen, &root, |n| work.join(format!("token-{n}")), work)?;
    // Every proxy has the whole config (all pods and the changing one) before measuring.
    proxies.wait_complete(scale.pods + 1, Duration::from_secs(120))?;
    let mut propagation_ms = Vec::new();
    // Round 0 warms up (the first change after the initial sync also finds the initial config
    // file still being written, and cold allocator caches); it is shown but not counted.
    for round in 0..=scale.rounds {
        let before = proxies.versions();
        let written = Instant::now();
        changed_pod(&dir, round + 1)?;
        let last = proxies
            .wait_new_version(&before, written + Duration::from_secs(30))
            .with_context(|| format!("round {round}"))?;
        let ms = last.duration_since(written).as_secs_f64() * 1000.0;
        if round == 0 {
            println!("    warm-up: one pod change reached 10 proxies in {ms:.0} ms (not counted)");
            continue;
        }
        propagation_ms.push(ms);
        println!("    round {round}: one pod change reached 10 proxies in {ms:.0} ms");
    }
    drop(proxies);
    drop(controller);

    // The same scale in a real kube-apiserver, `controller serve --kubernetes` watching it.
    let kubernetes = super::controller_kube::run(scale, &dir, &work.join("kubernetes"))?;

    let t = stats(&translate_ms);
    let p = stats(&propagation_ms);
    let t_median = t["median"].as_f64().unwrap_or(f64::NAN);
    let p_median = p["median"].as_f64().unwrap_or(f64::NAN);
    let mut targets = vec![
        json!({"target": format!("translating {} pods, {} services and {} policies takes under 1 s", scale.pods, scale.services, scale.policies), "ms": t_median, "met": t_median < 1000.0}),
        json!({"target": "one pod change reaches 10 subscribed proxies in under 100 ms (local mode)", "ms": p_median, "met": p_median < 100.0}),
    ];
    if let Some(k) = kubernetes["propagation_ms"]["median"].as_f64() {
        targets.push(json!({"target": "one pod change reaches 10 subscribed proxies in under 100 ms (Kubernetes mode: kube-apiserver → watch → controller → config stream)", "ms": k, "met": k < 100.0}));
    }
    Ok(json!({
        "pods": scale.pods,
        "services": scale.services,
        "policies": scale.policies,
        "proxies": NODES,
        "translate_ms": t,
        "propagation_ms": p,
        "kubernetes": kubernetes,
        "targets": targets,
    }))
}

pub fn markdown(s: &mut String, c: &Value) {
    let _ = writeln!(s, "\n## Controller at scale\n");
    let f = |v: &Value| {
        format!(
            "{:.0} [{:.0}–{:.0}] ms",
            v["median"].as_f64().unwrap_or(f64::NAN),
            v["min"].as_f64().unwrap_or(f64::NAN),
            v["max"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let _ = writeln!(
        s,
        "{} pods over {} nodes and {} namespaces, {} services, {} AuthorizationPolicies, as manifest files.\n\n\
         - `controller translate` end to end (read the YAML, translate, write the config): {}\n\
         - one pod manifest changed → all {} proxies subscribed to `controller serve` (local mode, 10 ms poll; the proxies are `controller subscribe` processes, the config-stream client every ztunnel and waypoint runs; after one warm-up change) have applied the update: {}\n",
        c["pods"],
        NODES,
        NAMESPACES,
        c["services"],
        c["policies"],
        f(&c["translate_ms"]),
        c["proxies"],
        f(&c["propagation_ms"])
    );
    if !c["kubernetes"].is_null() {
        super::controller_kube::markdown(s, &c["kubernetes"]);
    }
    super::targets_markdown(s, &c["targets"]);
}
