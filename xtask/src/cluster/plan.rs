//! What a manifest directory asks of the local cluster: the pods to run (Deployments expanded,
//! bare Pods, one waypoint pod per waypoint Gateway), where each goes, and the Service VIPs —
//! the jobs the scheduler, the kubelet and the API server's IP allocator do in a real
//! cluster. Pure functions over parsed documents, unit-tested without namespaces.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};

pub use warren_core::model::WAYPOINT_CLASSES;
const WAYPOINT_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
const DEFAULT_PORT: u16 = 8080;

/// One document and the file it came from.
#[derive(Clone, Debug)]
pub struct Document {
    pub file: PathBuf,
    pub value: Value,
}

impl Document {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn namespace(&self) -> String {
        self.value["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
    }

    fn name(&self) -> String {
        self.value["metadata"]["name"].as_str().unwrap_or("").to_string()
    }
}

/// Reads every `*.yaml` / `*.yml` / `*.json` file under `dir` (multi-document), sorted by path
/// so the result does not depend on the directory's order.
pub fn read_dir(dir: &Path) -> Result<Vec<Document>> {
    let mut files = Vec::new();
    collect(dir, &mut files).with_context(|| format!("reading {}", dir.display()))?;
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("{}: document {} is not valid YAML", file.display(), i + 1))?;
            if !value.is_null() {
                docs.push(Document { file: file.clone(), value });
            }
        }
    }
    Ok(docs)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

/// A pod the cluster must run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Node index it asks for (`nodeName` or `nodeSelector kubernetes.io/hostname`).
    pub node: Option<usize>,
    /// Container ports the echo application listens on.
    pub ports: Vec<u16>,
    /// The Gateway this pod is the waypoint of.
    pub waypoint: Option<String>,
    /// `Deployment production/payment-v1`, for messages.
    pub source: String,
}

impl PodPlan {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What the echo application reports as its version.
    pub fn version(&self) -> String {
        self.labels.get("version").cloned().unwrap_or_else(|| "v1".into())
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub pods: Vec<PodPlan>,
    /// Everything that is not a workload, handed to the controller as it is (Services with
    /// their VIPs filled in).
    pub objects: Vec<Document>,
    /// What could not be used, naming the object and field.
    pub problems: Vec<String>,
}

/// The node index a node name refers to: `node-2` (or `<cluster>-node-2`) is index 1.
fn node_index(name: &str, node_count: usize) -> Option<usize> {
    let n: usize = name.rsplit("node-").next()?.parse().ok()?;
    (1..=node_count).contains(&n).then(|| n - 1)
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}

fn pod_from_spec(
    namespace: &str,
    name: String,
    metadata: &Value,
    spec: &Value,
    source: &str,
    node_count: usize,
    problems: &mut Vec<String>,
) -> PodPlan {
    let requested =
        spec["nodeName"].as_str().or_else(|| spec["nodeSelector"]["kubernetes.io/hostname"].as_str());
    let node = requested.and_then(|n| {
        let index = node_index(n, node_count);
        if index.is_none() {
            problems.push(format!(
                "{source}: spec.nodeName {n:?} is not a node of this cluster (node-1 … node-{node_count}); scheduled anywhere"
            ));
        }
        index
    });
    let mut ports: Vec<u16> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["containerPort"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .collect();
    if ports.is_empty() {
        ports.push(DEFAULT_PORT);
    }
    PodPlan {
        namespace: namespace.to_string(),
        name,
        labels: labels(&metadata["labels"]),
        service_account: spec["serviceAccountName"].as_str().unwrap_or("default").to_string(),
        node,
        ports,
        waypoint: None,
        source: source.to_string(),
    }
}

/// The plan for `docs` on a cluster of `node_count` nodes. `vips` holds the Service VIPs
/// already given out (kept stable while the cluster runs) and receives new ones.
pub fn plan(docs: &[Document], node_count: usize, vips: &mut BTreeMap<String, IpAddr>) -> Plan {
    let mut plan = Plan::default();
    for doc in docs {
        let (namespace, name) = (doc.namespace(), doc.name());
        let source = format!("{} {namespace}/{name} ({})", doc.kind(), doc.file.display());
        match doc.kind() {
            "Deployment" | "StatefulSet" => {
                let template = &doc.value["spec"]["template"];
                let replicas = doc.value["spec"]["replicas"].as_u64().unwrap_or(1).min(20);
                for i in 0..replicas {
                    plan.pods.push(pod_from_spec(
                        &namespace,
                        format!("{name}-{i}"),
                        &template["metadata"],
                        &template["spec"],
                        &source,
                        node_count,
                        &mut plan.problems,
                    ));
                }
            }
            "Pod" => {
                let pod = pod_from_spec(
                    &namespace,
                    name,
                    &doc.value["metadata"],
                    &doc.value["spec"],
                    &source,
                    node_count,
                    &mut plan.problems,
                );
                plan.pods.push(pod);
            }
            "Gateway" => {
                let class = doc.value["spec"]["gatewayClassName"].as_str().unwrap_or("");
                if WAYPOINT_CLASSES.contains(&class) {
                    plan.pods.push(PodPlan {
                        namespace: namespace.clone(),
                        name: format!("{name}-0"),
                        labels: BTreeMap::from([
                            (WAYPOINT_LABEL.to_string(), name.clone()),
                            // Waypoints speak HBONE themselves; they are never captured.
                            ("istio.io/dataplane-mode".to_string(), "none".to_string()),
                        ]),
                        service_account: name.clone(),
                        node: None,
                        ports: vec![],
                        waypoint: Some(name.clone()),
                        source: source.clone(),
                    });
                }
                plan.objects.push(doc.clone());
            }
            "Service" => {
                let mut doc = doc.clone();
                let key = format!("{namespace}/{name}");
                let given = doc.value["spec"]["clusterIP"].as_str().and_then(|ip| ip.parse::<IpAddr>().ok());
                let vip = match given {
                    Some(ip) => ip,
                    None => match vips.get(&key) {
                        Some(ip) => *ip,
                        None => next_vip(vips_in_use(vips)),
                    },
                };
                vips.insert(key, vip);
                doc.value["spec"]["clusterIP"] = json!(vip.to_string());
                doc.value["spec"]["clusterIPs"] = json!([vip.to_string()]);
                plan.objects.push(doc);
            }
            _ => plan.objects.push(doc.clone()),
        }
    }
    plan
}

fn vips_in_use(vips: &BTreeMap<String, IpAddr>) -> Vec<IpAddr> {
    vips.values().copied().collect()
}

/// The next free address of the local cluster's service range, 10.96.0.10 upwards (inside the
/// cluster's own namespaces only: VIPs are captured in the pods and never leave them).
fn next_vip(used: Vec<IpAddr>) -> IpAddr {
    (10u16..)
        .map(|n| IpAddr::from([10, 96, (n / 256) as u8, (n % 256) as u8]))
        .find(|ip| !used.contains(ip))
        .expect("a free VIP")
}

/// Node indexes for pods not yet placed: the requested node, else the one with the fewest
/// pods. `placed` (pod key → node) is kept: running pods never move.
pub fn place(pods: &[PodPlan], placed: &HashMap<String, usize>, node_count: usize) -> HashMap<String, usize> {
    let mut result: HashMap<String, usize> = HashMap::new();
    let mut load = vec![0usize; node_count];
    for pod in pods {
        if let Some(&n) = placed.get(&pod.key()) {
            result.insert(pod.key(), n);
            load[n] += 1;
        }
    }
    for pod in pods {
        if result.contains_key(&pod.key()) {
            continue;
        }
        let n = pod.node.unwrap_or_else(|| (0..node_count).min_by_key(|&i| (load[i], i)).unwrap_or(0));
        load[n] += 1;
        result.insert(pod.key(), n);
    }
    result
}

/// The Pod object the controller reads for a running pod: what the kubelet would report.
pub fn pod_manifest(pod: &PodPlan, node: &str, ips: &[IpAddr]) -> Value {
    let containers: Vec<Value> = if pod.waypoint.is_some() {
        vec![json!({"name": "waypoint", "image": "warren/waypoint", "ports": [{"containerPort": 15008}]})]
    } else {
        let ports: Vec<Value> = pod.ports.iter().map(|p| json!({"containerPort": p})).collect();
        vec![json!({"name": "app", "image": "warren/echo", "ports": ports})]
    };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
        "spec": {"serviceAccountName": pod.service_account, "nodeName": node, "containers": containers},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<Document> {
        serde_yaml_ng::Deserializer::from_str(yaml)
            .map(|d| Document { file: "m.yaml".into(), value: serde::Deserialize::deserialize(d).unwrap() })
            .collect()
    }

    const EXAMPLE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: payment-v1, namespace: production}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: payment, version: v1}}
    spec:
      serviceAccountName: payment
      nodeName: node-2
      containers: [{name: app, image: x, ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: production, labels: {istio.io/dataplane-mode: none}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: payment, namespace: production}
spec: {ports: [{port: 80, targetPort: 9000}], selector: {app: payment}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: production}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: production}
spec: {gatewayClassName: nginx}
"#;

    #[test]
    fn deployments_expand_and_gateways_get_waypoint_pods() {
        let mut vips = BTreeMap::new();
        let plan = plan(&docs(EXAMPLE), 2, &mut vips);
        let names: Vec<_> = plan.pods.iter().map(PodPlan::key).collect();
        assert_eq!(
            names,
            [
                "production/payment-v1-0",
                "production/payment-v1-1",
                "production/legacy",
                "production/waypoint-0"
            ]
        );
        let p = &plan.pods[0];
        assert_eq!((p.node, p.ports.as_slice(), p.version().as_str()), (Some(1), &[9000u16][..], "v1"));
        assert_eq!(p.service_account, "payment");
        assert_eq!(plan.pods[2].ports, [8080]);
        let w = &plan.pods[3];
        assert_eq!(w.waypoint.as_deref(), Some("waypoint"));
        assert_eq!(w.labels[WAYPOINT_LABEL], "waypoint");
        // The Service got a VIP; the Gateways go to the controller as they are.
        let service = plan.objects.iter().find(|d| d.kind() == "Service").unwrap();
        assert_eq!(service.value["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(plan.objects.iter().filter(|d| d.kind() == "Gateway").count(), 2);
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        // VIPs stay stable when the directory is read again.
        let again = super::plan(&docs(EXAMPLE), 2, &mut vips);
        assert_eq!(
            again.objects.iter().find(|d| d.kind() == "Service").unwrap().value["spec"]["clusterIP"],
            "10.96.0.10"
        );
    }

    #[test]
    fn placement_is_sticky_and_spreads_new_pods() {
        let mut vips = BTreeMap::new();
        let plan = plan(&docs(EXAMPLE), 2, &mut vips);
        let first = place(&plan.pods, &HashMap::new(), 2);
        assert_eq!(first["production/payment-v1-0"], 1);
        assert_eq!(first["production/payment-v1-1"], 1);
        // Unpinned pods go where there are fewer.
        assert_eq!(first["production/legacy"], 0);
        assert_eq!(first["production/waypoint-0"], 0);
        let mut moved = first.clone();
        moved.insert("production/legacy".into(), 1);
        assert_eq!(place(&plan.pods, &moved, 2)["production/legacy"], 1, "a running pod never moves");
    }

    #[test]
    fn a_node_that_does_not_exist_is_reported() {
        let yaml = "kind: Pod\nmetadata: {name: p}\nspec: {nodeName: node-7}\n";
        let plan = plan(&docs(yaml), 2, &mut BTreeMap::new());
        assert_eq!(plan.pods[0].node, None);
        assert!(plan.problems[0].contains("node-7"), "{:?}", plan.problems);
    }

    #[test]
    fn pod_manifests_carry_what_the_controller_reads() {
        let mut vips = BTreeMap::new();
        let plan = plan(&docs(EXAMPLE), 2, &mut vips);
        let m = pod_manifest(&plan.pods[0], "demo-node-2", &["10.1.0.2".parse().unwrap()]);
        assert_eq!(m["spec"]["nodeName"], "demo-node-2");
        assert_eq!(m["status"]["podIPs"][0]["ip"], "10.1.0.2");
        assert_eq!(m["metadata"]["labels"]["version"], "v1");
    }
}
