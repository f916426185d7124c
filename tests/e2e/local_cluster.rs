//! `xtask up` / `xtask down`, the manifest-driven local cluster, run as a user runs them (the
//! real `xtask` binary): it comes up from a directory, follows edits to it, runs side by side
//! with another cluster, and leaves nothing behind — namespaces, veths, cgroups, BPF pins,
//! processes — even when the test driving it panics.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use warren_e2e::{require_root, unique_name, wait_until, waypoint::http_in, ztunnel::binary};

/// A cluster started with `xtask up`; `xtask down` on drop, whatever happened.
struct LocalCluster {
    name: String,
    dir: PathBuf,
}

impl LocalCluster {
    fn up(name: &str, manifests: &[(&str, &str)]) -> Self {
        require_root();
        let dir = std::env::temp_dir().join("warren-e2e").join(unique_name("lc"));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in manifests {
            std::fs::write(dir.join(file), text).unwrap();
        }
        let cluster = LocalCluster { name: name.to_string(), dir };
        let out = Command::new(binary("xtask"))
            .args(["up", "--no-build", "--name", name])
            .arg(&cluster.dir)
            .output()
            .expect("run xtask up");
        assert!(
            out.status.success(),
            "xtask up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn state(&self) -> Value {
        let text = std::fs::read_to_string(format!("/run/warren/clusters/{}/state.json", self.name)).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn pod(&self, name: &str) -> Option<Value> {
        self.state()["pods"].as_array()?.iter().find(|p| p["name"] == name).cloned()
    }

    fn vip(&self, service: &str) -> String {
        self.state()["services"][service].as_str().expect("service VIP").to_string()
    }

    fn down(&self) -> String {
        let out =
            Command::new(binary("xtask")).args(["down", "--name", &self.name]).output().expect("xtask down");
        assert!(out.status.success(), "xtask down: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new(binary("xtask")).args(["down", "--name", &self.name]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NAMESPACE: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}\n";

fn pod(name: &str, node: usize, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: echo, version: {version}}}}}\n\
         spec: {{nodeName: node-{node}, containers: [{{name: app, image: echo, ports: [{{containerPort: 8080}}]}}]}}\n"
    )
}

fn client(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: client}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: app, image: echo}}]}}\n"
    )
}

/// `warren-load` inside a pod of the cluster; the versions that answered.
fn versions_seen(cluster: &LocalCluster, from: &str, url: &str, requests: u32) -> Value {
    let netns = cluster.pod(from).expect("client pod")["netns"].as_str().unwrap().to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(binary("warren-load"))
        .args([url, "-n", &requests.to_string(), "--json", "--timeout-ms", "3000"])
        .output()
        .expect("warren-load");
    let summary: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("warren-load: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    summary["versions"].clone()
}

/// An L4 ALLOW policy on shop's echo pods that names no client.
const ONLY_NOBODY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: only-nobody, namespace: shop}\n\
    spec:\n  selector: {matchLabels: {app: echo}}\n  action: ALLOW\n\
    \x20 rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/nobody]}}]}]\n";

/// `istio_requests_total` for `service` on the waypoint in `netns`, summed over its series.
fn requests_through(netns: &Path, service: &str) -> u64 {
    let metrics = http_in(netns, "127.0.0.1:15020".parse().unwrap(), "GET", "/metrics", &[]).unwrap().body;
    let label = format!("destination_service=\"{service}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Everything a cluster named `name` with supervisor `pid` could leave behind.
fn leftovers(name: &str, pid_marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/var/run/netns").into_iter().flatten().flatten() {
        let ns = entry.file_name().to_string_lossy().into_owned();
        if ns.contains(pid_marker) {
            found.push(format!("netns {ns}"));
        }
    }
    for i in 1..=2 {
        let node = format!("{name}-node-{i}");
        for path in
            [format!("/sys/fs/bpf/warren/{node}"), format!("/sys/fs/cgroup/unified/warren-e2e/{node}")]
        {
            if Path::new(&path).exists() {
                found.push(path);
            }
        }
        let ps = Command::new("pgrep").args(["-f", &format!("--node {node}")]).output().unwrap();
        if !ps.stdout.is_empty() {
            found.push(format!("ztunnel of {node}: {}", String::from_utf8_lossy(&ps.stdout).trim()));
        }
    }
    if Path::new(&format!("/run/warren/clusters/{name}")).exists() {
        found.push(format!("/run/warren/clusters/{name}"));
    }
    found
}

fn pid_marker(cluster: &LocalCluster) -> String {
    let pid = cluster.state()["supervisorPid"].as_u64().unwrap();
    format!("{}x", pid % 100_000)
}

#[test]
fn up_follows_the_directory_and_down_leaves_nothing_twice_in_a_row() {
    let name = format!("t{}", std::process::id() % 100_000);
    for round in 0..2 {
        let cluster = LocalCluster::up(
            &name,
            &[
                ("ns.yaml", NAMESPACE),
                ("svc.yaml", SERVICE),
                ("v1.yaml", &pod("echo-v1", 2, "v1")),
                ("c.yaml", &client("client")),
            ],
        );
        let marker = pid_marker(&cluster);
        let url = format!("http://{}/", cluster.vip("shop/echo"));
        let seen = versions_seen(&cluster, "client", &url, 10);
        assert_eq!(seen["v1"], 10, "round {round}: {seen}");

        if round == 0 {
            // A new pod manifest: scheduled, enrolled and routed to, nothing restarted.
            let ztunnel_pids = cluster.state()["nodes"].clone();
            std::fs::write(cluster.dir.join("v2.yaml"), pod("echo-v2", 1, "v2")).unwrap();
            let routed = wait_until(Duration::from_secs(20), || {
                cluster.pod("echo-v2").is_some()
                    && versions_seen(&cluster, "client", &url, 10)["v2"].as_u64() > Some(0)
            });
            assert!(routed, "the added pod was never routed to: {}", cluster.state());
            assert_eq!(cluster.state()["nodes"], ztunnel_pids, "ztunnels were restarted");
            // And deleting it reverses that.
            std::fs::remove_file(cluster.dir.join("v2.yaml")).unwrap();
            let removed = wait_until(Duration::from_secs(20), || {
                cluster.pod("echo-v2").is_none() && versions_seen(&cluster, "client", &url, 10)["v1"] == 10
            });
            assert!(removed, "the deleted pod was still there: {}", cluster.state());
        }
        let said = cluster.down();
        assert!(said.contains("removed"), "{said}");
        assert_eq!(leftovers(&name, &marker), Vec::<String>::new(), "round {round} left things behind");
    }
}

#[test]
fn two_clusters_run_side_by_side_and_a_panicking_test_still_tears_down() {
    let (a, b) = (format!("a{}", std::process::id() % 100_000), format!("b{}", std::process::id() % 100_000));
    let manifests = [("ns.yaml", NAMESPACE), ("svc.yaml", SERVICE)];
    let first = LocalCluster::up(
        &a,
        &[manifests[0], manifests[1], ("v1.yaml", &pod("echo-a", 2, "v1")), ("c.yaml", &client("ca"))],
    );
    let second = LocalCluster::up(
        &b,
        &[manifests[0], manifests[1], ("v1.yaml", &pod("echo-b", 2, "v7")), ("c.yaml", &client("cb"))],
    );
    // Same service names and VIPs, separate worlds: each client reaches its own cluster's pod.
    assert_eq!(versions_seen(&first, "ca", &format!("http://{}/", first.vip("shop/echo")), 5)["v1"], 5);
    assert_eq!(versions_seen(&second, "cb", &format!("http://{}/", second.vip("shop/echo")), 5)["v7"], 5);
    let (marker_a, marker_b) = (pid_marker(&first), pid_marker(&second));
    first.down();
    assert_eq!(leftovers(&a, &marker_a), Vec::<String>::new());
    assert_eq!(
        versions_seen(&second, "cb", &format!("http://{}/", second.vip("shop/echo")), 5)["v7"],
        5,
        "taking one cluster down broke the other"
    );

    // A panic while the cluster is up: the guard's drop still runs `down`.
    let name = b.clone();
    let outcome = std::panic::catch_unwind(move || {
        let _guard = second;
        panic!("the test fails while cluster {name} is up");
    });
    assert!(outcome.is_err());
    assert_eq!(leftovers(&b, &marker_b), Vec::<String>::new());
}

/// The shipped example (deploy/examples), brought up as the demo brings it up: every claim the
/// demo prints is asserted here.
#[test]
fn the_example_manifests_do_what_the_demo_says() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    let manifests: Vec<(&str, &str)> = files.iter().map(|(f, t)| (f.as_str(), t.as_str())).collect();
    let cluster = LocalCluster::up(&format!("e{}", std::process::id() % 100_000), &manifests);
    let netns =
        |pod: &str| Path::new("/var/run/netns").join(cluster.pod(pod).unwrap()["netns"].as_str().unwrap());
    let payment: std::net::SocketAddr =
        format!("{}:80", cluster.vip("production/payment-service")).parse().unwrap();
    let charge = format!("http://{payment}/api/v1/charge");
    let load = |pod: &str, args: &[&str]| -> Value {
        let out = Command::new("ip")
            .args(["netns", "exec", cluster.pod(pod).unwrap()["netns"].as_str().unwrap()])
            .arg(binary("warren-load"))
            .arg(&charge)
            .args(args)
            .args(["--json", "--timeout-ms", "3000"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };

    // The canary: 95/5 over 2,000 charges, inside the binomial 99.9 % interval (68..=132).
    let split = load("checkout-service-0", &["-X", "POST", "-n", "2000", "-c", "4"]);
    assert_eq!(split["successes"], 2000, "{split}");
    let v2 = split["versions"]["v2"].as_u64().unwrap_or(0);
    assert!((68..=132).contains(&v2), "v2 got {v2} of 2000: {split}");

    // Beta users always reach the canary.
    let beta = load("checkout-service-0", &["-X", "POST", "-n", "50", "-H", "x-beta-user: true"]);
    assert_eq!(beta["versions"]["v2"], 50, "{beta}");

    // STRICT: the legacy pod's plaintext to a payment pod is refused.
    let v1_ip = cluster.pod("payment-v1-0").unwrap()["ipv4"].as_str().unwrap().to_string();
    let plaintext = http_in(&netns("legacy"), format!("{v1_ip}:8080").parse().unwrap(), "GET", "/", &[]);
    assert!(plaintext.is_err(), "STRICT let plaintext through: {plaintext:?}");

    // The AuthorizationPolicy on the waypoint.
    let post = http_in(&netns("checkout-service-0"), payment, "POST", "/api/v1/charge", &[]).unwrap();
    assert_eq!(post.status, 200);
    for (pod, method) in [("checkout-service-0", "GET"), ("reporting-0", "POST")] {
        let r = http_in(&netns(pod), payment, method, "/api/v1/charge", &[]).unwrap();
        assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"), "{pod} {method}");
    }

    // mTLS between SPIFFE identities, from the proxies' own logs and metrics.
    let state = cluster.state();
    let node1_log = std::fs::read_to_string(state["nodes"][0]["ztunnelLog"].as_str().unwrap()).unwrap();
    assert!(
        node1_log.lines().any(|l| l.contains("\"direction\":\"outbound\"")
            && l.contains("\"src_identity\":\"spiffe://cluster.local/ns/production/sa/checkout-service\"")
            && l.contains("\"dst_identity\":\"spiffe://cluster.local/ns/production/sa/waypoint\"")),
        "node-1's ztunnel did not log checkout -> waypoint over HBONE"
    );
    let metrics =
        |ns: &Path| http_in(ns, "127.0.0.1:15020".parse().unwrap(), "GET", "/metrics", &[]).unwrap().body;
    let node2 = metrics(&Path::new("/var/run/netns").join(state["nodes"][1]["netns"].as_str().unwrap()));
    assert!(
        node2.lines().any(|l| l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/production/sa/waypoint\"")
            && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{node2}"
    );
    let waypoint = metrics(&netns("waypoint-0"));
    for want in [
        "source_principal=\"spiffe://cluster.local/ns/production/sa/checkout-service\"",
        "destination_version=\"v2\"",
        "response_code=\"403\",grpc_response_status=\"\",response_flags=\"RBAC\"",
    ] {
        assert!(waypoint.contains(want), "waypoint metrics lack {want}");
    }
}

/// A Service uses a waypoint of another namespace (`istio.io/use-waypoint-namespace`) when that
/// waypoint's Gateway admits its namespace (`allowedRoutes`); a Service of a namespace it does
/// not admit is not bound to it and reaches its pods directly, as in Istio.
#[test]
fn a_service_uses_a_waypoint_of_another_namespace_only_where_its_gateway_admits_it() {
    let gateway = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
        metadata: {name: shared, namespace: infra}\n\
        spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n\
        \x20   allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: payments}}}}\n";
    let namespaces = "apiVersion: v1\nkind: Namespace\nmetadata: {name: infra}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, team: payments}}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: games, labels: {istio.io/dataplane-mode: ambient}}\n";
    let uses_shared = "labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra}";
    let services = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: shop, {uses_shared}}}\n\
         spec: {{selector: {{app: echo}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: games, {uses_shared}}}\n\
         spec: {{selector: {{app: echo}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: orphan, namespace: shop, labels: {{istio.io/use-waypoint: gone}}}}\n\
         spec: {{selector: {{app: echo}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    );
    let games_pod = pod("echo-v1", 2, "v1")
        .replace("namespace: shop", "namespace: games")
        .replace("echo-v1,", "games-v1,");
    let cluster = LocalCluster::up(
        &format!("x{}", std::process::id() % 100_000),
        &[
            ("ns.yaml", namespaces),
            ("gateway.yaml", gateway),
            ("svc.yaml", &services),
            ("v1.yaml", &pod("echo-v1", 2, "v1")),
            ("games.yaml", &games_pod),
            ("c.yaml", &client("client")),
            ("policy.yaml", ONLY_NOBODY),
        ],
    );
    let waypoint_netns = Path::new("/var/run/netns")
        .join(cluster.pod("shared-0").expect("the waypoint pod of infra/shared")["netns"].as_str().unwrap());
    let requests_to = |service: &str| requests_through(&waypoint_netns, service);
    for (service, through_waypoint) in [("shop/echo", 10), ("games/echo", 0)] {
        let url = format!("http://{}/", cluster.vip(service));
        let seen = versions_seen(&cluster, "client", &url, 10);
        assert_eq!(seen["v1"], 10, "{service}: {seen}");
        let (ns, name) = service.split_once('/').unwrap();
        assert_eq!(
            requests_to(&format!("{name}.{ns}.svc.cluster.local")),
            through_waypoint,
            "{service}: requests through infra/shared"
        );
    }
    // The L4 ALLOW policy on shop's echo pods names nobody: the client's own connection to a
    // pod is refused, while the waypoint serving them (of another namespace) passed, as
    // Istio's implicit allow-from-waypoint lets it.
    let pod_ip = cluster.pod("echo-v1").unwrap()["ipv4"].as_str().unwrap().to_string();
    let client_netns =
        Path::new("/var/run/netns").join(cluster.pod("client").unwrap()["netns"].as_str().unwrap());
    let direct = http_in(&client_netns, format!("{pod_ip}:8080").parse().unwrap(), "GET", "/", &[]);
    assert!(direct.is_err(), "the ALLOW policy let the client in directly: {direct:?}");
    // A waypoint with no Gateway: refused (not sent past the policy it would enforce), and
    // node-1's ztunnel says which waypoint is missing.
    let url = format!("http://{}/", cluster.vip("shop/orphan"));
    let refused = versions_seen(&cluster, "client", &url, 1);
    assert!(refused.as_object().is_none_or(|v| v.is_empty()), "answered without its waypoint: {refused}");
    let log_path = cluster.state()["nodes"][0]["ztunnelLog"].as_str().unwrap().to_string();
    let said = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .contains("service orphan.shop.svc.cluster.local uses waypoint shop/gone, which has no pod")
    });
    assert!(said, "{}", std::fs::read_to_string(&log_path).unwrap());
}

/// Istio's workload waypoints: a pod labelled `istio.io/use-waypoint` with a Gateway for
/// `workload` traffic has the traffic to its own IP (as a headless Service's clients send it),
/// and through a Service without a waypoint of its own, go through that waypoint, whose L7
/// policy then applies; the pods without the label are reached directly.
#[test]
fn traffic_to_a_pods_own_ip_goes_through_its_workload_waypoint() {
    let manifests = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
        metadata: {name: pod-waypoint, namespace: shop, labels: {istio.io/waypoint-for: workload}}\n\
        spec: {gatewayClassName: istio-waypoint}\n---\n\
        apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-admin, namespace: shop}\n\
        spec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: pod-waypoint}]\n\
        \x20 action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n";
    let through = pod("echo-v1", 2, "v1")
        .replace("labels: {app: echo,", "labels: {istio.io/use-waypoint: pod-waypoint, app: echo,");
    let cluster = LocalCluster::up(
        &format!("w{}", std::process::id() % 100_000),
        &[
            ("ns.yaml", NAMESPACE),
            ("svc.yaml", SERVICE),
            ("waypoint.yaml", manifests),
            ("v1.yaml", &through),
            ("v2.yaml", &pod("echo-v2", 2, "v2")),
            ("c.yaml", &client("client")),
        ],
    );
    let netns =
        |pod: &str| Path::new("/var/run/netns").join(cluster.pod(pod).unwrap()["netns"].as_str().unwrap());
    let pod_ip = |pod: &str| cluster.pod(pod).unwrap()["ipv4"].as_str().unwrap().to_string();
    let through_waypoint =
        || requests_through(&netns("pod-waypoint-0"), "echo-v1.pod.shop.svc.cluster.local");
    let dump =
        http_in(&netns("pod-waypoint-0"), "127.0.0.1:15000".parse().unwrap(), "GET", "/config_dump", &[])
            .unwrap()
            .body;
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["servedPods"], serde_json::json!(["shop/echo-v1"]), "{}", dump["servedPods"]);
    // To the labelled pod's own IP: through the waypoint, whose policy applies.
    let v1 = format!("{}:8080", pod_ip("echo-v1")).parse().unwrap();
    let ok = http_in(&netns("client"), v1, "GET", "/", &[]).unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    let denied = http_in(&netns("client"), v1, "GET", "/admin", &[]).unwrap();
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(through_waypoint(), 2);
    // The other pod: directly (its /admin is not the waypoint's to refuse).
    let v2 = format!("{}:8080", pod_ip("echo-v2")).parse().unwrap();
    assert_eq!(http_in(&netns("client"), v2, "GET", "/admin", &[]).unwrap().status, 200);
    // Through the Service (no waypoint of its own), ten connections that ztunnel spreads over
    // both pods in turn: the labelled pod's five go through its waypoint too.
    let vip = format!("{}:80", cluster.vip("shop/echo")).parse().unwrap();
    for _ in 0..10 {
        assert_eq!(http_in(&netns("client"), vip, "GET", "/", &[]).unwrap().status, 200);
    }
    assert_eq!(through_waypoint(), 7);
}
