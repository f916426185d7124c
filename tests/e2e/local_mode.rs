//! Local mode end to end: the controller watches a directory of Kubernetes manifests and
//! rewrites the config the ztunnels read; editing a manifest reaches the running ztunnel.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use warren_e2e::{
    app::{Client, Server},
    require_root,
    topology::{Cluster, Pod},
    unique_name, wait_until,
    ztunnel::{MeshCa, Ztunnel, binary},
};

/// The controller in local mode, stopped on drop.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod_manifest(pod: &Pod, name: &str, node: &str, sa: &str, extra_labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {name}{extra_labels}}}\n\
         spec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers: [{{name: app, image: echo}}]\n\
         status:\n  phase: Running\n  podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]\n",
        pod.ipv4, pod.ipv6
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(tmp, dir.join(file)).unwrap();
}

#[test]
fn editing_manifests_reaches_a_running_ztunnel() {
    require_root();
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let node = cluster.nodes[0].name.clone();
    let (a, b, legacy, late) = (
        cluster.nodes[0].add_pod(),
        cluster.nodes[0].add_pod(),
        cluster.nodes[0].add_pod(),
        cluster.nodes[0].add_pod(),
    );
    let root = std::env::temp_dir().join("warren-e2e").join(unique_name("manifests"));
    let manifests: PathBuf = root.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    let config = root.join("config.json");
    write(
        &manifests,
        "namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    write(&manifests, "a.yaml", &pod_manifest(&a, "checkout", &node, "checkout", ""));
    write(&manifests, "b.yaml", &pod_manifest(&b, "payment", &node, "payment", ""));
    write(
        &manifests,
        "legacy.yaml",
        &pod_manifest(&legacy, "legacy", &node, "default", ", istio.io/dataplane-mode: none"),
    );

    let controller = Controller(
        std::process::Command::new(binary("controller"))
            .args(["watch", "--interval-ms", "100", "--dir"])
            .arg(&manifests)
            .arg("--out")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the controller"),
    );
    assert!(wait_until(Duration::from_secs(10), || config.exists()), "the controller wrote no config");
    let z = Ztunnel::start_reading(&cluster.nodes[0], &config, &ca);
    z.wait_enrolled("shop/checkout");
    z.wait_enrolled("shop/payment");
    let _server = Server::start(&b, 8080);
    let dst = SocketAddr::new(b.ipv4, 8080);
    let mut c = Client::connect(&a, dst).unwrap();
    c.greeting().unwrap();
    assert_eq!(c.echo("through the mesh").unwrap(), "through the mesh");
    assert_eq!(z.stat("hbone_streams_served"), 1, "checkout -> payment did not go over HBONE");
    let mut plain = Client::connect(&legacy, dst).unwrap();
    assert!(plain.greeting().is_ok(), "PERMISSIVE by default");

    // A new PeerAuthentication manifest: STRICT reaches ztunnel without a restart.
    write(
        &manifests,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: shop\nspec:\n  mtls: {mode: STRICT}\n",
    );
    let refused = wait_until(Duration::from_secs(10), || {
        Client::connect(&legacy, dst).map_or(true, |mut c| c.greeting().is_err())
    });
    assert!(refused, "STRICT from a new manifest did not reach ztunnel:\n{}", z.log());

    // A new pod manifest is enrolled; deleting it unenrolls it.
    write(&manifests, "late.yaml", &pod_manifest(&late, "late", &node, "late", ""));
    z.wait_enrolled("shop/late");
    fs::remove_file(manifests.join("late.yaml")).unwrap();
    z.wait_unenrolled("shop/late");

    // A broken manifest is reported, and the rest keeps flowing.
    write(
        &manifests,
        "broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\nspec:\n  containers: 7\n",
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut again = Client::connect(&a, dst).unwrap();
    assert!(again.greeting().is_ok(), "a broken manifest stopped the mesh");
    drop(controller);
    let _ = fs::remove_dir_all(root);
}
