//! `cargo xtask demo`: what capture does, shown on this machine's kernel.
//!
//! One node and three pods in network namespaces; ztunnel enrolls pod `a` and `b`, leaves `c`
//! out. It shows the programs ztunnel attached, a captured connection with its original
//! destination, an uncaptured one, and capture failing closed while ztunnel is down. Then it
//! removes everything (namespaces, pins, cgroup).
//!
//! The full local-cluster demo (controller, HBONE between nodes, canary, policies) replaces
//! this as those pieces land.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use warren_e2e::{
    app::{Client, Server},
    topology::Node,
    wait_until,
    ztunnel::{ADMIN, Ztunnel, binary},
};

use crate::setup::{run_checked, workspace_root};

fn say(step: &str) {
    println!("\n\x1b[1m==> {step}\x1b[0m");
}

pub fn run() -> Result<()> {
    warren_e2e::require_root();
    say("building ztunnel (the eBPF programs are compiled and embedded in it)");
    run_checked(
        Command::new("cargo").current_dir(workspace_root()).args(["build", "--quiet", "--bin", "ztunnel"]),
    )?;

    say("creating a node and three pods (network namespaces joined by veths)");
    let mut node = Node::new();
    let (a, b, c) = (node.add_pod(), node.add_pod(), node.add_pod());
    for (role, pod) in
        [("a (enrolled)", &a), ("b (enrolled, runs the app on :8080)", &b), ("c (not enrolled)", &c)]
    {
        println!("    pod {role:<38} {}  {}  netns {}", pod.ipv4, pod.ipv6, pod.ns.name);
    }

    say("starting ztunnel: it loads its eBPF programs into this kernel and enrolls a and b");
    let z = Ztunnel::start(
        &node,
        &[a.workload(&node.name, true), b.workload(&node.name, true), c.workload(&node.name, false)],
    );
    z.wait_enrolled(&a.name);
    z.wait_enrolled(&b.name);
    let status = node
        .ns
        .command(binary("ztunnel"))
        .args(["status", "--admin", ADMIN])
        .output()
        .context("running ztunnel status")?;
    print!("{}", String::from_utf8_lossy(&status.stdout));
    let _server = Server::start(&b, 8080);

    say("pod a connects to b:8080 (captured: outbound and inbound both go through ztunnel)");
    let dst = SocketAddr::new(b.ipv4, 8080);
    let mut client = Client::connect(&a, dst)?;
    println!("    a's socket is connected to {} (ztunnel's in-pod listener)", client.peer());
    println!("    the application in b sees the connection come from {}", client.greeting()?);
    println!("    echo through both relays: {:?}", client.echo("hello through ztunnel")?);
    drop(client);
    wait_until(Duration::from_secs(3), || !z.access_log("inbound").is_empty());
    for line in z.access_log("outbound").iter().chain(z.access_log("inbound").iter()) {
        println!(
            "    ztunnel access log: {:<8} {} -> {}  ({} bytes out, {} bytes back)",
            line["direction"].as_str().unwrap_or(""),
            line["src"].as_str().unwrap_or(""),
            line["dst"].as_str().unwrap_or(""),
            line["bytes_sent"],
            line["bytes_received"]
        );
    }

    say("pod a connects to b over IPv6: captured the same way");
    let mut v6 = Client::connect(&a, SocketAddr::new(b.ipv6, 8080))?;
    println!("    a's socket is connected to {}; b sees {}", v6.peer(), v6.greeting()?);

    say("ztunnel stops: capture stays pinned in the kernel and fails closed");
    let mut z = z;
    z.stop();
    match Client::connect(&a, dst) {
        Err(e) => println!("    a -> b:8080 now fails: {e} (never a silent bypass)"),
        Ok(_) => bail!("a reached b with ztunnel stopped: capture failed open"),
    }
    match Client::connect(&c, dst) {
        Err(e) => println!("    c -> b:8080 (plaintext into an enrolled pod) fails: {e}"),
        Ok(_) => bail!("c reached b with ztunnel stopped: capture failed open"),
    }

    say("cleaning up: ztunnel uninstall removes the pins (programs detach), namespaces go");
    drop(z);
    drop((a, b, c));
    drop(node);
    println!("    done. `./x test` runs the end-to-end tests that assert all of this.");
    Ok(())
}
