//! Local mode end to end: the controller watches a directory of Kubernetes manifests and
//! rewrites the config the ztunnels read; editing a manifest reaches the running ztunnel. And
//! the controller as the mesh CA.

use std::{net::SocketAddr, time::Duration};

use warren_core::{ca::new_key_and_csr, ca_protocol::RemoteCaError, identity::SpiffeId, tls::TrustBundle};
use warren_e2e::{
    app::{Client, Server},
    controller::{LocalMode, ambient_namespace, pod_manifest},
    require_root,
    topology::Cluster,
    wait_until,
    ztunnel::{MeshCa, Ztunnel},
};

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
    let mut local = LocalMode::new("manifests");
    local.write("namespace.yaml", &ambient_namespace("shop"));
    local.write("a.yaml", &pod_manifest(&a, "shop", "checkout", &node, "checkout", ""));
    local.write("b.yaml", &pod_manifest(&b, "shop", "payment", &node, "payment", ""));
    local.write(
        "legacy.yaml",
        &pod_manifest(&legacy, "shop", "legacy", &node, "default", ", istio.io/dataplane-mode: none"),
    );
    local.watch();

    let z = Ztunnel::start_reading(&cluster.nodes[0], &local.config, &ca);
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
    local.write(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: shop\nspec:\n  mtls: {mode: STRICT}\n",
    );
    let refused = wait_until(Duration::from_secs(10), || {
        Client::connect(&legacy, dst).map_or(true, |mut c| c.greeting().is_err())
    });
    assert!(refused, "STRICT from a new manifest did not reach ztunnel:\n{}", z.log());

    // A new pod manifest is enrolled; deleting it unenrolls it.
    local.write("late.yaml", &pod_manifest(&late, "shop", "late", &node, "late", ""));
    z.wait_enrolled("shop/late");
    local.remove("late.yaml");
    z.wait_unenrolled("shop/late");

    // A broken manifest is reported, and the rest keeps flowing.
    local.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\nspec:\n  containers: 7\n",
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut again = Client::connect(&a, dst).unwrap();
    assert!(again.greeting().is_ok(), "a broken manifest stopped the mesh");
}

#[test]
fn the_controller_is_the_ca_and_signs_only_for_pods_on_the_asking_node() {
    require_root();
    let mut cluster = Cluster::new(2);
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let a = cluster.nodes[0].add_pod();
    let b = cluster.nodes[1].add_pod();
    let mut local = LocalMode::new("ca-service");
    local.write("namespace.yaml", &ambient_namespace("shop"));
    local.write("a.yaml", &pod_manifest(&a, "shop", "checkout", &n0, "checkout", ""));
    local.write("b.yaml", &pod_manifest(&b, "shop", "payment", &n1, "payment", ""));
    // The controller runs on node 0, reachable from node 1 over the underlay.
    let ca_addr = local.serve(&cluster);
    let root_pem = local.root_pem();
    let z0 = Ztunnel::start_with_remote_ca(
        &cluster.nodes[0],
        &local.config,
        ca_addr,
        &root_pem,
        &local.token_file(&n0),
    );
    let z1 = Ztunnel::start_with_remote_ca(
        &cluster.nodes[1],
        &local.config,
        ca_addr,
        &root_pem,
        &local.token_file(&n1),
    );
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
    let (token0, token1) = (format!("token-{n0}"), format!("token-{n1}"));
    let results = cluster.nodes[1].ns.run(move || {
        (
            ask_ca(ca_addr, &root_pem, &token0, "payment").unwrap(),
            ask_ca(ca_addr, &root_pem, "no-such-token", "checkout").unwrap(),
            ask_ca(ca_addr, &root_pem, &token1, "payment").unwrap(),
        )
    });
    assert_eq!(results, (403, 401, 200), "(other node's pod, unauthenticated, own pod)");
}

/// Asks the controller's CA at `ca_addr` (from the calling thread's netns) for a certificate
/// of `shop/<sa>` with `token`: 200, or the status it refused with; Err when it did not
/// answer.
fn ask_ca(ca_addr: SocketAddr, root_pem: &std::path::Path, token: &str, sa: &str) -> Result<u16, String> {
    let pem = std::fs::read(root_pem).unwrap();
    let root_der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
    let bundle = TrustBundle::new(std::slice::from_ref(&root_der)).unwrap();
    let identity: SpiffeId = format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap();
    let ca_identity: SpiffeId =
        "spiffe://cluster.local/ns/warren-system/sa/warren-controller".parse().unwrap();
    let (_, csr) = new_key_and_csr(&identity).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result = rt.block_on(warren_core::ca_protocol::request_certificate(
        ca_addr,
        &bundle,
        &ca_identity,
        token,
        &identity,
        &csr,
    ));
    match result {
        Ok(_) => Ok(200),
        Err(RemoteCaError::Refused { status, .. }) => Ok(status),
        Err(e) => Err(e.to_string()),
    }
}

/// The CA port when the controller runs out of file descriptors — here to connections that
/// connect and never send a byte: it does not spin on the failing accept, it says what is
/// wrong, it lets go of the silent connections when their handshake time is up, and it
/// serves again.
#[test]
fn out_of_file_descriptors_the_ca_port_backs_off_and_serves_again() {
    require_root();
    let cluster = Cluster::new(1);
    let mut local = LocalMode::new("fd-limit");
    local.write("namespace.yaml", &ambient_namespace("shop"));
    local.max_open_files = Some(64);
    let ca_addr = local.serve(&cluster);
    let pid = local.controller_pid().expect("running");
    // Ten silent connections more than the controller has descriptors left; the rest stay in
    // its accept queue until it can take them.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("its descriptors").count();
    let silent = 64usize.saturating_sub(open) + 10;
    let held: Vec<std::net::TcpStream> = cluster.nodes[0].ns.run(move || {
        (0..silent)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&ca_addr, Duration::from_secs(1)).ok())
            .collect()
    });
    assert_eq!(held.len(), silent);
    let says = || local.controller_log().contains("out of file descriptors");
    assert!(wait_until(Duration::from_secs(5), says), "no word of the limit:\n{}", local.controller_log());
    let before = warren_e2e::cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = warren_e2e::cpu_seconds(pid) - before;
    // A loop retrying accept(2) at once uses a whole core; backing off, next to nothing.
    assert!(used < 0.3, "{used:.2} s of CPU in 1 s while out of descriptors: spinning on accept?");
    let reports = local.controller_log().matches("out of file descriptors").count();
    assert!(reports <= 3, "{reports} reports in about a second:\n{}", local.controller_log());

    // The silent connections are let go after the handshake time (10 s) and the queued ones
    // taken, while the test still holds all of its ends. Then a certificate request is
    // answered (401: no valid token, an answer from the CA).
    let root_pem = local.root_pem();
    let answered = wait_until(Duration::from_secs(40), || {
        let root_pem = root_pem.clone();
        cluster.nodes[0].ns.run(move || ask_ca(ca_addr, &root_pem, "no-such-token", "checkout") == Ok(401))
    });
    assert!(answered, "the CA did not serve again:\n{}", local.controller_log());
    drop(held);
}
