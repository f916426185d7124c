//! The controller at scale in Kubernetes mode, the production path: the same 10,000 pods, 2,000
//! services and 500 AuthorizationPolicies loaded into a real kube-apiserver (the one the e2e
//! tests use, tests/src/kube.rs), `controller serve --kubernetes` watching it under the RBAC of
//! deploy/rbac/controller.yaml, and 10 `controller subscribe` proxies authenticating as their
//! node's ztunnel with pod-bound ServiceAccount tokens (TokenReview). Measured: how long the
//! controller takes from start to its first complete config, and how long one pod change made
//! through the API takes to reach all 10 proxies. Skipped, saying so, when kube-apiserver is not
//! installed (`./x setup` builds it).

use std::{
    io::{BufRead, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use warren_e2e::{kube::ApiServer, ztunnel::binary};

use super::{
    controller::{KillOnDrop, NODES, Proxies, Scale, free_port},
    stats,
};

/// Requests the loader keeps in flight against the API server.
const IN_FLIGHT: usize = 24;

/// The lines the controller wrote to stderr, each with when it arrived.
type Log = Arc<Mutex<Vec<(Instant, String)>>>;

/// controller.log: the controller's lines and the benchmark's own marks, each prefixed with the
/// milliseconds since the controller started, so a slow round can be read off it.
type LogFile = Arc<Mutex<std::fs::File>>;

fn mark(file: &LogFile, start: Instant, at: Instant, line: &str) {
    let ms = at.saturating_duration_since(start).as_secs_f64() * 1000.0;
    let _ = writeln!(file.lock().expect("poisoned"), "[+{ms:.1} ms] {line}");
}

/// `manifests`: the directory `controller::generate` wrote (the local-mode part's), whose
/// objects are loaded as they are, except that the API server allocates the ClusterIPs (it gives
/// 10.96.0.1, which svc0 asks for, to `default/kubernetes`).
pub fn run(scale: &Scale, manifests: &Path, work: &Path) -> Result<Value> {
    let found = warren_e2e::kube::apiserver_or_skip("the controller benchmark's Kubernetes mode");
    // ($WARREN_KUBE_APISERVER is taken as given: it may name no file.)
    let Some(apiserver) = found.filter(|p| p.is_file()) else {
        println!("    Kubernetes mode: SKIPPED, kube-apiserver is not installed (`./x setup` builds it)");
        return Ok(json!({"skipped": "kube-apiserver is not installed (`./x setup` builds it)"}));
    };
    if which("etcd").is_none() {
        println!("    Kubernetes mode: SKIPPED, etcd is not installed (`./x setup` installs it)");
        return Ok(json!({"skipped": "etcd is not installed (`./x setup` installs it)"}));
    }
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    println!("    Kubernetes mode: starting etcd and kube-apiserver");
    let server = ApiServer::start(&apiserver);
    server.apply_file("deploy/crds/istio.yaml");
    server.apply_file("deploy/crds/gateway-api.yaml");
    server.apply_file("deploy/rbac/controller.yaml");
    server.wait_served("security.istio.io/v1", "AuthorizationPolicy");

    // The objects: the local-mode manifests, the pod that changes, and a ztunnel pod per node.
    let mut objects = Vec::new();
    for file in ["namespaces.yaml", "services.yaml", "policies.yaml", "pods.yaml"] {
        let text = std::fs::read_to_string(manifests.join(file))?;
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut value: Value = serde::Deserialize::deserialize(document).context(file)?;
            if value.is_null() {
                continue;
            }
            if value["kind"] == "Service"
                && let Some(spec) = value["spec"].as_object_mut()
            {
                spec.remove("clusterIP");
            }
            objects.push(value);
        }
    }
    objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "ztunnel", "namespace": "warren-system"}}));
    for n in 0..NODES {
        objects.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("ztunnel-node-{n}"), "namespace": "warren-system"},
            "spec": {"nodeName": format!("node-{n}"), "serviceAccountName": "ztunnel",
                     "containers": [{"name": "ztunnel", "image": "ztunnel"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": format!("10.251.0.{}", n + 1)}]}}));
    }
    objects.push(changing_pod());
    let pods = objects.iter().filter(|o| o["kind"] == "Pod").count();
    // Every pod is a workload (the ztunnels' too, not enrolled: warren-system is not ambient).
    let workloads = pods;
    let total = objects.len();
    println!(
        "    loading {total} objects ({pods} pods, each created then given its status as a kubelet \
         would) into kube-apiserver, {IN_FLIGHT} requests in flight"
    );
    let started = Instant::now();
    let mut shown = 0;
    server
        .create_all(objects, IN_FLIGHT, |done| {
            if done >= shown + 2000 || done == total {
                shown = done;
                println!("      {done}/{total} objects ({:.0} s)", started.elapsed().as_secs_f64());
            }
        })
        .context("loading the objects into kube-apiserver")?;
    let load_s = started.elapsed().as_secs_f64();
    println!("    loaded in {load_s:.1} s (the API server's and etcd's time, not Warren's)");

    // Credentials: the controller's ServiceAccount (the RBAC of deploy/rbac), and each node's
    // ztunnel's token bound to its pod, as a kubelet would project it.
    let controller_token = server.service_account_token("warren-system", "warren-controller");
    let kubeconfig = server.kubeconfig(&controller_token, "controller.kubeconfig");
    let token_file = |n: usize| work.join(format!("ztunnel-token-{n}"));
    for n in 0..NODES {
        let token =
            server.bound_service_account_token("warren-system", "ztunnel", &format!("ztunnel-node-{n}"));
        std::fs::write(token_file(n), token)?;
    }

    let (listen, admin) = (free_port()?, free_port()?);
    let served = work.join("served.json");
    let log: Log = Default::default();
    let start = Instant::now();
    let mut controller = KillOnDrop(
        Command::new(binary("controller"))
            .args(["serve", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--out")
            .arg(&served)
            .args(["--listen", &format!("127.0.0.1:{listen}"), "--admin", &format!("127.0.0.1:{admin}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting controller serve --kubernetes")?,
    );
    let log_file: LogFile = Arc::new(Mutex::new(std::fs::File::create(work.join("controller.log"))?));
    timestamp_lines(controller.0.stderr.take().expect("piped"), start, log.clone(), log_file.clone());
    // Its first complete config: every pod listed, translated, published and written.
    let complete = format!("({workloads} workloads");
    let first_config = wait_log(&mut controller, &log, start, Duration::from_secs(180), |l| {
        l.contains("wrote ") && l.contains(&complete)
    })
    .with_context(|| format!("the controller wrote no config with all {workloads} workloads"))?;
    let first_config_ms = first_config.duration_since(start).as_secs_f64() * 1000.0;
    println!("    controller serve --kubernetes: first complete config {first_config_ms:.0} ms after start");

    // The root the controller keeps in its Secret, which the proxies check it against.
    let root = work.join("root-cert.pem");
    let pem = server
        .secret_value("warren-system", "warren-ca-root", "root-cert.pem")
        .context("Secret warren-system/warren-ca-root holds no root-cert.pem")?;
    std::fs::write(&root, pem)?;
    let subscribed = Instant::now();
    let proxies = Proxies::start(listen, &root, token_file, work)?;
    proxies.wait_complete(workloads, Duration::from_secs(120))?;
    let subscribe_ms = subscribed.elapsed().as_secs_f64() * 1000.0;
    println!(
        "    {NODES} proxies subscribed (TokenReview of their pod-bound tokens) and got the whole config \
         in {subscribe_ms:.0} ms"
    );

    // Rounds: a label of pod ns0/changing (labels are part of its workload, so the config
    // changes) patched through the API, timed from just before the PATCH to the last proxy.
    let mut propagation_ms = Vec::new();
    let mut answered_ms = Vec::new();
    let mut controller_wrote_ms = Vec::new();
    for round in 0..=scale.rounds {
        let before = proxies.versions();
        let seen = log.lock().expect("poisoned").len();
        let patched = Instant::now();
        server
            .patch_pod(
                "ns0",
                "changing",
                json!({"metadata": {"labels": {"round": format!("r{}", round + 1)}}}),
            )
            .with_context(|| format!("round {round}: patching pod ns0/changing"))?;
        let answered_at = Instant::now();
        let answered = answered_at.duration_since(patched).as_secs_f64() * 1000.0;
        // The benchmark's own marks in the controller's log, to read a slow round off it.
        mark(&log_file, start, patched, &format!("BENCH: round {round}: PATCH of pod ns0/changing sent"));
        mark(&log_file, start, answered_at, &format!("BENCH: round {round}: PATCH answered"));
        let last = proxies
            .wait_new_version(&before, patched + Duration::from_secs(30))
            .with_context(|| format!("Kubernetes mode, round {round}"))?;
        let ms = last.duration_since(patched).as_secs_f64() * 1000.0;
        mark(&log_file, start, last, &format!("BENCH: round {round}: the last proxy applied it"));
        // When the controller logged writing its file (after publishing to the proxies).
        let wrote = wait_log_since(&log, seen, patched + Duration::from_secs(10), |l| l.contains("wrote "))
            .map(|t| t.saturating_duration_since(patched).as_secs_f64() * 1000.0);
        let detail = format!(
            "(PATCH answered in {answered:.0} ms; controller logged its file written at {})",
            wrote.map_or("—".into(), |w| format!("{w:.0} ms"))
        );
        if round == 0 {
            println!("    warm-up: one pod change reached 10 proxies in {ms:.0} ms {detail} (not counted)");
            continue;
        }
        println!("    round {round}: one pod change reached 10 proxies in {ms:.0} ms {detail}");
        propagation_ms.push(ms);
        answered_ms.push(answered);
        if let Some(w) = wrote {
            controller_wrote_ms.push(w);
        }
    }
    // The change the proxies applied is the one made: the last round's label is in the config.
    let config: Value = serde_json::from_slice(&std::fs::read(&served)?)?;
    let label = format!("r{}", scale.rounds + 1);
    let applied = config["workloads"].as_array().into_iter().flatten().any(|w| {
        w["namespace"] == "ns0" && w["name"] == "changing" && w["labels"]["round"] == label.as_str()
    });
    if !applied {
        bail!("the controller's config does not show pod ns0/changing with label round={label}");
    }
    drop(proxies);
    drop(controller);
    Ok(json!({
        "pods": pods,
        "workloads": workloads,
        "objects": total,
        "load_s": load_s,
        "in_flight": IN_FLIGHT,
        "first_config_ms": first_config_ms,
        "subscribe_ms": subscribe_ms,
        "propagation_ms": stats(&propagation_ms),
        "patch_answered_ms": stats(&answered_ms),
        "controller_wrote_ms": stats(&controller_wrote_ms),
    }))
}

/// The pod whose label the rounds change (as local mode's changing.yaml).
fn changing_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "changing", "namespace": "ns0", "labels": {"app": "svc0", "round": "r0"}},
        "spec": {"nodeName": "node-0", "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "10.250.0.1"}]}})
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Reads `from` line by line on a thread, noting when each line arrives in `log` and writing it
/// to `file` with its time.
fn timestamp_lines(from: impl std::io::Read + Send + 'static, start: Instant, log: Log, file: LogFile) {
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            mark(&file, start, at, &line);
            log.lock().expect("poisoned").push((at, line));
        }
    });
}

/// Waits for a line of `log` matching `wanted`; fails with the log's tail if the controller
/// exits or `timeout` passes first.
fn wait_log(
    controller: &mut KillOnDrop,
    log: &Log,
    start: Instant,
    timeout: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<Instant> {
    loop {
        if let Some((at, _)) = log.lock().expect("poisoned").iter().find(|(_, l)| wanted(l)) {
            return Ok(*at);
        }
        let tail = || {
            let lines = log.lock().expect("poisoned");
            let from = lines.len().saturating_sub(20);
            lines[from..].iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
        };
        if let Some(status) = controller.0.try_wait()? {
            bail!("the controller exited ({status}); its log ends:\n{}", tail());
        }
        if start.elapsed() > timeout {
            bail!("not within {timeout:?}; the controller's log ends:\n{}", tail());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// When the first line of `log` after the first `seen` matching `wanted` arrived, if it does
/// before `deadline`.
fn wait_log_since(
    log: &Log,
    seen: usize,
    deadline: Instant,
    wanted: impl Fn(&str) -> bool,
) -> Option<Instant> {
    loop {
        if let Some((at, _)) = log.lock().expect("poisoned")[seen..].iter().find(|(_, l)| wanted(l)) {
            return Some(*at);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn markdown(s: &mut String, k: &Value) {
    use std::fmt::Write as _;
    if let Some(reason) = k["skipped"].as_str() {
        let _ = writeln!(s, "Kubernetes mode: not measured, {reason}.\n");
        return;
    }
    let f = |v: &Value| format!("{} ms", super::spread(v, 0));
    let _ = writeln!(
        s,
        "Kubernetes mode (the production path): the same objects in a real kube-apiserver {} with etcd \
         on this machine, plus the changing pod and a ztunnel pod per node; `controller serve \
         --kubernetes` watching it under the RBAC of deploy/rbac/controller.yaml; the {NODES} proxies \
         authenticating as their node's ztunnel with pod-bound ServiceAccount tokens (TokenReview).\n\n\
         - loading the {} objects ({} pods, each created and then given its status, {} requests in \
         flight): {:.0} s — the API server's and etcd's time, not Warren's\n\
         - `controller serve --kubernetes` from start to its first complete config ({} workloads: \
         listing every kind, translating, publishing, writing the file): {:.0} ms\n\
         - the {NODES} proxies subscribing at once (TokenReview) until all hold the whole config: {:.0} ms\n\
         - one pod's label patched through the API → all {NODES} proxies have applied the update \
         (after one warm-up change): {} — the API server answered the PATCH in {}, and the \
         controller logged its config file written (a low-priority thread writes it after the \
         config stream has the update) at {}\n",
        warren_e2e::kube::KUBE_APISERVER_VERSION,
        super::thousands(&k["objects"]),
        super::thousands(&k["pods"]),
        k["in_flight"],
        k["load_s"].as_f64().unwrap_or(f64::NAN),
        super::thousands(&k["workloads"]),
        k["first_config_ms"].as_f64().unwrap_or(f64::NAN),
        k["subscribe_ms"].as_f64().unwrap_or(f64::NAN),
        f(&k["propagation_ms"]),
        f(&k["patch_answered_ms"]),
        f(&k["controller_wrote_ms"]),
    );
}
