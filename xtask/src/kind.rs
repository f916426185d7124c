//! `cargo xtask kind`: Warren on a real Kubernetes cluster in Docker (kind), for users with a
//! Docker engine. It creates a cluster (one control plane, two workers), builds and loads the
//! images (`xtask image`), creates a mesh root, installs the Helm chart with a
//! waypoint for `production`, applies `deploy/examples` (the demo's namespace, services,
//! policies), waits for everything to be ready and runs a load test from checkout-service to
//! payment-service through the mesh. The cluster stays up; `kind delete cluster --name NAME`
//! removes it.
//!
//! What this machine can check without Docker is checked by the unit tests below: the kind
//! config, the chart values, the rewritten examples and the exact command list.

use std::{fs, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{image, setup::workspace_root, setup_helm};

pub const DEFAULT_NAME: &str = "warren";

/// The waypoint deploy/examples declares (30-waypoint.yaml) and the namespace it serves.
const WAYPOINT: (&str, &str) = ("waypoint", "production");
/// A free address in kind's default Service range (10.96.0.0/16; kube-dns has 10.96.0.10) for
/// the CA, which the waypoint needs as an IP.
const CA_CLUSTER_IP: &str = "10.96.200.12";

/// One command of the plan: what it is for, and the argv.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub what: String,
    pub argv: Vec<String>,
}

fn step(what: &str, argv: &[&str]) -> Step {
    Step { what: what.into(), argv: argv.iter().map(|s| s.to_string()).collect() }
}

/// The kind nodes: `<name>-control-plane`, `<name>-worker`, `<name>-worker2` (kind names them
/// after the cluster). The examples' `nodeName: node-1` / `node-2` map to the two workers.
pub fn node_names(name: &str) -> [String; 3] {
    [format!("{name}-control-plane"), format!("{name}-worker"), format!("{name}-worker2")]
}

pub fn kind_config() -> String {
    "# Written by `cargo xtask kind`: one control plane and two workers. kind's default CNI\n\
     # (kindnet) is fine: Warren needs only cgroup v2 and a kernel >= 5.15 on the host.\n\
     kind: Cluster\n\
     apiVersion: kind.x-k8s.io/v1alpha4\n\
     nodes:\n  - role: control-plane\n  - role: worker\n  - role: worker\n"
        .to_string()
}

/// The chart values for this cluster: the root and the examples' waypoint. (Proxies
/// authenticate with their pods' ServiceAccount tokens: there is nothing to hand out per node.)
pub fn values(root_cert: &str, root_key: &str) -> String {
    let doc = serde_json::json!({
        "ca": {
            "rootCert": root_cert,
            "rootKey": root_key,
            "clusterIP": CA_CLUSTER_IP,
        },
        "controller": {"image": {"pullPolicy": "Never"}},
        "ztunnel": {"image": {"pullPolicy": "Never"}},
        "waypoint": {"image": {"pullPolicy": "Never"}},
        "waypoints": [{"name": WAYPOINT.0, "namespace": WAYPOINT.1, "replicas": 1, "createGateway": false}],
    });
    format!("# Written by `cargo xtask kind`.\n{}", serde_yaml_ng::to_string(&doc).expect("YAML"))
}

/// deploy/examples for kind: `nodeName: node-N` becomes the N-th worker, and Warren's images
/// (loaded, never pulled) get `imagePullPolicy: Never`.
pub fn rewrite_example(text: &str, name: &str) -> Result<String> {
    let [_, worker1, worker2] = node_names(name);
    let mut out = String::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let mut value: serde_json::Value = serde::Deserialize::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let spec = if value["kind"] == "Pod" {
            Some(&mut value["spec"])
        } else {
            value.pointer_mut("/spec/template/spec")
        };
        if let Some(spec) = spec {
            match spec["nodeName"].as_str() {
                Some("node-1") => spec["nodeName"] = worker1.clone().into(),
                Some("node-2") => spec["nodeName"] = worker2.clone().into(),
                Some(other) => {
                    bail!("example pod placed on unknown node {other:?} (kind has node-1 and node-2)")
                }
                None => {}
            }
            for container in spec["containers"].as_array_mut().into_iter().flatten() {
                if container["image"].as_str().is_some_and(|i| i.starts_with("warren/")) {
                    let image = container["image"].as_str().unwrap_or_default();
                    if !image.contains(':') {
                        container["image"] = format!("{image}:{}", image::tag()).into();
                    }
                    container["imagePullPolicy"] = "Never".into();
                }
            }
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&value)?);
    }
    Ok(out)
}

/// Everything `xtask kind` runs, in order (after the images are built).
pub fn plan(name: &str, state: &Path, helm: &str) -> Vec<Step> {
    let s = |p: &str| state.join(p).display().to_string();
    let mut steps = vec![step(
        "create the cluster",
        &["kind", "create", "cluster", "--name", name, "--config", &s("kind-config.yaml"), "--wait", "180s"],
    )];
    for img in image::IMAGES {
        let archive = image::images_dir().join(format!("{}.tar", img.name)).display().to_string();
        steps.push(step(
            &format!("load image {}", img.name),
            &["kind", "load", "image-archive", &archive, "--name", name],
        ));
    }
    let context = format!("kind-{name}");
    let kubectl = |what: &str, args: &[&str]| {
        let mut argv = vec!["kubectl", "--context", &context];
        argv.extend_from_slice(args);
        step(what, &argv)
    };
    steps.push(kubectl("the demo's namespace (ambient)", &["apply", "-f", &s("examples/00-namespace.yaml")]));
    steps.push(step(
        "install the chart",
        &[
            helm,
            "upgrade",
            "--install",
            "warren",
            &workspace_root().join("deploy/chart/warren").display().to_string(),
            "--kube-context",
            &context,
            "--namespace",
            "warren-system",
            "--create-namespace",
            "--values",
            &s("values.yaml"),
            "--wait",
            "--timeout",
            "5m",
        ],
    ));
    steps.push(kubectl("the examples", &["apply", "-f", &s("examples")]));
    steps.push(kubectl(
        "wait for the example pods",
        &["wait", "--namespace", "production", "--for=condition=Ready", "pods", "--all", "--timeout=300s"],
    ));
    steps.push(kubectl(
        "wait for the waypoint",
        &["rollout", "status", "--namespace", "production", "deployment/waypoint", "--timeout=300s"],
    ));
    steps
}

/// The load test: checkout-service POSTs charges to payment-service's VIP through its ztunnel,
/// the waypoint (95/5 split, policy) and payment's ztunnel.
pub fn load_test(name: &str, vip: &str) -> Step {
    let context = format!("kind-{name}");
    let url = format!("http://{vip}/api/v1/charge");
    step(
        "load test: checkout-service -> payment-service (1000 POSTs through the mesh)",
        &[
            "kubectl",
            "--context",
            &context,
            "exec",
            "--namespace",
            "production",
            "deployment/checkout-service",
            "--",
            "warren-load",
            &url,
            "-X",
            "POST",
            "-n",
            "1000",
            "-c",
            "4",
        ],
    )
}

/// Stops early, naming what is missing: Docker's engine, kind, kubectl.
fn preflight() -> Result<()> {
    let docker = Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output();
    match docker {
        Err(_) => bail!("`xtask kind` needs Docker: the `docker` command is not installed"),
        Ok(o) if !o.status.success() => bail!(
            "`xtask kind` needs a running Docker engine, and `docker info` failed: {}\n\
             (without Docker, `cargo xtask image` still builds the images: load them into any \
             cluster with `kind load image-archive`, `ctr images import` or a registry push)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Ok(_) => {}
    }
    for (tool, arg) in [("kind", "version"), ("kubectl", "version")] {
        let found =
            Command::new(tool).arg(arg).arg(if tool == "kubectl" { "--client" } else { "-q" }).output();
        if !found.is_ok_and(|o| o.status.success()) {
            bail!("`xtask kind` needs `{tool}` on PATH");
        }
    }
    Ok(())
}

fn run_step(s: &Step) -> Result<String> {
    println!("==> {}\n    $ {}", s.what, s.argv.join(" "));
    let out = Command::new(&s.argv[0])
        .args(&s.argv[1..])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", s.argv[0]))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    if !out.status.success() {
        bail!("{} failed ({})", s.what, out.status);
    }
    Ok(stdout)
}

pub fn run(name: &str, no_build: bool) -> Result<()> {
    preflight()?;
    image::run(no_build)?;
    let state = workspace_root().join("target/kind").join(name);
    fs::create_dir_all(state.join("examples"))?;
    fs::write(state.join("kind-config.yaml"), kind_config())?;
    let ca = warren_core::ca::Ca::generate("cluster.local")?;
    fs::write(state.join("values.yaml"), values(ca.root_pem(), ca.key_pem()))?;
    for entry in fs::read_dir(workspace_root().join("deploy/examples"))? {
        let path = entry?.path();
        let text = fs::read_to_string(&path)?;
        let file = path.file_name().expect("a file").to_owned();
        fs::write(state.join("examples").join(file), rewrite_example(&text, name)?)?;
    }
    let helm = helm_command();
    for s in plan(name, &state, &helm) {
        run_step(&s)?;
    }
    let vip = run_step(&step(
        "payment-service's VIP",
        &[
            "kubectl",
            "--context",
            &format!("kind-{name}"),
            "get",
            "service",
            "--namespace",
            "production",
            "payment-service",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    ))?;
    run_step(&load_test(name, vip.trim()))?;
    println!(
        "\ncluster {name:?} is up (kubectl --context kind-{name}); Warren in namespace warren-system.\n\
         Remove it with: kind delete cluster --name {name}"
    );
    Ok(())
}

fn helm_command() -> String {
    let cached = setup_helm::helm_binary();
    if cached.is_file() { cached.display().to_string() } else { "helm".into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_config_has_one_control_plane_and_two_workers() {
        let config: serde_json::Value = serde_yaml_ng::from_str(&kind_config()).unwrap();
        assert_eq!(config["kind"], "Cluster");
        assert_eq!(config["apiVersion"], "kind.x-k8s.io/v1alpha4");
        let roles: Vec<&str> =
            config["nodes"].as_array().unwrap().iter().map(|n| n["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["control-plane", "worker", "worker"]);
    }

    #[test]
    fn values_pass_the_charts_schema_shape() {
        let text = values("CERT", "KEY");
        let v: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(v["ca"]["rootCert"], "CERT");
        assert_eq!(v["waypoints"][0]["namespace"], "production");
        // Every key is one the chart's values.yaml has (the schema refuses unknown keys).
        let chart: serde_json::Value = serde_yaml_ng::from_str(
            &fs::read_to_string(workspace_root().join("deploy/chart/warren/values.yaml")).unwrap(),
        )
        .unwrap();
        fn check(ours: &serde_json::Value, chart: &serde_json::Value, path: &str) {
            if let (Some(ours), Some(theirs)) = (ours.as_object(), chart.as_object()) {
                for (k, v) in ours {
                    assert!(theirs.contains_key(k), "{path}.{k} is not a chart value");
                    check(v, &theirs[k], format!("{path}.{k}").trim_start_matches('.'));
                }
            }
        }
        check(&v, &chart, "");
    }

    #[test]
    fn examples_are_placed_on_the_kind_workers_and_never_pulled() {
        let text = fs::read_to_string(workspace_root().join("deploy/examples/10-payment.yaml")).unwrap();
        let out = rewrite_example(&text, "w").unwrap();
        assert!(out.contains("nodeName: w-worker2"), "{out}");
        assert!(!out.contains("node-2"));
        assert!(out.contains(&format!("image: warren/echo:{}", image::tag())));
        assert!(out.contains("imagePullPolicy: Never"));
        assert!(rewrite_example("kind: Pod\nspec: {nodeName: node-9, containers: []}\n", "w").is_err());
    }

    #[test]
    fn the_plan_creates_loads_installs_applies_and_waits_in_order() {
        let state = Path::new("/tmp/kstate");
        let steps = plan("w", state, "helm");
        let heads: Vec<String> = steps.iter().map(|s| s.argv[..3.min(s.argv.len())].join(" ")).collect();
        assert_eq!(heads[0], "kind create cluster");
        assert_eq!(
            steps[0].argv[steps[0].argv.len() - 3..],
            ["/tmp/kstate/kind-config.yaml", "--wait", "180s"]
        );
        let loads: Vec<&Step> = steps.iter().filter(|s| s.argv.get(1).is_some_and(|a| a == "load")).collect();
        assert_eq!(loads.len(), image::IMAGES.len());
        assert!(loads.iter().all(|s| s.argv[3].ends_with(".tar") && s.argv[5] == "w"));
        let position = |what: &str| steps.iter().position(|s| s.what == what).unwrap();
        assert!(position("the demo's namespace (ambient)") < position("install the chart"));
        assert!(position("install the chart") < position("the examples"));
        let install = &steps[position("install the chart")].argv;
        for needed in ["--wait", "--create-namespace", "warren-system", "/tmp/kstate/values.yaml", "kind-w"] {
            assert!(install.iter().any(|a| a == needed), "{needed} missing from {install:?}");
        }
        let load = load_test("w", "10.96.0.20");
        assert_eq!(
            load.argv[load.argv.len() - 7..],
            ["http://10.96.0.20/api/v1/charge", "-X", "POST", "-n", "1000", "-c", "4"]
        );
    }

    #[test]
    fn fails_early_and_clearly_without_a_docker_engine() {
        let engine = Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
        if engine {
            eprintln!("SKIPPED: a Docker engine is running here");
            return;
        }
        let error = preflight().unwrap_err().to_string();
        assert!(error.contains("Docker"), "{error}");
    }
}
