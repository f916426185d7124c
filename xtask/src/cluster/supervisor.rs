//! The process that *is* a local cluster while it runs (started detached by `xtask up`): it
//! builds the nodes, runs the controller and a ztunnel per node, plays kubelet for the
//! manifest directory (pods created, given IPs and an echo application, reported to the
//! controller; removed when their manifest goes), starts waypoints for waypoint Gateways, and
//! tears everything down on SIGTERM. Its stdout is the cluster's progress log.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::Result;
use serde_json::{Value, json};
use warren_e2e::{
    controller::LocalMode,
    topology::{Cluster, Pod},
    waypoint::{Echo, Waypoint},
    ztunnel::Ztunnel,
};

use super::plan::{self, PodPlan};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn progress(text: &str) {
    println!("{text}");
}

/// A pod of the cluster with what runs in it. Field order is drop order: processes stop
/// before their network namespace goes.
struct Running {
    echo: Option<Echo>,
    waypoint: Option<Waypoint>,
    pod: Pod,
    node: usize,
    plan: PodPlan,
    manifest: String,
}

pub struct Settings {
    pub dir: PathBuf,
    pub name: String,
    pub nodes: usize,
    pub state_dir: PathBuf,
}

pub fn run(settings: Settings) -> Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let node_names: Vec<String> =
        (1..=settings.nodes).map(|i| format!("{}-node-{i}", settings.name)).collect();
    progress(&format!("creating {} nodes (network namespaces joined by an underlay)", settings.nodes));
    let mut cluster = Cluster::named(&node_names);
    let mut local = LocalMode::new("cl");
    progress("starting the controller (local mode: translation and the mesh CA) on node-1");
    let ca_addr = local.serve(&cluster);
    progress(
        "starting a ztunnel on each node (eBPF capture attached; config and certificates from the controller)",
    );
    let ztunnels: Vec<Ztunnel> = cluster
        .nodes
        .iter()
        .map(|n| {
            Ztunnel::start_with_remote_ca(
                n,
                &local.config,
                ca_addr,
                &local.root_pem(),
                &local.token_file(&n.name),
            )
        })
        .collect();
    let mut kubelet =
        Kubelet { running: BTreeMap::new(), vips: BTreeMap::new(), objects_text: String::new() };
    let mut last_stamp = None;
    let mut announced = false;
    while !STOP.load(Ordering::Relaxed) {
        let stamp = dir_stamp(&settings.dir);
        if stamp != last_stamp {
            kubelet.reconcile(&settings.dir, &mut cluster, &local);
            last_stamp = stamp;
        }
        kubelet.start_waypoints(&local, ca_addr, &cluster);
        write_state(&settings, &cluster, &local, ca_addr, &ztunnels, &kubelet)?;
        if !announced && kubelet.all_started() && settled(&local, &ztunnels, &kubelet) {
            progress("READY");
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    progress("stopping: waypoints, applications, pods, ztunnels (capture detached), controller, nodes");
    drop(kubelet);
    drop(ztunnels);
    drop(local);
    drop(cluster);
    progress("stopped");
    Ok(())
}

/// Whether the mesh has caught up with the pods: the controller reports every pod with its
/// IPs, every ztunnel runs that config, and every enrolled pod is enrolled on its node.
fn settled(local: &LocalMode, ztunnels: &[Ztunnel], kubelet: &Kubelet) -> bool {
    let Some(config) =
        std::fs::read_to_string(&local.config).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return false;
    };
    let workloads = config["workloads"].as_array().cloned().unwrap_or_default();
    let reported = kubelet.running.keys().all(|key| {
        workloads
            .iter()
            .any(|w| w["uid"] == key.as_str() && w["ips"].as_array().is_some_and(|ips| !ips.is_empty()))
    });
    reported
        && ztunnels.iter().all(|z| {
            let loaded = z.config_dump()["workloads"]["workloads"] == config["workloads"];
            let enrolled = workloads
                .iter()
                .filter(|w| w["enrolled"] == true && w["node"] == z.node.as_str())
                .all(|w| w["uid"].as_str().is_some_and(|uid| z.enrolled_pod(uid).is_some()));
            loaded && enrolled
        })
}

struct Kubelet {
    running: BTreeMap<String, Running>,
    vips: BTreeMap<String, IpAddr>,
    objects_text: String,
}

impl Kubelet {
    fn reconcile(&mut self, dir: &Path, cluster: &mut Cluster, local: &LocalMode) {
        let docs = match plan::read_dir(dir) {
            Ok(d) => d,
            Err(e) => {
                progress(&format!("error: {e:#}; keeping the cluster as it is"));
                return;
            }
        };
        let node_count = cluster.nodes.len();
        let plan = plan::plan(&docs, node_count, &mut self.vips);
        for problem in &plan.problems {
            progress(&format!("warning: {problem}"));
        }
        let wanted: HashMap<String, &PodPlan> = plan.pods.iter().map(|p| (p.key(), p)).collect();
        let gone: Vec<String> = self.running.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect();
        for key in gone {
            if let Some(r) = self.running.remove(&key) {
                local.remove(&manifest_file(&r.plan));
                progress(&format!("pod {key} removed (its manifest is gone)"));
            }
        }
        let placed: HashMap<String, usize> = self.running.iter().map(|(k, r)| (k.clone(), r.node)).collect();
        let placement = plan::place(&plan.pods, &placed, node_count);
        for p in &plan.pods {
            let key = p.key();
            let node = placement[&key];
            if let Some(r) = self.running.get_mut(&key) {
                // Labels or ports changed: report the new pod object (it does not move).
                let manifest = pod_text(p, &cluster.nodes[r.node].name, &r.pod);
                if manifest != r.manifest {
                    local.write(&manifest_file(p), &manifest);
                    r.manifest = manifest;
                    r.plan = p.clone();
                }
                continue;
            }
            let pod = cluster.nodes[node].add_pod();
            let manifest = pod_text(p, &cluster.nodes[node].name, &pod);
            local.write(&manifest_file(p), &manifest);
            let echo = p
                .waypoint
                .is_none()
                .then(|| Echo::start_as(&pod, &p.name, &p.namespace, &p.ports, &p.version(), &[]));
            progress(&format!(
                "pod {key} on node-{} at {} ({})",
                node + 1,
                pod.ipv4,
                if p.waypoint.is_some() { "waypoint".to_string() } else { format!("echo {}", p.version()) }
            ));
            self.running.insert(key, Running { echo, waypoint: None, pod, node, plan: p.clone(), manifest });
        }
        let objects: Vec<String> =
            plan.objects.iter().map(|d| serde_json::to_string(&d.value).expect("JSON")).collect();
        let text = objects.join("\n---\n") + "\n";
        if text != self.objects_text {
            local.write("objects.yaml", &text);
            self.objects_text = text;
        }
    }

    /// A waypoint starts once the controller knows its pod: the CA signs only identities of
    /// pods it has seen on the requesting node.
    fn start_waypoints(&mut self, local: &LocalMode, ca_addr: SocketAddr, cluster: &Cluster) {
        let pending: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.plan.waypoint.is_some() && r.waypoint.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        if pending.is_empty() {
            return;
        }
        let Ok(text) = std::fs::read_to_string(&local.config) else { return };
        let Ok(config) = serde_json::from_str::<Value>(&text) else { return };
        for key in pending {
            let r = self.running.get_mut(&key).expect("listed");
            let known = config["workloads"].as_array().into_iter().flatten().any(|w| {
                w["name"] == r.plan.name.as_str()
                    && w["namespace"] == r.plan.namespace.as_str()
                    && !w["ips"].as_array().is_none_or(Vec::is_empty)
            });
            if !known {
                continue;
            }
            let node = &cluster.nodes[r.node].name;
            // Certificates from the controller's CA, config from its stream, as the node's
            // proxy.
            let ca_args = vec![
                "--ca-addr".to_string(),
                ca_addr.to_string(),
                "--ca-root".to_string(),
                local.root_pem().display().to_string(),
                "--ca-token-file".to_string(),
                local.token_file(node).display().to_string(),
                "--controller".to_string(),
                ca_addr.to_string(),
                "--node".to_string(),
                node.clone(),
            ];
            let gateway = r.plan.waypoint.clone().expect("a waypoint pod");
            r.waypoint = Some(Waypoint::start_with_ca_args(
                &r.pod,
                &r.plan.namespace,
                &gateway,
                &local.config,
                &ca_args,
            ));
            progress(&format!("waypoint {}/{gateway} serving in pod {key}", r.plan.namespace));
        }
    }

    fn all_started(&self) -> bool {
        self.running.values().all(|r| r.plan.waypoint.is_none() || r.waypoint.is_some())
    }
}

fn manifest_file(p: &PodPlan) -> String {
    format!("pod-{}-{}.yaml", p.namespace, p.name)
}

fn pod_text(p: &PodPlan, node: &str, pod: &Pod) -> String {
    serde_json::to_string_pretty(&plan::pod_manifest(p, node, &[pod.ipv4, pod.ipv6])).expect("JSON") + "\n"
}

/// Changes to any file of the directory (names, sizes, times).
fn dir_stamp(dir: &Path) -> Option<Vec<(PathBuf, u64, SystemTime)>> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), out)?;
            } else {
                out.push((entry.path(), meta.len(), meta.modified()?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, &mut out).ok()?;
    out.sort();
    Some(out)
}

/// What `up`, `down` and the demo read: every namespace, process and address of the cluster.
fn write_state(
    settings: &Settings,
    cluster: &Cluster,
    local: &LocalMode,
    ca_addr: SocketAddr,
    ztunnels: &[Ztunnel],
    kubelet: &Kubelet,
) -> Result<()> {
    let nodes: Vec<Value> = cluster
        .nodes
        .iter()
        .zip(ztunnels)
        .enumerate()
        .map(|(i, (n, z))| {
            json!({
                "name": format!("node-{}", i + 1),
                "nodeName": n.name,
                "netns": n.ns.name,
                "underlayIp": cluster.underlay_ips[i].to_string(),
                "ztunnelPid": z.pid(),
                "ztunnelLog": z.log_path(),
            })
        })
        .collect();
    let pods: Vec<Value> = kubelet
        .running
        .values()
        .map(|r| {
            json!({
                "namespace": r.plan.namespace,
                "name": r.plan.name,
                "node": format!("node-{}", r.node + 1),
                "netns": r.pod.ns.name,
                "ipv4": r.pod.ipv4.to_string(),
                "ipv6": r.pod.ipv6.to_string(),
                "labels": r.plan.labels,
                "serviceAccount": r.plan.service_account,
                "version": r.plan.version(),
                "ports": r.plan.ports,
                "waypoint": r.plan.waypoint,
                "running": r.echo.as_ref().map(|e| e.pid()).is_some() || r.waypoint.is_some(),
                "waypointLog": r.waypoint.as_ref().map(|w| w.log_path().to_path_buf()),
            })
        })
        .collect();
    let services: BTreeMap<&String, String> = kubelet.vips.iter().map(|(k, v)| (k, v.to_string())).collect();
    let state = json!({
        "name": settings.name,
        "manifests": settings.dir,
        "supervisorPid": std::process::id(),
        "underlayNetns": cluster.underlay_name(),
        "controller": {
            "caAddr": ca_addr.to_string(),
            "config": local.config,
            "generatedManifests": local.manifests(),
            "root": local.root,
        },
        "nodes": nodes,
        "pods": pods,
        "services": services,
    });
    let text = serde_json::to_string_pretty(&state)? + "\n";
    let path = settings.state_dir.join("state.json");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)?;
    }
    Ok(())
}
