//! deploy/chart/warren against a real kube-apiserver: what `helm template` renders is accepted by
//! the API server (`kubectl apply --dry-run=server`: schema, defaulting, admission — the built-in
//! PriorityClasses, RBAC objects, policy/v1beta1 on this 1.20 server) after the chart's own CRDs
//! are created for real. `helm lint`, the schema and the rendered objects' contents are checked
//! by the unit tests of xtask/src/setup_helm.rs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use warren_e2e::kube::{ApiServer, KUBE_APISERVER_VERSION, apiserver_or_skip};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf()
}

/// The helm `./x setup` installs (xtask/src/setup_helm.rs), or None after saying why.
fn helm_or_skip(test: &str) -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    let helm = cargo_home.join("warren/helm-4.1.4/bin/helm");
    if helm.is_file() {
        return Some(helm);
    }
    eprintln!("SKIPPED {test}: helm is not installed; run ./x setup (installs it into $CARGO_HOME/warren/)");
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn ds_default(items: &[serde_json::Value]) -> String {
    let ds = items.iter().find(|i| i["kind"] == "DaemonSet").expect("a DaemonSet");
    assert_eq!(ds["spec"]["revisionHistoryLimit"], 10, "server defaults are filled in");
    ds["spec"]["updateStrategy"]["type"].as_str().unwrap_or_default().to_string()
}

/// Splits rendered YAML into (CRDs, everything else).
fn split_crds(rendered: &str) -> (String, String) {
    let (mut crds, mut rest) = (String::new(), String::new());
    for doc in rendered.split("\n---\n") {
        let target = if doc.contains("\nkind: CustomResourceDefinition\n") { &mut crds } else { &mut rest };
        target.push_str("---\n");
        target.push_str(doc);
        target.push('\n');
    }
    (crds, rest)
}

#[test]
fn the_rendered_chart_passes_server_side_dry_run() {
    let test = "the_rendered_chart_passes_server_side_dry_run";
    let (Some(apiserver), Some(helm)) = (apiserver_or_skip(test), helm_or_skip(test)) else { return };
    let server = ApiServer::start(&apiserver);
    let dir = server.root.join("chart");
    fs::create_dir_all(&dir).unwrap();
    let ca = warren_core::ca::Ca::generate("cluster.local").unwrap();
    fs::write(dir.join("root-cert.pem"), ca.root_pem()).unwrap();
    fs::write(dir.join("root-key.pem"), ca.key_pem()).unwrap();

    let render = |extra: &[&str]| -> String {
        let mut cmd = Command::new(&helm);
        cmd.args(["template", "warren"])
            .arg(workspace().join("deploy/chart/warren"))
            .args(["--namespace", "warren-system", "--kube-version", KUBE_APISERVER_VERSION])
            .arg("--set-file")
            .arg(format!("ca.rootCert={}", dir.join("root-cert.pem").display()))
            .arg("--set-file")
            .arg(format!("ca.rootKey={}", dir.join("root-key.pem").display()))
            .args(extra);
        run(&mut cmd)
    };
    // Everything the chart can render: a waypoint with its Gateway, two controller replicas (a
    // real PodDisruptionBudget). The test API server runs without --allow-privileged (every
    // real distribution sets it: kubeadm, kind, the clouds). The ztunnel is not privileged by
    // default; only the init container that mounts bpffs on nodes without it is, so the full
    // check leaves that out, and the default must be refused for that container alone.
    let waypoint = [
        "--set",
        "ca.clusterIP=10.96.200.12",
        "--set",
        "waypoints[0].name=waypoint,waypoints[0].namespace=production,waypoints[0].createGateway=true,\
         waypoints[0].allowedRoutes.namespaces.from=All",
        "--set",
        "controller.replicas=2",
    ];
    let mut unprivileged = waypoint.to_vec();
    unprivileged.extend(["--set", "ztunnel.bpffsInit.enabled=false"]);
    let full = render(&unprivileged);
    let default = render(&waypoint);

    // No node bootstrap tokens any more (every proxy has its own pod's ServiceAccount token),
    // and the ztunnel container is not privileged unless asked.
    let objects: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&default)
        .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect();
    assert!(!default.contains("warren-node-tokens"), "the chart still renders the node tokens");
    let gateway = objects.iter().find(|o| o["kind"] == "Gateway").expect("the waypoint's Gateway");
    assert_eq!(
        gateway["spec"]["listeners"][0]["allowedRoutes"],
        serde_json::json!({"namespaces": {"from": "All"}}),
        "{gateway}"
    );
    let secrets: Vec<&str> = objects
        .iter()
        .filter(|o| o["kind"] == "Secret")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(secrets, ["warren-ca-root"], "the only Secret is the root's (the controller's)");
    let daemonset = objects.iter().find(|o| o["kind"] == "DaemonSet").expect("the ztunnel DaemonSet");
    let ztunnel = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(ztunnel["name"], "ztunnel");
    assert_eq!(ztunnel["securityContext"]["privileged"], false, "{ztunnel}");
    assert_eq!(ztunnel["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // New before old on each node: a surged pod must be schedulable beside the old one (no
    // container ports, which hostNetwork turns into host ports), and its readiness must be its
    // own process's (not :15021, shared with the old ztunnel while both run).
    // DaemonSets surge from Kubernetes 1.22; the test API server is older: old then new there.
    assert_eq!(
        daemonset["spec"]["updateStrategy"]["rollingUpdate"],
        serde_json::json!({"maxUnavailable": 1})
    );
    let surge = render(&["--kube-version", "1.30.0"]);
    assert!(surge.contains("maxSurge: 1\n      maxUnavailable: 0"), "{surge}");
    assert!(ztunnel.get("ports").is_none(), "ztunnel declares ports: {}", ztunnel["ports"]);
    assert_eq!(
        ztunnel["readinessProbe"]["exec"]["command"],
        serde_json::json!(["ztunnel", "ready", "--socket", "/run/ztunnel/ready.sock"])
    );
    // `--reuse-values` from an earlier release carries its ztunnel.maxUnavailable: accepted,
    // and the strategy stays new-before-old.
    let reused = render(&["--kube-version", "1.30.0", "--set", "ztunnel.maxUnavailable=1"]);
    assert!(reused.contains("maxSurge: 1\n      maxUnavailable: 0"), "{reused}");
    let env = ztunnel["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "WARREN_READINESS_SOCKET" && e["value"] == "/run/ztunnel/ready.sock"),
        "{env:?}"
    );
    for (name, kind) in [("warren-ztunnel", "DaemonSet"), ("waypoint", "Deployment")] {
        let pod = &objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name).unwrap()["spec"]
            ["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        let token =
            pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "token").expect("a token");
        assert_eq!(
            token["projected"]["sources"],
            serde_json::json!([{"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]),
            "{name}"
        );
    }

    // What must exist for real first: the namespaces, and the CRDs (a Gateway can be
    // validated only once its kind is served).
    server.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: warren-system}\n");
    server.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: production}\n");
    let (crds, rest) = split_crds(&full);
    assert_eq!(crds.matches("kind: CustomResourceDefinition").count(), 7, "{crds}");
    server.apply(&crds);
    for (api_version, kind) in [
        ("networking.istio.io/v1", "VirtualService"),
        ("networking.istio.io/v1", "DestinationRule"),
        ("security.istio.io/v1", "PeerAuthentication"),
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("gateway.networking.k8s.io/v1", "Gateway"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
    ] {
        server.wait_served(api_version, kind);
    }

    let kubeconfig = server.root.join("admin.kubeconfig");
    let kubectl_dry_run = |file: &Path| {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["apply", "--dry-run=server", "-o", "json", "-f"])
            .arg(file)
            .output()
            .unwrap()
    };
    let (_, default_rest) = split_crds(&default);
    let file = dir.join("default.yaml");
    fs::write(&file, &default_rest).unwrap();
    let refused = kubectl_dry_run(&file);
    let errors = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success(),
        "privileged containers were accepted by a server without --allow-privileged"
    );
    // kubectl lists several reasons as "* " lines, a single one after "is invalid: ".
    let mut reasons: Vec<&str> = errors.lines().filter_map(|l| l.strip_prefix("* ")).collect();
    if reasons.is_empty() {
        reasons = errors.lines().filter_map(|l| Some(l.split_once(" is invalid: ")?.1)).collect();
    }
    assert_eq!(
        reasons,
        [
            "spec.template.spec.initContainers[0].securityContext.privileged: Forbidden: disallowed by cluster policy"
        ],
        "the default chart was refused for another reason too:\n{errors}"
    );

    // The node clean-up of docs/install.md ("Uninstall") is valid too.
    let cleanup = kubectl_dry_run(&workspace().join("deploy/chart/node-cleanup.yaml"));
    assert!(cleanup.status.success(), "node-cleanup.yaml: {}", String::from_utf8_lossy(&cleanup.stderr));

    for (name, manifests) in [("full", rest)] {
        let file = dir.join(format!("{name}.yaml"));
        fs::write(&file, &manifests).unwrap();
        let answer = kubectl_dry_run(&file);
        assert!(
            answer.status.success(),
            "{name}: kubectl apply --dry-run=server refused it:\n{}",
            String::from_utf8_lossy(&answer.stderr)
        );
        let out = String::from_utf8_lossy(&answer.stdout).into_owned();
        let answer: serde_json::Value = serde_json::from_str(&out).expect("kubectl's JSON");
        let items = answer["items"].as_array().cloned().unwrap_or_else(|| vec![answer.clone()]);
        let kinds: Vec<String> = items
            .iter()
            .map(|i| format!("{}/{}", i["kind"].as_str().unwrap(), i["metadata"]["name"].as_str().unwrap()))
            .collect();
        let expected = manifests.matches("\nkind: ").count() + usize::from(manifests.starts_with("kind: "));
        assert_eq!(items.len(), expected, "{name}: the server answered for {kinds:?}");
        for needed in [
            "DaemonSet/warren-ztunnel",
            "Deployment/warren-controller",
            "Service/warren-ca",
            "ClusterRole/warren-controller",
            "ClusterRoleBinding/warren-controller-auth-delegator",
        ] {
            assert!(kinds.iter().any(|k| k == needed), "{name}: {needed} missing from {kinds:?}");
        }
        // The server's defaulting ran on the DaemonSet (dry-run answers with the stored form).
        assert_eq!(ds_default(&items), "RollingUpdate");
        let ds = items.iter().find(|i| i["kind"] == "DaemonSet").unwrap();
        assert_eq!(ds["spec"]["template"]["spec"]["priorityClassName"], "system-node-critical");
        // The server kept the projected token volume and the unprivileged security context.
        let token = ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "token");
        assert_eq!(
            token.map(|t| t["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"].clone()),
            Some(serde_json::json!(3600))
        );
        assert_eq!(ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"], false);
        if name == "full" {
            assert!(kinds.iter().any(|k| k == "Gateway/waypoint"), "{kinds:?}");
            assert!(kinds.iter().any(|k| k == "PodDisruptionBudget/warren-controller"), "{kinds:?}");
        }
    }
}
