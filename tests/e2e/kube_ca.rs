//! The CA in Kubernetes mode, against a real kube-apiserver and etcd: `controller serve
//! --kubernetes` (the real binary, under exactly the RBAC of deploy/rbac/controller.yaml, with no
//! bootstrap tokens) keeps the mesh root in Secret warren-system/warren-ca-root, created on
//! first start and reused after a restart, and authenticates proxies with a TokenReview of
//! their pod-bound ServiceAccount token: for a ztunnel's token it signs the identities of pods
//! on the ztunnel pod's node only; for a waypoint's (any other pod's) its own identity only,
//! and the config stream takes it only as the waypoint its ServiceAccount is named after, in its
//! namespace, on its node.
//!
//! Skipped (with how to install it) only when kube-apiserver is not installed: `./x setup`
//! builds it.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use warren_core::{
    ca::new_key_and_csr,
    ca_protocol::{RemoteCaError, request_certificate},
    certs::ca_identity,
    config_stream::ProxyKind,
    identity::SpiffeId,
    tls::{TrustBundle, spiffe_id_of},
};
use warren_e2e::kube::{ApiServer, KubeController, apiserver_or_skip};

const ZTUNNEL_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: ztunnel-node-1, namespace: warren-system}
spec:
  nodeName: node-1
  serviceAccountName: ztunnel
  containers: [{name: ztunnel, image: ztunnel}]
";

const OBJECTS: &str = "apiVersion: v1
kind: ServiceAccount
metadata: {name: ztunnel, namespace: warren-system}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: checkout, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: payment, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: checkout, namespace: shop}
spec:
  nodeName: node-1
  serviceAccountName: checkout
  containers: [{name: app, image: echo}]
---
apiVersion: v1
kind: Pod
metadata: {name: payment, namespace: shop}
spec:
  nodeName: node-2
  serviceAccountName: payment
  containers: [{name: app, image: echo}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: waypoint, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-node-1
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec:
  nodeName: node-1
  serviceAccountName: waypoint
  containers: [{name: waypoint, image: waypoint}]
";

fn identity(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap()
}

/// The root certificate in the Secret (read as the admin), PEM.
fn secret_root(server: &ApiServer) -> String {
    let api: Api<Secret> = Api::namespaced(server.client(), "warren-system");
    let secret = server.block_on(api.get("warren-ca-root")).expect("Secret warren-system/warren-ca-root");
    let data = secret.data.expect("data");
    assert!(data.contains_key("root-key.pem"), "the Secret holds no key");
    String::from_utf8(data["root-cert.pem"].0.clone()).expect("PEM")
}

/// Asks `controller`'s CA for `sa`'s certificate with `token`, trusting only `root_pem`.
fn ask(
    server: &ApiServer,
    controller: &KubeController,
    root_pem: &str,
    token: &str,
    sa: &str,
) -> Result<SpiffeId, RemoteCaError> {
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes()).expect("a PEM certificate");
    let bundle = TrustBundle::new(&[root]).expect("a trust bundle");
    let id = identity(sa);
    let (_key, csr) = new_key_and_csr(&id).expect("a CSR");
    let addr = controller.ca_addr.expect("serve");
    let chain = server.block_on(request_certificate(
        addr,
        &bundle,
        &ca_identity("cluster.local"),
        token,
        &id,
        &csr,
    ))?;
    Ok(spiffe_id_of(&chain[0]).expect("a SPIFFE ID"))
}

/// Subscribes to the controller's config stream as node `node`'s ztunnel with `token`: the
/// number of workloads of the first config delivered, or why the stream was refused.
fn subscribe(
    server: &ApiServer,
    controller: &KubeController,
    root_pem: &str,
    token: &str,
    node: &str,
) -> Result<usize, String> {
    subscribe_as(server, controller, root_pem, token, node, ProxyKind::Ztunnel)
}

/// As [`subscribe`], as a proxy of `kind`.
fn subscribe_as(
    server: &ApiServer,
    controller: &KubeController,
    root_pem: &str,
    token: &str,
    node: &str,
    kind: ProxyKind,
) -> Result<usize, String> {
    use std::sync::{Arc, Mutex};
    use warren_core::config_stream::{ClientSettings, ClientStatus, run_client};
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes()).expect("a PEM certificate");
    let proxy = match &kind {
        ProxyKind::Ztunnel => format!("ztunnel/{node}"),
        ProxyKind::Waypoint { namespace, name } => format!("waypoint/{namespace}/{name}/{node}"),
    };
    let settings = ClientSettings {
        addr: controller.ca_addr.expect("serve"),
        bundle: TrustBundle::new(&[root]).expect("a trust bundle"),
        controller_identity: ca_identity("cluster.local"),
        token: warren_core::certs::Token::Static(token.to_string()),
        proxy,
        node: node.to_string(),
        kind,
    };
    let status: Arc<Mutex<ClientStatus>> = Default::default();
    let delivered: Arc<Mutex<Option<usize>>> = Default::default();
    server.block_on(async {
        let sink = delivered.clone();
        let client = tokio::spawn(run_client(settings, status.clone(), move |_, config| {
            *sink.lock().unwrap() = Some(config.workloads.len());
        }));
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if delivered.lock().unwrap().is_some() || status.lock().unwrap().last_error.is_some() {
                break;
            }
        }
        client.abort();
    });
    let got = *delivered.lock().unwrap();
    got.ok_or_else(|| {
        status.lock().unwrap().last_error.clone().unwrap_or_else(|| "no config within 5 s".into())
    })
}

fn status(result: Result<SpiffeId, RemoteCaError>) -> u16 {
    match result {
        Err(RemoteCaError::Refused { status, .. }) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn workload_on(config: &serde_json::Value, name: &str, node: &str) -> bool {
    config["workloads"]
        .as_array()
        .is_some_and(|w| w.iter().any(|w| w["namespace"] == "shop" && w["name"] == name && w["node"] == node))
}

#[test]
fn the_ca_keeps_its_root_in_a_secret_and_signs_only_what_each_proxy_may_have() {
    let Some(binary) = apiserver_or_skip("kube_ca e2e") else { return };
    let server = ApiServer::start(&binary);
    server.apply_file("deploy/crds/istio.yaml");
    server.apply_file("deploy/crds/gateway-api.yaml");
    server.apply_file("deploy/rbac/controller.yaml");
    server.apply(ZTUNNEL_POD);
    server.apply(OBJECTS);
    server.pod_running("shop", "checkout", &["10.1.0.1"]);
    server.pod_running("shop", "payment", &["10.1.0.2"]);
    let controller_token = server.service_account_token("warren-system", "warren-controller");
    let kubeconfig = server.kubeconfig(&controller_token, "controller.kubeconfig");

    // Two controllers start at once: one creates the Secret, the other uses that root (it read
    // the Secret after the create, or lost the create race and re-read it).
    let mut first = KubeController::start_serve(&kubeconfig, &server.root, "controller-a");
    let mut second = KubeController::start_serve(&kubeconfig, &server.root, "controller-b");
    first.wait_ca();
    second.wait_ca();
    let root = secret_root(&server);
    let created = [&first, &second].iter().filter(|c| c.log().contains("created a new mesh root")).count();
    assert_eq!(
        created,
        1,
        "exactly one controller creates the root:\n{}\n---\n{}",
        first.log(),
        second.log()
    );
    for controller in [&first, &second] {
        controller.wait_config("checkout on node-1 and payment on node-2", |c| {
            workload_on(c, "checkout", "node-1") && workload_on(c, "payment", "node-2")
        });
    }

    let ztunnel = server.bound_service_account_token("warren-system", "ztunnel", "ztunnel-node-1");
    // Both controllers present a certificate under the Secret's root and sign under it.
    for controller in [&first, &second] {
        let signed = ask(&server, controller, &root, &ztunnel, "checkout")
            .unwrap_or_else(|e| panic!("node-1's ztunnel was refused checkout: {e}\n{}", controller.log()));
        assert_eq!(signed, identity("checkout"));
    }
    // A pod on another node: authenticated, not authorized.
    assert_eq!(status(ask(&server, &first, &root, &ztunnel, "payment")), 403);
    assert!(first.log().contains("no pod on node node-1 runs as"), "{}", first.log());
    // No token; the ztunnel account's token not bound to a pod; garbage.
    assert_eq!(status(ask(&server, &first, &root, "", "checkout")), 401);
    let unbound = server.service_account_token("warren-system", "ztunnel");
    assert_eq!(status(ask(&server, &first, &root, &unbound, "checkout")), 401);
    assert!(
        first.log().contains("ServiceAccount warren-system/ztunnel is not bound to a pod"),
        "{}",
        first.log()
    );
    assert_eq!(status(ask(&server, &first, &root, "not-a-token", "checkout")), 401);

    // A waypoint's pod-bound token gets the waypoint's own identity, and nothing else of its
    // node (checkout runs on node-1 too); its ServiceAccount's unbound token gets nothing.
    let waypoint = server.bound_service_account_token("shop", "waypoint", "waypoint-node-1");
    let signed = ask(&server, &first, &root, &waypoint, "waypoint")
        .unwrap_or_else(|e| panic!("the waypoint was refused its own identity: {e}\n{}", first.log()));
    assert_eq!(signed, identity("waypoint"));
    assert!(
        first
            .log()
            .contains("signed spiffe://cluster.local/ns/shop/sa/waypoint for pod shop/waypoint-node-1"),
        "{}",
        first.log()
    );
    assert_eq!(status(ask(&server, &first, &root, &waypoint, "checkout")), 403);
    assert!(
        first.log().contains(
            "pod shop/waypoint-node-1 (ServiceAccount waypoint, node node-1) asked for \
             spiffe://cluster.local/ns/shop/sa/checkout, but a pod's ServiceAccount token gets only \
             its own identity, spiffe://cluster.local/ns/shop/sa/waypoint"
        ),
        "{}",
        first.log()
    );
    let waypoint_unbound = server.service_account_token("shop", "waypoint");
    assert_eq!(status(ask(&server, &first, &root, &waypoint_unbound, "waypoint")), 401);
    assert!(first.log().contains("ServiceAccount shop/waypoint is not bound to a pod"), "{}", first.log());
    // Any pod is such a principal: an application's token gets its own identity only.
    let app = server.bound_service_account_token("shop", "checkout", "checkout");
    assert_eq!(ask(&server, &first, &root, &app, "checkout").unwrap(), identity("checkout"));
    assert_eq!(status(ask(&server, &first, &root, &app, "payment")), 403);

    // A restart reads the same root from the Secret.
    drop((first, second));
    let restarted = KubeController::serve(&kubeconfig, &server.root, "controller-c");
    assert!(
        restarted.log().contains("mesh root from Secret warren-system/warren-ca-root"),
        "{}",
        restarted.log()
    );
    assert_eq!(secret_root(&server), root, "the Secret's root changed");
    restarted.wait_config("checkout on node-1", |c| workload_on(c, "checkout", "node-1"));
    assert_eq!(ask(&server, &restarted, &root, &ztunnel, "checkout").unwrap(), identity("checkout"));

    // The config stream authenticates the same way: node-1's ztunnel token subscribes as
    // node-1, and is refused as node-2 or without a pod-bound ztunnel token.
    let workloads = subscribe(&server, &restarted, &root, &ztunnel, "node-1")
        .unwrap_or_else(|e| panic!("the config stream refused node-1's ztunnel: {e}\n{}", restarted.log()));
    assert!(workloads >= 2, "{workloads}");
    let as_other = subscribe(&server, &restarted, &root, &ztunnel, "node-2").unwrap_err();
    assert!(as_other.contains("belongs to node node-1"), "{as_other}");
    let app_as_ztunnel = subscribe(&server, &restarted, &root, &app, "node-1").unwrap_err();
    assert!(app_as_ztunnel.contains("not as a ztunnel"), "{app_as_ztunnel}");
    // Nor as its namespace's waypoint: that is the Gateway's ServiceAccount's alone (else any
    // pod could read the mesh's workloads from the stream).
    let waypoint_of_shop = ProxyKind::Waypoint { namespace: "shop".into(), name: "waypoint".into() };
    let app_as_waypoint =
        subscribe_as(&server, &restarted, &root, &app, "node-1", waypoint_of_shop).unwrap_err();
    assert!(app_as_waypoint.contains("only as waypoint shop/checkout"), "{app_as_waypoint}");

    // The waypoint's token subscribes as its own waypoint (named as its ServiceAccount) on its
    // node; not as a ztunnel, not as another waypoint, not on another node.
    let as_waypoint =
        |namespace: &str| ProxyKind::Waypoint { namespace: namespace.into(), name: "waypoint".into() };
    subscribe_as(&server, &restarted, &root, &waypoint, "node-1", as_waypoint("shop"))
        .unwrap_or_else(|e| panic!("the config stream refused the waypoint: {e}\n{}", restarted.log()));
    let refused = subscribe(&server, &restarted, &root, &waypoint, "node-1").unwrap_err();
    assert!(
        refused.contains("pod shop/waypoint-node-1") && refused.contains("not as a ztunnel"),
        "{refused}"
    );
    let other_gateway = ProxyKind::Waypoint { namespace: "shop".into(), name: "payments".into() };
    let refused = subscribe_as(&server, &restarted, &root, &waypoint, "node-1", other_gateway).unwrap_err();
    assert!(
        refused.contains("only as waypoint shop/waypoint")
            && refused.contains("not as waypoint shop/payments"),
        "a pod subscribed as a waypoint its ServiceAccount is not named after: {refused}"
    );
    let refused =
        subscribe_as(&server, &restarted, &root, &waypoint, "node-1", as_waypoint("production")).unwrap_err();
    assert!(
        refused.contains("only as a waypoint of namespace shop, not as waypoint production/waypoint"),
        "{refused}"
    );
    let refused =
        subscribe_as(&server, &restarted, &root, &waypoint, "node-2", as_waypoint("shop")).unwrap_err();
    assert!(refused.contains("runs on node node-1, not node-2"), "{refused}");
    assert!(
        subscribe_as(&server, &restarted, &root, &waypoint_unbound, "node-1", as_waypoint("shop")).is_err()
    );

    // The TokenReview of a token is reused (the token was reviewed above), but its pod is checked
    // on every request, in the controller's pod watch: once the watch sees the ztunnel pod
    // replaced (same name, new uid), its old token no longer names a node.
    server.delete("v1", "Pod", "warren-system", "ztunnel-node-1");
    server.apply(ZTUNNEL_POD);
    assert_refused_soon("the replaced ztunnel pod's token", || {
        ask(&server, &restarted, &root, &ztunnel, "checkout")
    });
    assert!(restarted.log().contains("is not the one it was issued to"), "{}", restarted.log());
    // Likewise a deleted waypoint pod's token.
    server.delete("v1", "Pod", "shop", "waypoint-node-1");
    assert_refused_soon("the deleted waypoint pod's token", || {
        ask(&server, &restarted, &root, &waypoint, "waypoint")
    });
}

/// Asserts that `ask` is refused with 401 within a few seconds: the controller checks a token's
/// pod in its own pod watch, which sees a deletion a moment after the API server made it.
fn assert_refused_soon(what: &str, ask: impl Fn() -> Result<SpiffeId, RemoteCaError>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match ask() {
            Err(RemoteCaError::Refused { status: 401, .. }) => return,
            Ok(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            other => panic!("{what}: expected a 401 within 10 s, got {other:?}"),
        }
    }
}
