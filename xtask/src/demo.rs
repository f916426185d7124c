//! `cargo xtask demo`: what the mesh gives, shown on this machine's kernel.
//!
//! Two nodes (network namespaces joined by an underlay) with pods on each. ztunnel captures
//! the enrolled pods' traffic with eBPF and carries it between nodes over HBONE (mTLS between
//! SPIFFE identities); PeerAuthentication and AuthorizationPolicy are enforced; Istio metrics
//! are scraped; and capture fails closed when ztunnel is down. Everything is removed at the end.
//!
//! It grows into the full local-cluster demo (controller, manifests, waypoint, canary) as those
//! land.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use warren_core::{
    model::{NodeConfig, Workload},
    policy::{Action, Authorization, MtlsMode, PeerAuthentication, Rule, Source},
};
use warren_e2e::{
    app::{Client, Server},
    topology::{Cluster, Pod},
    wait_until,
    ztunnel::{ADMIN, MeshCa, Ztunnel, binary},
};

use crate::setup::{run_checked, workspace_root};

fn say(step: &str) {
    println!("\n\x1b[1m==> {step}\x1b[0m");
}

fn workload(pod: &Pod, node: &str, enrolled: bool, sa: &str, app: &str) -> Workload {
    let mut w = pod.workload(node, enrolled);
    w.namespace = "production".into();
    w.uid = format!("production/{app}");
    w.name = app.into();
    w.service_account = sa.into();
    w.labels.insert("app".into(), app.into());
    w
}

/// Tries checkout-style traffic from `from` to the payment pod and says what happened.
fn attempt(label: &str, from: &Pod, to: &Pod) -> bool {
    let dst = SocketAddr::new(to.ipv4, 8080);
    let outcome = Client::connect(from, dst).and_then(|mut c| {
        c.greeting()?;
        c.echo("POST /api/v1/charge")
    });
    match outcome {
        Ok(echo) if !echo.is_empty() => {
            println!("    {label:<44} -> payment:8080   reached the application");
            true
        }
        Ok(_) | Err(_) => {
            println!("    {label:<44} -> payment:8080   refused");
            false
        }
    }
}

pub fn run() -> Result<()> {
    warren_e2e::require_root();
    say("building ztunnel (the eBPF programs are compiled and embedded in it)");
    run_checked(
        Command::new("cargo").current_dir(workspace_root()).args(["build", "--quiet", "--bin", "ztunnel"]),
    )?;

    say("creating two nodes and four pods (network namespaces, veths, an underlay between nodes)");
    let ca = MeshCa::new();
    let mut cluster = Cluster::new(2);
    let (checkout, other, legacy) =
        (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let payment = cluster.nodes[1].add_pod();
    let (n1, n2) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let workloads = vec![
        workload(&checkout, &n1, true, "checkout", "checkout"),
        workload(&other, &n1, true, "reporting", "reporting"),
        workload(&legacy, &n1, false, "legacy", "legacy"),
        workload(&payment, &n2, true, "payment", "payment"),
    ];
    for (w, pod) in workloads.iter().zip([&checkout, &other, &legacy, &payment]) {
        println!(
            "    {:<22} node {}  {:<14} {}",
            w.display_name(),
            if w.node == n1 { 1 } else { 2 },
            pod.ipv4.to_string(),
            if w.enrolled { "in the mesh (istio.io/dataplane-mode=ambient)" } else { "not in the mesh" }
        );
    }
    let config = |authorizations, peer_authentications| NodeConfig {
        workloads: workloads.clone(),
        authorizations,
        peer_authentications,
        ..Default::default()
    };

    say("starting a ztunnel per node: eBPF capture attached, pods enrolled, certificates issued");
    let mut z1 = Ztunnel::start_with(&cluster.nodes[0], &workloads, &ca, &[]);
    let z2 = Ztunnel::start_with(&cluster.nodes[1], &workloads, &ca, &[]);
    for (z, pods) in [(&z1, vec![&checkout, &other]), (&z2, vec![&payment])] {
        for p in pods {
            let uid =
                workloads.iter().find(|w| w.ips.contains(&p.ipv4)).map(|w| w.uid.clone()).unwrap_or_default();
            z.wait_enrolled(&uid);
        }
    }
    let status = cluster.nodes[0]
        .ns
        .command(binary("ztunnel"))
        .args(["status", "--admin", ADMIN])
        .output()
        .context("running ztunnel status")?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    let _server = Server::start(&payment, 8080);

    say("checkout (node 1) calls payment (node 2): captured, carried over HBONE with mutual TLS");
    let dst = SocketAddr::new(payment.ipv4, 8080);
    let mut client = Client::connect(&checkout, dst)?;
    println!("    checkout's socket is connected to {} (ztunnel, inside checkout's netns)", client.peer());
    client.greeting()?;
    println!("    reply through both ztunnels: {:?}", client.echo("POST /api/v1/charge")?);
    drop(client);
    wait_until(Duration::from_secs(3), || !z2.access_log("inbound").is_empty());
    for (node, z, direction) in [(1, &z1, "outbound"), (2, &z2, "inbound")] {
        for l in z.access_log(direction).iter().filter(|l| l["protocol"] == "HBONE").take(1) {
            println!(
                "    node {node} ztunnel, {direction}: {} ({}) -> {} ({}), {} bytes out, {} back",
                l["src"].as_str().unwrap_or(""),
                l["src_identity"].as_str().unwrap_or(""),
                l["dst"].as_str().unwrap_or(""),
                l["dst_identity"].as_str().unwrap_or("?"),
                l["bytes_sent"],
                l["bytes_received"]
            );
        }
    }

    say("PeerAuthentication STRICT in production: plaintext from the legacy pod is refused");
    attempt("legacy (not in the mesh), before", &legacy, &payment);
    let strict = PeerAuthentication {
        name: "default".into(),
        namespace: "production".into(),
        selector: None,
        mode: MtlsMode::Strict,
        port_level: Default::default(),
    };
    for z in [&z1, &z2] {
        z.apply_config(&config(vec![], vec![strict.clone()]));
    }
    if attempt("legacy (not in the mesh), with STRICT", &legacy, &payment) {
        bail!("STRICT PeerAuthentication let plaintext through");
    }
    attempt("checkout (mTLS), with STRICT", &checkout, &payment);

    say("AuthorizationPolicy: payment admits only spiffe://cluster.local/ns/production/sa/checkout");
    let allow = Authorization {
        name: "payment-allow-checkout".into(),
        namespace: "production".into(),
        selector: Some([("app".to_string(), "payment".to_string())].into()),
        action: Action::Allow,
        rules: vec![Rule {
            from: vec![Source {
                principals: vec!["cluster.local/ns/production/sa/checkout".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    for z in [&z1, &z2] {
        z.apply_config(&config(vec![allow.clone()], vec![strict.clone()]));
    }
    attempt("checkout (sa checkout)", &checkout, &payment);
    if attempt("reporting (sa reporting, also in the mesh)", &other, &payment) {
        bail!("the AuthorizationPolicy let another principal through");
    }
    if let Some(l) = z2.access_log("inbound").iter().rev().find(|l| l["response"] == 401) {
        println!(
            "    node 2 ztunnel: {} answered 401: {}",
            l["src_identity"].as_str().unwrap_or(""),
            l["error"].as_str().unwrap_or("")
        );
    }

    say("Istio metrics, scraped from each ztunnel's :15020");
    for (node, z) in [(1, &z1), (2, &z2)] {
        let metrics = z.get_at("127.0.0.1:15020".parse()?, "/metrics")?;
        for line in metrics.lines().filter(|l| l.starts_with("istio_tcp_connections_opened_total{")) {
            let label = |k: &str| {
                line.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            println!(
                "    node {node}: istio_tcp_connections_opened_total{{reporter={}, source={}, destination={}, security={}, flags={}}} {}",
                label("reporter"),
                label("source_canonical_service"),
                label("destination_canonical_service"),
                label("connection_security_policy"),
                label("response_flags"),
                line.rsplit(' ').next().unwrap_or("")
            );
        }
    }

    say("ztunnel on node 1 stops: capture stays pinned in the kernel and fails closed");
    z1.stop();
    match Client::connect(&checkout, dst) {
        Err(e) => println!("    checkout -> payment:8080 now fails: {e} (never a silent bypass)"),
        Ok(_) => bail!("checkout reached payment with its ztunnel stopped: capture failed open"),
    }

    say("cleaning up: ztunnel uninstall removes the pins (programs detach), namespaces go");
    drop((z1, z2));
    drop(cluster);
    println!(
        "    done. `./x test` runs the end-to-end tests that assert all of this; `./x bench` measures it."
    );
    Ok(())
}
