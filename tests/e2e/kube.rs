//! Kubernetes mode end to end, against a real kube-apiserver and etcd: the controller (the real
//! binary, under exactly the RBAC of deploy/rbac/controller.yaml) follows creates, label
//! patches, deletions and an API-server restart into its config file; a CRD installed late is
//! picked up; a ReferenceGrant lets an HTTPRoute use another namespace's Service while it
//! exists; an identity without RBAC fails naming what it may not read.
//!
//! Skipped (with how to install it) only when kube-apiserver is not installed: `./x setup`
//! builds it.

use std::time::Duration;

use serde_json::{Value, json};
use warren_e2e::kube::{ApiServer, KubeController, apiserver_or_skip};

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {istio.io/dataplane-mode: ambient}\n";

/// A pod bound to a node (nobody schedules here); `pod_running` then plays its kubelet.
fn pod(name: &str, app: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{app: {app}, version: {version}}}\n\
         spec:\n  nodeName: node-1\n  serviceAccountName: {app}\n  containers: [{{name: app, image: echo}}]\n"
    )
}

// `protocol` is spelled out: 1.20's server-side apply needs every key of a port.
const PAYMENT_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: payment\n  namespace: shop\n\
spec:\n  selector: {app: payment}\n  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]\n";

const ROUTING: &str = "apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
    - route:
        - {destination: {host: payment, subset: v1}, weight: 90}
        - {destination: {host: payment, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
";

/// The server with Warren's CRDs and RBAC, and a kubeconfig holding a real token of the
/// warren-system/warren-controller ServiceAccount.
fn cluster(with_gateway_api: bool) -> Option<(ApiServer, std::path::PathBuf)> {
    let binary = apiserver_or_skip("kube e2e")?;
    let server = ApiServer::start(&binary);
    server.apply_file("deploy/crds/istio.yaml");
    if with_gateway_api {
        server.apply_file("deploy/crds/gateway-api.yaml");
        server.wait_served("gateway.networking.k8s.io/v1", "HTTPRoute");
        server.wait_served("gateway.networking.k8s.io/v1beta1", "ReferenceGrant");
    }
    server.wait_served("networking.istio.io/v1", "VirtualService");
    server.wait_served("networking.istio.io/v1", "DestinationRule");
    server.apply_file("deploy/rbac/controller.yaml");
    let token = server.service_account_token("warren-system", "warren-controller");
    let kubeconfig = server.kubeconfig(&token, "controller.kubeconfig");
    Some((server, kubeconfig))
}

fn workload<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config["workloads"].as_array()?.iter().find(|w| w["namespace"] == "shop" && w["name"] == name)
}

fn service<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config["services"].as_array()?.iter().find(|s| s["namespace"] == "shop" && s["name"] == name)
}

fn route_weights(config: &Value) -> Vec<(String, u64)> {
    let Some(vs) = config["routing"]["virtualServices"].as_array().and_then(|v| v.first()) else {
        return Vec::new();
    };
    vs["http"][0]["route"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|d| {
                    (
                        d["destination"]["subset"].as_str().unwrap_or("").to_string(),
                        d["weight"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_config_follows_the_api_server_across_changes_and_a_restart() {
    let Some((mut server, kubeconfig)) = cluster(true) else { return };
    server.apply(NAMESPACE);
    for (name, app, version, ip) in [
        ("checkout", "checkout", "v1", "10.1.0.1"),
        ("payment-v1", "payment", "v1", "10.1.0.2"),
        ("payment-v2", "payment", "v2", "10.1.0.3"),
    ] {
        server.apply(&pod(name, app, version));
        server.pod_running("shop", name, &[ip, &format!("fd00::{}", &ip[7..])]);
    }
    server.apply(PAYMENT_SERVICE);
    server.apply(ROUTING);

    let controller = KubeController::watch(&kubeconfig, &server.root, "controller");
    controller.wait_config("the pods, the Service and the VirtualService", |c| {
        let enrolled = ["checkout", "payment-v1", "payment-v2"].iter().all(|n| {
            workload(c, n).is_some_and(|w| {
                w["enrolled"] == true
                    && w["node"] == "node-1"
                    && w["ips"].as_array().is_some_and(|ips| ips.len() == 2)
            })
        });
        let payment = service(c, "payment").is_some_and(|s| {
            s["endpoints"].as_array().is_some_and(|e| e.len() == 2)
                && s["vips"][0].as_str().is_some_and(|ip| ip.starts_with("10.96."))
        });
        enrolled && payment && route_weights(c) == [("v1".into(), 90), ("v2".into(), 10)]
    });
    let config = controller.config();
    assert_eq!(workload(&config, "payment-v1").unwrap()["serviceAccount"], "payment");
    assert_eq!(config["routing"]["destinationRules"][0]["subsets"].as_array().unwrap().len(), 2);

    // A label patch moves the pod out of the Service; a deletion removes the workload.
    server.patch(
        "v1",
        "Pod",
        "shop",
        "payment-v2",
        json!({"metadata": {"labels": {"app": "payment-canary"}}}),
    );
    controller.wait_config("payment-v2's new label", |c| {
        workload(c, "payment-v2").is_some_and(|w| w["labels"]["app"] == "payment-canary")
            && service(c, "payment").is_some_and(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 1))
    });
    server.delete("v1", "Pod", "shop", "checkout");
    controller.wait_config("checkout gone", |c| {
        workload(c, "checkout").is_none() && workload(c, "payment-v1").is_some()
    });
    let edits = std::fs::metadata(&controller.out).unwrap().modified().unwrap();

    // The API server restarts (same etcd): the controller's watches fail, re-list with backoff,
    // and a change made after the restart still arrives.
    server.restart();
    server.apply(&pod("late", "payment", "v1"));
    server.pod_running("shop", "late", &["10.1.0.9"]);
    server.patch(
        "networking.istio.io/v1",
        "VirtualService",
        "shop",
        "payment",
        json!({"spec": {"http": [{"route": [
            {"destination": {"host": "payment", "subset": "v1"}, "weight": 50},
            {"destination": {"host": "payment", "subset": "v2"}, "weight": 50}]}]}}),
    );
    controller.wait_config("the pod and the weights changed after the restart", |c| {
        workload(c, "late").is_some_and(|w| w["ips"][0] == "10.1.0.9")
            && route_weights(c) == [("v1".into(), 50), ("v2".into(), 50)]
            && workload(c, "checkout").is_none()
    });
    assert!(std::fs::metadata(&controller.out).unwrap().modified().unwrap() > edits);
    // Nothing that arrived was lost or doubled: exactly the pods the server holds.
    let config = controller.config();
    let mut names: Vec<&str> =
        config["workloads"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["late", "payment-v1", "payment-v2"]);
}

#[test]
fn a_missing_crd_does_not_stop_the_rest_and_is_watched_once_installed() {
    let Some((server, kubeconfig)) = cluster(false) else { return };
    server.apply(NAMESPACE);
    server.apply(&pod("payment-v1", "payment", "v1"));
    server.pod_running("shop", "payment-v1", &["10.1.0.2"]);
    server.apply(PAYMENT_SERVICE);

    let controller = KubeController::watch(&kubeconfig, &server.root, "controller");
    controller
        .wait_config("the pod, without the Gateway API installed", |c| workload(c, "payment-v1").is_some());
    let log = controller.log();
    assert!(
        log.contains("the CRD httproutes.gateway.networking.k8s.io is not installed"),
        "no warning about the missing CRD:\n{log}"
    );

    server.apply_file("deploy/crds/gateway-api.yaml");
    server.wait_served("gateway.networking.k8s.io/v1", "HTTPRoute");
    server.apply(&payment_route("{name: payment, port: 80}"));
    controller.wait_config("the HTTPRoute", |c| http_route_hosts(c).is_some());
}

/// HTTPRoute shop/payment, attached to Service payment, sending to `backend_ref`.
fn payment_route(backend_ref: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: payment, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: payment, port: 80}}]
  rules: [{{backendRefs: [{backend_ref}]}}]
"
    )
}

/// The destinations of HTTPRoute shop/payment in the config, or None while it is absent.
fn http_route_hosts(config: &Value) -> Option<Vec<String>> {
    let routes = config["routing"]["virtualServices"].as_array()?;
    let route = routes.iter().find(|r| r["kind"] == "HTTPRoute" && r["name"] == "payment")?;
    let hosts = route["http"].as_array()?.iter().flat_map(|h| h["route"].as_array().into_iter().flatten());
    Some(hosts.filter_map(|d| d["destination"]["host"].as_str().map(str::to_string)).collect())
}

#[test]
fn a_route_reaches_another_namespaces_service_only_while_a_reference_grant_allows_it() {
    let Some((server, kubeconfig)) = cluster(true) else { return };
    server.apply(NAMESPACE);
    server.apply(PAYMENT_SERVICE);
    server.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bank}\n---\napiVersion: v1\nkind: Service\n\
         metadata: {name: ledger, namespace: bank}\nspec: {ports: [{name: http, port: 80, protocol: TCP}]}\n",
    );
    server.apply(&payment_route("{name: ledger, namespace: bank, port: 80}"));
    let controller = KubeController::watch(&kubeconfig, &server.root, "controller");
    controller.wait_config("the route, without its cross-namespace backend", |c| {
        http_route_hosts(c).is_some_and(|hosts| hosts.is_empty())
    });
    assert!(controller.log().contains("no ReferenceGrant in bank"), "{}", controller.log());

    const GRANT: &str = "apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: bank}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: '', kind: Service, name: ledger}]
";
    server.apply(GRANT);
    controller.wait_config("the route to bank/ledger once granted", |c| {
        http_route_hosts(c).is_some_and(|hosts| hosts == ["ledger.bank.svc.cluster.local"])
    });
    server.delete("gateway.networking.k8s.io/v1beta1", "ReferenceGrant", "bank", "shop-routes");
    controller.wait_config("the backend refused again once the grant is gone", |c| {
        http_route_hosts(c).is_some_and(|hosts| hosts.is_empty())
    });
}

#[test]
fn an_identity_without_rbac_fails_naming_the_forbidden_resource() {
    let Some((server, _)) = cluster(true) else { return };
    server
        .apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: nobody, namespace: warren-system}\n");
    let token = server.service_account_token("warren-system", "nobody");
    let kubeconfig = server.kubeconfig(&token, "nobody.kubeconfig");

    let mut controller = KubeController::watch(&kubeconfig, &server.root, "nobody");
    let status = controller.wait_exit(Duration::from_secs(30));
    let log = controller.log();
    assert!(status.is_some_and(|s| !s.success()), "the controller did not fail ({status:?}):\n{log}");
    assert!(log.contains("forbids this controller to list/watch"), "{log}");
    assert!(
        log.contains("system:serviceaccount:warren-system:nobody"),
        "the server's reason is kept:\n{log}"
    );
    assert!(log.contains("deploy/rbac/controller.yaml"), "no hint how to fix it:\n{log}");
    // Whichever watcher the server refuses first: every kind it watches is forbidden.
    let named = [
        "namespaces",
        "pods",
        "services",
        "serviceaccounts",
        "virtualservices",
        "destinationrules",
        "peerauthentications",
        "authorizationpolicies",
        "httproutes",
        "gateways",
        "referencegrants",
    ]
    .iter()
    .any(|r| log.contains(&format!("list/watch {r}")));
    assert!(named, "the forbidden resource is not named:\n{log}");
    assert!(!controller.out.exists(), "a config was written without being able to read the cluster");
}
