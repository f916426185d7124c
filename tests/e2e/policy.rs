//! L4 policy end to end: PeerAuthentication and AuthorizationPolicy enforced by ztunnel on
//! real connections, including connections already open when a policy changes.

use std::{net::SocketAddr, time::Duration};

use warren_core::{
    model::{NodeConfig, Workload},
    policy::{Action, Authorization, MtlsMode, PeerAuthentication, Rule, Source},
};
use warren_e2e::{
    app::{Client, Server},
    require_root,
    topology::{Cluster, Pod},
    wait_until,
    ztunnel::{MeshCa, Ztunnel},
};

const APP_PORT: u16 = 8080;

fn allow_from(principal: &str) -> Authorization {
    Authorization {
        name: "allow-checkout".into(),
        namespace: "default".into(),
        selector: Some([("app".to_string(), "payment".to_string())].into()),
        action: Action::Allow,
        rules: vec![Rule {
            from: vec![Source { principals: vec![principal.into()], ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn deny_from(principal: &str) -> Authorization {
    Authorization { name: "deny-checkout".into(), action: Action::Deny, ..allow_from(principal) }
}

/// Whether a connection from `from` to `to`:8080 gets through to the application.
fn reaches(from: &Pod, to: &Pod) -> bool {
    match Client::connect(from, SocketAddr::new(to.ipv4, APP_PORT)) {
        Ok(mut c) => c.greeting().is_ok() && c.echo("x").is_ok_and(|e| e == "x"),
        Err(_) => false,
    }
}

struct Mesh {
    _ca: MeshCa,
    _cluster: Cluster,
    z: Ztunnel,
    checkout: Pod,
    other: Pod,
    legacy: Pod,
    payment: Pod,
    workloads: Vec<Workload>,
    _server: Server,
}

/// One node: checkout (sa checkout) and other (sa other) enrolled, legacy not enrolled, and
/// payment (app=payment) enrolled with the application on 8080.
fn mesh() -> Mesh {
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(1);
    let node = cluster.nodes[0].name.clone();
    let (checkout, other, legacy, payment) = (
        cluster.nodes[0].add_pod(),
        cluster.nodes[0].add_pod(),
        cluster.nodes[0].add_pod(),
        cluster.nodes[0].add_pod(),
    );
    let mut payment_w = payment.workload_as(&node, true, "payment");
    payment_w.labels.insert("app".into(), "payment".into());
    let workloads = vec![
        checkout.workload_as(&node, true, "checkout"),
        other.workload_as(&node, true, "other"),
        legacy.workload(&node, false),
        payment_w,
    ];
    let z = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    for p in [&checkout, &other, &payment] {
        z.wait_enrolled(&p.name);
    }
    let server = Server::start(&payment, APP_PORT);
    Mesh { _ca: ca, _cluster: cluster, z, checkout, other, legacy, payment, workloads, _server: server }
}

impl Mesh {
    fn apply(&self, authorizations: Vec<Authorization>, peer_authentications: Vec<PeerAuthentication>) {
        self.z.apply_config(&NodeConfig {
            workloads: self.workloads.clone(),
            authorizations,
            peer_authentications,
            ..Default::default()
        });
    }
}

/// STRICT mTLS for the whole namespace.
fn strict_everywhere() -> PeerAuthentication {
    PeerAuthentication {
        name: "default".into(),
        namespace: "default".into(),
        selector: None,
        mode: MtlsMode::Strict,
        port_level: Default::default(),
    }
}

#[test]
fn strict_peer_authentication_refuses_plaintext_while_hbone_works() {
    require_root();
    let m = mesh();
    assert!(reaches(&m.legacy, &m.payment), "PERMISSIVE (the default) admits plaintext");
    let strict = strict_everywhere();
    m.apply(vec![], vec![strict]);
    assert!(!reaches(&m.legacy, &m.payment), "STRICT let plaintext through");
    assert!(reaches(&m.checkout, &m.payment), "HBONE refused under STRICT");
    assert!(m.z.settled_log().contains("PeerAuthentication is STRICT"));
}

#[test]
fn allow_admits_its_principal_and_deny_beats_allow() {
    require_root();
    let m = mesh();
    m.apply(vec![allow_from("cluster.local/ns/default/sa/checkout")], vec![]);
    assert!(reaches(&m.checkout, &m.payment), "the allowed principal was refused");
    assert!(!reaches(&m.other, &m.payment), "another principal got through an ALLOW policy");
    assert!(!reaches(&m.legacy, &m.payment), "plaintext (no principal) got through an ALLOW policy");
    // The refusal happened at the HBONE layer: 401 in ztunnel's access log.
    assert!(wait_until(Duration::from_secs(3), || m
        .z
        .access_log("inbound")
        .iter()
        .any(|l| l["response"] == 401 && l["src_identity"] == "spiffe://cluster.local/ns/default/sa/other")));

    m.apply(
        vec![
            allow_from("cluster.local/ns/default/sa/checkout"),
            deny_from("cluster.local/ns/default/sa/checkout"),
        ],
        vec![],
    );
    assert!(!reaches(&m.checkout, &m.payment), "DENY did not beat ALLOW");
}

#[test]
fn a_policy_update_closes_a_live_connection_it_now_denies() {
    require_root();
    let m = mesh();
    let mut live = Client::connect(&m.checkout, SocketAddr::new(m.payment.ipv4, APP_PORT)).unwrap();
    live.greeting().unwrap();
    assert_eq!(live.echo("before").unwrap(), "before");
    let mut plaintext = Client::connect(&m.legacy, SocketAddr::new(m.payment.ipv4, APP_PORT)).unwrap();
    plaintext.greeting().unwrap();

    m.apply(vec![deny_from("cluster.local/ns/default/sa/checkout")], vec![]);
    assert!(wait_until(Duration::from_secs(5), || m.z.capture()["closedByPolicy"].as_u64() >= Some(1)));
    assert!(live.echo("after").is_err_or_empty(), "the denied live connection still carries data");
    assert_eq!(plaintext.echo("still allowed").unwrap(), "still allowed", "an allowed connection was closed");

    // STRICT now: the plaintext connection is closed too.
    let strict = strict_everywhere();
    m.apply(vec![deny_from("cluster.local/ns/default/sa/checkout")], vec![strict]);
    assert!(wait_until(Duration::from_secs(5), || m.z.capture()["closedByPolicy"].as_u64() >= Some(2)));
    // Each closed connection's access line says why and still counts what had moved: the
    // greeting out, the echoes in.
    let closed_lines = || {
        let log = m.z.access_log("inbound");
        let closed: Vec<_> = log
            .into_iter()
            .filter(|l| l["error"].as_str().is_some_and(|e| e.starts_with("closed by policy")))
            .collect();
        closed
    };
    assert!(wait_until(Duration::from_secs(5), || closed_lines().len() == 2), "{}", m.z.log());
    for line in closed_lines() {
        let (sent, received) =
            (line["bytes_sent"].as_u64().unwrap(), line["bytes_received"].as_u64().unwrap());
        assert!(sent > 0 && received > 0, "a closed connection's bytes were lost: {line}");
    }
}

trait ErrOrEmpty {
    fn is_err_or_empty(&self) -> bool;
}

impl ErrOrEmpty for std::io::Result<String> {
    fn is_err_or_empty(&self) -> bool {
        self.as_ref().map_or(true, |s| s.is_empty())
    }
}
