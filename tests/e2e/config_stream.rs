//! The config stream end to end: ztunnels subscribed to the real controller (`serve`) get
//! each manifest edit as a delta, acknowledge it, refuse a bad one (NACK) while keeping the
//! last good config, keep serving while the controller is away, and resume after it restarts
//! without a full resend; `controller proxy-status` shows all of it.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use warren_e2e::{
    app::{Client, Server},
    controller::{LocalMode, ambient_namespace, pod_manifest},
    require_root,
    topology::Cluster,
    wait_until,
    ztunnel::Ztunnel,
};

const DENY_CHECKOUT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-checkout, namespace: shop}\nspec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/checkout]}}]}]\n";

fn states(status: &Value) -> Vec<String> {
    status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| p["state"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn ztunnels_follow_the_stream_refuse_bad_updates_and_resume_after_a_controller_restart() {
    require_root();
    let mut cluster = Cluster::new(2);
    let (n0, n1) = (cluster.nodes[0].name.clone(), cluster.nodes[1].name.clone());
    let a = cluster.nodes[0].add_pod();
    let b = cluster.nodes[1].add_pod();
    let mut local = LocalMode::new("stream");
    local.write("ns.yaml", &ambient_namespace("shop"));
    local.write("a.yaml", &pod_manifest(&a, "shop", "checkout", &n0, "checkout", ""));
    local.write("b.yaml", &pod_manifest(&b, "shop", "payment", &n1, "payment", ""));
    let controller = local.serve(&cluster);
    let z0 = Ztunnel::start_with_controller(
        &cluster.nodes[0],
        controller,
        &local.root_pem(),
        &local.token_file(&n0),
    );
    let z1 = Ztunnel::start_with_controller(
        &cluster.nodes[1],
        controller,
        &local.root_pem(),
        &local.token_file(&n1),
    );
    z0.wait_enrolled("shop/checkout");
    z1.wait_enrolled("shop/payment");
    let _server = Server::start(&b, 8080);
    let dst = SocketAddr::new(b.ipv4, 8080);
    let reaches = || Client::connect(&a, dst).and_then(|mut c| c.greeting()).is_ok();
    assert!(reaches(), "checkout cannot reach payment:\n{}", z0.log());
    let synced = |local: &LocalMode| {
        let s = local.proxy_status();
        states(&s) == ["SYNCED", "SYNCED"]
    };
    assert!(wait_until(Duration::from_secs(10), || synced(&local)), "{}", local.proxy_status());
    assert_eq!(z1.config_dump()["configStream"]["connected"], true);

    // An edit arrives as a delta: a DENY policy closes the path.
    local.write("deny.yaml", DENY_CHECKOUT);
    assert!(
        wait_until(Duration::from_secs(10), || !reaches()),
        "the DENY policy never arrived:\n{}",
        z1.log()
    );
    assert!(wait_until(Duration::from_secs(10), || synced(&local)));
    let log = local.controller_log();
    assert!(
        log.lines().any(|l| l.contains("sending") && l.contains("1 of")),
        "no one-resource delta:\n{log}"
    );

    // A change only waypoints get (a DestinationRule): nothing is sent to the ztunnels, and
    // they still count as running the latest version.
    let published_and_synced = |local: &LocalMode, before: &Value| {
        wait_until(Duration::from_secs(10), || {
            let s = local.proxy_status();
            s["latest"] != *before && states(&s) == ["SYNCED", "SYNCED"]
        })
    };
    let before = local.proxy_status()["latest"].clone();
    local.write(
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: payment, namespace: shop}\nspec: {selector: {app: payment}, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    assert!(published_and_synced(&local, &before), "{}", local.proxy_status());
    let before = local.proxy_status()["latest"].clone();
    local.write(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: shop}\nspec: {host: payment, subsets: [{name: v1, labels: {version: v1}}]}\n",
    );
    assert!(published_and_synced(&local, &before), "{}", local.proxy_status());

    // A bad update (another pod claiming payment's IP) is refused by both, who keep the last
    // good config: the DENY policy stays in force, the impostor never appears.
    local.write("impostor.yaml", &pod_manifest(&b, "shop", "impostor", &n1, "default", ""));
    let nacked = wait_until(Duration::from_secs(10), || {
        let s = local.proxy_status();
        states(&s) == ["NACKED", "NACKED"]
            && s["proxies"][0]["nacked"][1].as_str().is_some_and(|r| r.contains("both claim IP"))
    });
    assert!(nacked, "{}", local.proxy_status());
    let workloads = z1.config_dump()["workloads"]["workloads"].clone();
    assert!(!workloads.to_string().contains("impostor"), "{workloads}");
    assert!(!reaches(), "the last good config (with the DENY) was not kept");
    assert!(
        z1.config_dump()["configStream"]["lastNack"].as_str().is_some_and(|n| n.contains("both claim IP"))
    );

    // Fixed: back in sync, and the policy removed.
    local.remove("impostor.yaml");
    local.remove("deny.yaml");
    assert!(wait_until(Duration::from_secs(10), || synced(&local) && reaches()), "{}", local.proxy_status());

    // The controller goes away: the proxies keep serving their last config.
    local.stop_controller();
    std::thread::sleep(Duration::from_millis(500));
    assert!(reaches(), "traffic stopped with the controller");
    assert_eq!(z0.config_dump()["configStream"]["connected"], false);

    // It comes back: each ztunnel resumes with what it holds, and nothing needs resending.
    local.restart_controller();
    assert!(
        wait_until(Duration::from_secs(15), || synced(&local)),
        "{}\n{}",
        local.proxy_status(),
        local.controller_log()
    );
    let log = local.controller_log();
    let resumed = log.lines().filter(|l| l.contains("resuming from")).count();
    assert_eq!(resumed, 2, "both ztunnels resume:\n{log}");
    let after_restart = log.rsplit("CA listening").next().unwrap_or("");
    assert!(
        after_restart.lines().filter(|l| l.contains("sending")).all(|l| l.contains(": 0 of")),
        "a resume resent resources:\n{after_restart}"
    );
    assert!(reaches());
}
