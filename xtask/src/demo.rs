//! `cargo xtask demo`: what the mesh gives, shown on this machine's kernel.
//!
//! Two nodes (network namespaces joined by an underlay) with pods on each, described by
//! Kubernetes manifests. The controller (local mode) translates the manifests and is the mesh
//! CA; a ztunnel per node captures the enrolled pods' traffic with eBPF and carries it between
//! nodes over HBONE (mTLS between SPIFFE identities). Policies are applied by adding manifests;
//! Istio metrics are scraped; capture fails closed when ztunnel is down. Everything is removed
//! at the end.
//!
//! It grows into the full local-cluster demo (`xtask up`, waypoint, canary) as those land.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use warren_e2e::{
    app::{Client, Server},
    controller::{LocalMode, ambient_namespace, pod_manifest},
    topology::{Cluster, Pod},
    wait_until,
    ztunnel::{ADMIN, Ztunnel, binary},
};

use crate::setup::{run_checked, workspace_root};

fn say(step: &str) {
    println!("\n\x1b[1m==> {step}\x1b[0m");
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

/// Waits until both ztunnels have loaded a config with `count` policies of `kind`.
fn wait_for_policies(ztunnels: &[&Ztunnel], kind: &str, count: usize) -> Result<()> {
    let loaded = wait_until(Duration::from_secs(10), || {
        ztunnels.iter().all(|z| z.config_dump()["workloads"][kind].as_array().map_or(0, Vec::len) == count)
    });
    if !loaded {
        bail!("the ztunnels did not pick up the new {kind}");
    }
    Ok(())
}

pub fn run() -> Result<()> {
    warren_e2e::require_root();
    say("building ztunnel (the eBPF programs are compiled and embedded in it) and the controller");
    run_checked(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--quiet",
        "--bin",
        "ztunnel",
        "--bin",
        "controller",
    ]))?;

    say("creating two nodes and four pods (network namespaces, veths, an underlay between nodes)");
    let mut cluster = Cluster::new(2);
    let (checkout, reporting, legacy) =
        (cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod(), cluster.nodes[0].add_pod());
    let payment = cluster.nodes[1].add_pod();
    let (n1, n2) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    for (name, node, pod, mesh) in [
        ("production/checkout", 1, &checkout, "in the mesh (namespace labelled ambient)"),
        ("production/reporting", 1, &reporting, "in the mesh"),
        ("production/legacy", 1, &legacy, "opted out (istio.io/dataplane-mode: none)"),
        ("production/payment", 2, &payment, "in the mesh"),
    ] {
        println!("    {name:<22} node {node}  {:<14} {mesh}", pod.ipv4.to_string());
    }

    say("writing the Kubernetes manifests; the controller translates them and is the mesh CA");
    let mut local = LocalMode::new("demo");
    local.write("namespace.yaml", &ambient_namespace("production"));
    local.write("checkout.yaml", &pod_manifest(&checkout, "production", "checkout", &n1, "checkout", ""));
    local.write("reporting.yaml", &pod_manifest(&reporting, "production", "reporting", &n1, "reporting", ""));
    local.write(
        "legacy.yaml",
        &pod_manifest(&legacy, "production", "legacy", &n1, "legacy", ", istio.io/dataplane-mode: none"),
    );
    local.write("payment.yaml", &pod_manifest(&payment, "production", "payment", &n2, "payment", ""));
    let ca_addr = local.serve(&cluster);
    println!("    controller serve: manifests in {}, CA on {ca_addr}", local.manifests().display());

    say("starting a ztunnel per node: eBPF capture attached, pods enrolled, certificates from the CA");
    let root_pem = local.root_pem();
    let mut z1 = Ztunnel::start_with_remote_ca(
        &cluster.nodes[0],
        &local.config,
        ca_addr,
        &root_pem,
        &local.token_file(&n1),
    );
    let z2 = Ztunnel::start_with_remote_ca(
        &cluster.nodes[1],
        &local.config,
        ca_addr,
        &root_pem,
        &local.token_file(&n2),
    );
    z1.wait_enrolled("production/checkout");
    z1.wait_enrolled("production/reporting");
    z2.wait_enrolled("production/payment");
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

    say("adding a PeerAuthentication manifest (STRICT): plaintext from the legacy pod is refused");
    attempt("legacy (not in the mesh), before", &legacy, &payment);
    local.write(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: production\nspec:\n  mtls: {mode: STRICT}\n",
    );
    wait_for_policies(&[&z1, &z2], "peerAuthentications", 1)?;
    if attempt("legacy (not in the mesh), with STRICT", &legacy, &payment) {
        bail!("STRICT PeerAuthentication let plaintext through");
    }
    attempt("checkout (mTLS), with STRICT", &checkout, &payment);

    say(
        "adding an AuthorizationPolicy: payment admits only checkout's principal (POST /api/v1/charge needs the waypoint)",
    );
    local.write(
        "allow.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: payment-allow-checkout\n  namespace: production\n\
         spec:\n  selector:\n    matchLabels: {app: payment}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/production/sa/checkout]}}]\n",
    );
    wait_for_policies(&[&z1, &z2], "authorizations", 1)?;
    attempt("checkout (sa checkout)", &checkout, &payment);
    if attempt("reporting (sa reporting, also in the mesh)", &reporting, &payment) {
        bail!("the AuthorizationPolicy let another principal through");
    }
    if let Some(l) = z2.access_log("inbound").iter().rev().find(|l| l["response"] == 401) {
        println!(
            "    node 2 ztunnel: {} answered 401: {}",
            l["src_identity"].as_str().unwrap_or(""),
            l["error"].as_str().unwrap_or("")
        );
    }

    say("controller analyze: what it says about these manifests");
    let analyze =
        Command::new(binary("controller")).args(["analyze", "--dir"]).arg(local.manifests()).output()?;
    for line in String::from_utf8_lossy(&analyze.stdout).lines() {
        println!("    {line}");
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
    drop(local);
    drop(cluster);
    println!(
        "    done. `./x test` runs the end-to-end tests that assert all of this; `./x bench` measures it."
    );
    Ok(())
}
