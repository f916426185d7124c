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

#[test]
fn the_controller_is_the_ca_and_signs_only_for_pods_on_the_asking_node() {
    use warren_core::{
        ca::new_key_and_csr, ca_protocol::RemoteCaError, identity::SpiffeId, tls::TrustBundle,
    };
    require_root();
    let mut cluster = Cluster::new(2);
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let a = cluster.nodes[0].add_pod();
    let b = cluster.nodes[1].add_pod();
    let root = std::env::temp_dir().join("warren-e2e").join(unique_name("ca-service"));
    let manifests = root.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    write(
        &manifests,
        "namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    write(&manifests, "a.yaml", &pod_manifest(&a, "checkout", &n0, "checkout", ""));
    write(&manifests, "b.yaml", &pod_manifest(&b, "payment", &n1, "payment", ""));
    let tokens = root.join("tokens");
    fs::write(&tokens, format!("{n0} token-zero\n{n1} token-one\n")).unwrap();
    let token_files: Vec<PathBuf> = ["token-zero", "token-one"]
        .iter()
        .map(|t| {
            let p = root.join(t);
            fs::write(&p, t).unwrap();
            p
        })
        .collect();
    let config = root.join("config.json");
    let ca_dir = root.join("ca");
    // The controller runs on node 0, reachable from node 1 over the underlay.
    let ca_addr = SocketAddr::new(cluster.underlay_ips[0], 15012);
    let _controller = Controller(
        cluster.nodes[0]
            .ns
            .command(binary("controller"))
            .args(["serve", "--interval-ms", "100", "--listen", &ca_addr.to_string()])
            .arg("--dir")
            .arg(&manifests)
            .arg("--out")
            .arg(&config)
            .arg("--ca-dir")
            .arg(&ca_dir)
            .arg("--tokens")
            .arg(&tokens)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the controller"),
    );
    let root_pem = ca_dir.join("root-cert.pem");
    assert!(
        wait_until(Duration::from_secs(10), || config.exists() && root_pem.exists()),
        "the controller did not start"
    );
    std::thread::sleep(Duration::from_millis(300));
    let z0 = Ztunnel::start_with_remote_ca(&cluster.nodes[0], &config, ca_addr, &root_pem, &token_files[0]);
    let z1 = Ztunnel::start_with_remote_ca(&cluster.nodes[1], &config, ca_addr, &root_pem, &token_files[1]);
    z0.wait_enrolled("shop/checkout");
    z1.wait_enrolled("shop/payment");
    let _server = Server::start(&b, 8080);
    let mut c = Client::connect(&a, SocketAddr::new(b.ipv4, 8080)).unwrap();
    c.greeting().unwrap();
    assert_eq!(c.echo("signed by the controller").unwrap(), "signed by the controller");
    assert_eq!(z1.stat("hbone_streams_served"), 1);
    let certs = z0.config_dump()["certificates"].clone();
    assert!(certs.to_string().contains("spiffe://cluster.local/ns/shop/sa/checkout"), "{certs}");

    // Asking as node 0 for the identity of a pod on node 1, or with no valid token: refused.
    let pem = fs::read(&root_pem).unwrap();
    let root_der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    let ask = move |token: &'static str, sa: &'static str| -> Result<(), RemoteCaError> {
        let bundle = TrustBundle::new(std::slice::from_ref(&root_der)).unwrap();
        let identity: SpiffeId = format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap();
        let ca_identity: SpiffeId =
            "spiffe://cluster.local/ns/warren-system/sa/warren-controller".parse().unwrap();
        let (_, csr) = new_key_and_csr(&identity).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(warren_core::ca_protocol::request_certificate(
            ca_addr,
            &bundle,
            &ca_identity,
            token,
            &identity,
            &csr,
        ))
        .map(|_| ())
    };
    let status = |r: Result<(), RemoteCaError>| match r {
        Ok(()) => 200,
        Err(RemoteCaError::Refused { status, .. }) => status,
        Err(e) => panic!("{e}"),
    };
    let results = cluster.nodes[1].ns.run(move || {
        (
            status(ask("token-zero", "payment")),
            status(ask("no-such-token", "checkout")),
            status(ask("token-one", "payment")),
        )
    });
    assert_eq!(results, (403, 401, 200), "(other node's pod, unauthenticated, own pod)");
    let _ = fs::remove_dir_all(root);
}
