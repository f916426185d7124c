//! Table-style: each case is YAML in (after a common set of Services), the exact `Routing`
//! out (as YAML of the model) and the exact findings (`code object field`).

use super::*;
use crate::{analyze::analyze, source::read_documents, translate::translate};

/// Services the cases route to: `shop` uses the waypoint `waypoint` (namespace label), `legacy`
/// opts out; `bank/ledger` has its own. Both waypoints have their Gateways.
const SERVICES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bank-waypoint, namespace: bank}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: payment, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: grpc, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: bank, labels: {istio.io/use-waypoint: bank-waypoint}}
spec: {clusterIP: 10.96.0.13, ports: [{name: http, port: 80}]}
"#;

/// Istio's default retry policy, as every forwarding route without `retries` gets it.
const RETRIES: &str = r#"{attempts: 2, retryOn: [connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes, "503"]}"#;

struct Case {
    name: &'static str,
    input: &'static str,
    /// `Routing` as YAML; `$RETRIES` stands for [`RETRIES`].
    routing: &'static str,
    findings: &'static [&'static str],
}

fn load(yaml: &str) -> (Routing, Vec<String>) {
    let mut snapshot = Snapshot::default();
    let mut findings = Vec::new();
    read_documents("case", yaml, &mut snapshot, &mut findings);
    let (config, more) = translate(&snapshot);
    findings.extend(more);
    let shown = findings
        .iter()
        .map(|f| format!("{} {} {}", f.code, f.object, f.field.as_deref().unwrap_or("-")))
        .collect();
    (config.routing, shown)
}

/// The model from YAML written as its JSON form (enums as `{exact: x}`, not YAML tags).
fn model(yaml: &str) -> Result<Routing, String> {
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// YAML of the model's JSON form, for readable diffs.
fn shown(routing: &Routing) -> String {
    serde_yaml_ng::to_string(&serde_json::to_value(routing).unwrap()).unwrap()
}

fn check(cases: &[Case]) {
    for case in cases {
        let (routing, findings) = load(&format!("{SERVICES}\n---\n{}", case.input));
        let expected = model(&case.routing.replace("$RETRIES", RETRIES))
            .unwrap_or_else(|e| panic!("case {:?}: expected routing: {e}", case.name));
        assert_eq!(shown(&routing), shown(&expected), "case {:?}", case.name);
        assert_eq!(findings, case.findings, "case {:?}", case.name);
    }
}

#[test]
fn virtual_service_hosts_and_matches() {
    check(&[
        Case {
            name: "every spelling of a host is one FQDN; unknown hosts are dropped",
            input: r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment, payment.shop, payment.shop.svc, payment.shop.svc.cluster.local, ledger.bank, nope, "*.example.com"]
  http:
  - route: [{destination: {host: ledger.bank}}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local, ledger.bank.svc.cluster.local]
  http:
  - route: [{destination: {host: ledger.bank.svc.cluster.local}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &[
                "WA0202 VirtualService shop/payment spec.hosts[5]",
                "WA0202 VirtualService shop/payment spec.hosts[6]",
            ],
        },
        Case {
            name: "every kind of match",
            input: r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - name: all
    match:
    - name: first
      uri: {prefix: /api}
      scheme: {exact: http}
      method: {regex: "GET|HEAD"}
      authority: {exact: payment}
      headers:
        X-Beta-User: {exact: "true"}
        x-trace: {}
      queryParams:
        Debug: {prefix: "1"}
      withoutHeaders:
        X-Internal: {}
      ignoreUriCase: true
      port: 80
      sourceLabels: {app: checkout}
      sourceNamespace: shop
    - uri: {}
    route: [{destination: {host: payment, subset: v1, port: {number: 9090}}}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local]
  http:
  - name: all
    match:
    - name: first
      uri: {prefix: /api}
      scheme: {exact: http}
      method: {regex: "GET|HEAD"}
      authority: {exact: payment}
      headers: {x-beta-user: {exact: "true"}, x-trace: present}
      queryParams: {Debug: {prefix: "1"}}
      withoutHeaders: {x-internal: present}
      ignoreUriCase: true
      port: 80
      sourceLabels: {app: checkout}
      sourceNamespace: shop
    - {}
    route: [{destination: {host: payment.shop.svc.cluster.local, subset: v1, port: 9090}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &[],
        },
        Case {
            name: "a match that can never hold is dropped, and a route left without matches too",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - match:
    - uri: {regex: "/api/(v1|v2"}
    - uri: {exact: /ok}
    - headers: {x-a: {exact: a, prefix: b}}
    - port: 70000
    - gateways: [shop/ingress]
    directResponse: {status: 204}
  - match: [{uri: {regex: "("}}]
    directResponse: {status: 204}
  - directResponse: {status: 200, body: {string: fine}}
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local]
  http:
  - match: [{uri: {exact: /ok}}]
    directResponse: {status: 204}
  - directResponse: {status: 200, body: fine}
"#,
            findings: &[
                "WA0205 VirtualService shop/payment spec.http[0].match[0].uri.regex",
                "WA0103 VirtualService shop/payment spec.http[0].match[2].headers.x-a",
                "WA0103 VirtualService shop/payment spec.http[0].match[3].port",
                "WA0207 VirtualService shop/payment spec.http[0].match[4].gateways",
                "WA0205 VirtualService shop/payment spec.http[1].match[0].uri.regex",
                "WA0103 VirtualService shop/payment spec.http[1].match",
            ],
        },
        Case {
            name: "gateway-only VirtualServices and hosts with no Service are not for the mesh",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress, namespace: shop}
spec:
  hosts: [payment]
  gateways: [shop/public]
  http: [{route: [{destination: {host: payment}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.example.com]
  tcp: [{route: [{destination: {host: payment}}]}]
"#,
            routing: "{}",
            findings: &[
                "WA0207 VirtualService shop/ingress spec.gateways",
                "WA0206 VirtualService shop/external spec.tcp",
                "WA0202 VirtualService shop/external spec.hosts[0]",
                "WA0202 VirtualService shop/external spec.hosts",
            ],
        },
        Case {
            name: "routes for a Service without a waypoint are kept, with a warning",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: legacy, namespace: shop}
spec:
  hosts: [legacy]
  http: [{route: [{destination: {host: legacy}}]}]
"#,
            routing: r#"
virtualServices:
- name: legacy
  namespace: shop
  hosts: [legacy.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: legacy.shop.svc.cluster.local}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &["WA0208 VirtualService shop/legacy spec.hosts[0]"],
        },
    ]);
}

#[test]
fn virtual_service_actions() {
    check(&[
        Case {
            name: "weights: a lone destination gets 100, unset is 0, negative is refused",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - route: [{destination: {host: payment, subset: v1}, weight: 30}]
  - route:
    - {destination: {host: payment, subset: v1}, weight: -5}
    - {destination: {host: payment, subset: v2}}
    - destination: {host: payment, subset: v3}
      weight: 7
      headers: {request: {set: {X-Canary: "1"}}}
  - route:
    - {destination: {host: payment, port: {number: 0}}}
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: payment.shop.svc.cluster.local, subset: v1}, weight: 100}]
    retries: $RETRIES
  - route:
    - {destination: {host: payment.shop.svc.cluster.local, subset: v1}, weight: 0}
    - {destination: {host: payment.shop.svc.cluster.local, subset: v2}, weight: 0}
    - destination: {host: payment.shop.svc.cluster.local, subset: v3}
      weight: 7
      headers: {request: {set: {x-canary: "1"}}}
    retries: $RETRIES
"#,
            findings: &[
                "WA0103 VirtualService shop/payment spec.http[1].route[0].weight",
                "WA0103 VirtualService shop/payment spec.http[2].route[0].destination.port.number",
                "WA0103 VirtualService shop/payment spec.http[2].route",
            ],
        },
        Case {
            name: "redirect, direct response, rewrite; several actions: Istio's precedence",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: checkout, scheme: https, port: 8443}
  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /here, redirectCode: 308}
  - match: [{uri: {prefix: /gone}}]
    directResponse: {status: 410, body: {string: gone}}
    route: [{destination: {host: payment}}]
  - match: [{uri: {prefix: /teapot}}]
    directResponse: {status: 99}
  - rewrite:
      uri: /v2
      authority: payment.internal
      uriRegexRewrite: {match: "^/api/(.*)", rewrite: '/\1'}
    route: [{destination: {host: payment}}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: checkout, scheme: https, port: 8443, redirectCode: 301}
  - match: [{uri: {prefix: /moved}}]
    redirect: {uri: /here, redirectCode: 308}
  - match: [{uri: {prefix: /gone}}]
    directResponse: {status: 410, body: gone}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    rewrite:
      uri: /v2
      authority: payment.internal
      uriRegex: {match: "^/api/(.*)", rewrite: '/\1'}
    retries: $RETRIES
"#,
            findings: &[
                "WA0103 VirtualService shop/payment spec.http[2]",
                "WA0103 VirtualService shop/payment spec.http[3].directResponse.status",
            ],
        },
        Case {
            name: "timeouts and retries",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx, 503"}
    route: [{destination: {host: payment}}]
  - timeout: 1m
    retries: {attempts: 0}
    route: [{destination: {host: payment}}]
  - timeout: fast
    retries: {attempts: 1, perTryTimeout: 2x}
    route: [{destination: {host: payment}}]
  - timeout: 0s
    retries: {attempts: 4, retryOn: gateway-error}
    route: [{destination: {host: payment}}]
  - retries: {attempts: 2, retryOn: "unavailable,deadline-exceeded,5xxx,envoy-ratelimited,999,resource-exhausted"}
    route: [{destination: {host: payment}}]
  - retries: {attempts: 2, retryOn: "5xxx"}
    route: [{destination: {host: payment}}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    timeoutMs: 1500
    retries: {attempts: 3, perTryTimeoutMs: 500, retryOn: [5xx, "503", retriable-status-codes]}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    timeoutMs: 60000
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: {attempts: 1, retryOn: [connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes, "503"]}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: {attempts: 4, retryOn: [gateway-error]}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: {attempts: 2, retryOn: [unavailable, deadline-exceeded, resource-exhausted]}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: {attempts: 2, retryOn: [connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes, "503"]}
"#,
            findings: &[
                "WA0103 VirtualService shop/payment spec.http[2].retries.perTryTimeout",
                "WA0103 VirtualService shop/payment spec.http[2].timeout",
                "WA0103 VirtualService shop/payment spec.http[4].retries.retryOn",
                "WA0206 VirtualService shop/payment spec.http[4].retries.retryOn",
                "WA0103 VirtualService shop/payment spec.http[4].retries.retryOn",
                "WA0103 VirtualService shop/payment spec.http[5].retries.retryOn",
            ],
        },
        Case {
            name: "faults, mirrors, headers",
            input: r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - fault:
      delay: {fixedDelay: 5s}
      abort: {httpStatus: 503, percentage: {value: 10.5}}
    mirror: {host: checkout}
    mirrorPercentage: {value: 25}
    headers:
      request: {set: {X-Env: prod}, add: {X-Trace: "1"}, remove: [Cookie, cookie]}
      response: {remove: [Server]}
    route: [{destination: {host: payment}}]
  - fault:
      delay: {fixedDelay: 1s, percentage: {value: 150}}
      abort: {grpcStatus: UNAVAILABLE}
    mirrors:
    - destination: {host: checkout, subset: v2}
    - destination: {host: ledger.bank}
      percentage: {value: 1}
    route: [{destination: {host: payment}}]
  - fault: {abort: {grpcStatus: Unavailable}}
    route: [{destination: {host: payment}}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  hosts: [payment.shop.svc.cluster.local]
  http:
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: $RETRIES
    fault:
      delay: {fixedDelayMs: 5000, percentage: 100}
      abort: {httpStatus: 503, percentage: 10.5}
    mirrors: [{destination: {host: checkout.shop.svc.cluster.local}, percentage: 25}]
    headers:
      request: {set: {x-env: prod}, add: {x-trace: "1"}, remove: [cookie]}
      response: {remove: [server]}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: $RETRIES
    fault:
      abort: {httpStatus: 200, grpcStatus: 14, percentage: 100}
    mirrors:
    - {destination: {host: checkout.shop.svc.cluster.local, subset: v2}, percentage: 100}
    - {destination: {host: ledger.bank.svc.cluster.local}, percentage: 1}
  - route: [{destination: {host: payment.shop.svc.cluster.local}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &[
                "WA0103 VirtualService shop/payment spec.http[1].fault.delay.percentage.value",
                "WA0103 VirtualService shop/payment spec.http[2].fault.abort.grpcStatus",
            ],
        },
    ]);
}

#[test]
fn virtual_services_in_istio_merge_order() {
    let (routing, findings) = load(&format!(
        "{SERVICES}{}",
        r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a-newest, namespace: shop, creationTimestamp: "2024-05-02T00:00:00Z"}
spec: {hosts: [payment], http: [{directResponse: {status: 200}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: z-oldest, namespace: shop, creationTimestamp: "2024-05-01T00:00:00Z"}
spec: {hosts: [payment], http: [{directResponse: {status: 200}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-same-age, namespace: shop, creationTimestamp: "2024-05-01T00:00:00Z"}
spec: {hosts: [payment], http: [{directResponse: {status: 200}}]}
"#
    ));
    assert!(findings.is_empty(), "{findings:#?}");
    let names: Vec<_> = routing.virtual_services.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["b-same-age", "z-oldest", "a-newest"]);
}

#[test]
fn http_routes_in_the_mesh() {
    check(&[
        Case {
            name: "one route per match, in Gateway API precedence; weights; the default match",
            input: r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payment, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: payment}]
  rules:
  - backendRefs: [{name: payment, port: 80}]
  - name: api
    matches:
    - path: {type: PathPrefix, value: /api}
    - path: {type: Exact, value: /api/health}
      method: GET
    backendRefs:
    - {name: payment, port: 80, weight: 90}
    - {name: checkout, port: 80}
  - matches:
    - path: {value: /api}
      headers: [{name: X-Version, value: "2"}, {name: x-version, value: "3"}]
      queryParams: [{type: RegularExpression, name: Mode, value: "a|b"}]
    backendRefs: [{name: payment, port: 80}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  kind: HTTPRoute
  hosts: [payment.shop.svc.cluster.local]
  http:
  - name: api
    match: [{uri: {exact: /api/health}, method: {exact: GET}}]
    route:
    - {destination: {host: payment.shop.svc.cluster.local, port: 80}, weight: 90}
    - {destination: {host: checkout.shop.svc.cluster.local, port: 80}, weight: 1}
    retries: $RETRIES
  - match:
    - uri: {pathPrefix: /api}
      headers: {x-version: {exact: "2"}}
      queryParams: {Mode: {regex: "a|b"}}
    route: [{destination: {host: payment.shop.svc.cluster.local, port: 80}, weight: 100}]
    retries: $RETRIES
  - name: api
    match: [{uri: {pathPrefix: /api}}]
    route:
    - {destination: {host: payment.shop.svc.cluster.local, port: 80}, weight: 90}
    - {destination: {host: checkout.shop.svc.cluster.local, port: 80}, weight: 1}
    retries: $RETRIES
  - match: [{uri: {pathPrefix: /}}]
    route: [{destination: {host: payment.shop.svc.cluster.local, port: 80}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &[],
        },
        Case {
            name: "filters and timeouts",
            input: r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: payment, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: payment, port: 80}]
  rules:
  - matches: [{path: {value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: checkout, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {value: /v1}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-Env, value: prod}], add: [{name: X-Trace, value: "1"}], remove: [Cookie]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [Server]}
    - type: URLRewrite
      urlRewrite: {hostname: payment.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: checkout, port: 80}, fraction: {numerator: 1, denominator: 4}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: ledger, namespace: bank, port: 80}}
    backendRefs:
    - name: payment
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Backend, value: payment}]}}]
    timeouts: {request: 10s, backendRequest: 2s}
  - matches: [{path: {type: Exact, value: /login}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /auth/login}}
    backendRefs: [{name: payment, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: bank}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: ledger}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  kind: HTTPRoute
  hosts: [payment.shop.svc.cluster.local]
  http:
  - match: [{uri: {exact: /login}, port: 80}]
    route: [{destination: {host: payment.shop.svc.cluster.local, port: 80}, weight: 100}]
    rewrite: {fullPath: /auth/login}
    retries: $RETRIES
  - match: [{uri: {pathPrefix: /old}, port: 80}]
    redirect: {uriPrefix: /new, authority: checkout, scheme: https, redirectCode: 302}
  - match: [{uri: {pathPrefix: /v1}, port: 80}]
    route:
    - destination: {host: payment.shop.svc.cluster.local, port: 80}
      weight: 100
      headers: {request: {set: {x-backend: payment}}}
    rewrite: {uri: /v2, authority: payment.internal}
    timeoutMs: 10000
    retries: {attempts: 2, perTryTimeoutMs: 2000, retryOn: [connect-failure, refused-stream, unavailable, cancelled, retriable-status-codes, "503"]}
    mirrors:
    - {destination: {host: checkout.shop.svc.cluster.local, port: 80}, percentage: 25}
    - {destination: {host: ledger.bank.svc.cluster.local, port: 80}, percentage: 100}
    headers:
      request: {set: {x-env: prod}, add: {x-trace: "1"}, remove: [cookie]}
      response: {remove: [server]}
"#,
            findings: &[],
        },
        Case {
            name: "a backend in another namespace needs a ReferenceGrant there",
            input: r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payment, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: payment, port: 80}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: ledger, namespace: bank, port: 80}}
    backendRefs: [{name: payment, port: 80}, {name: ledger, namespace: bank, port: 80}]
---
# Not for this route: another namespace's routes, and Gateways.
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: others, namespace: bank}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: web}
  - {group: gateway.networking.k8s.io, kind: Gateway, namespace: shop}
  to: [{group: "", kind: Service}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  kind: HTTPRoute
  hosts: [payment.shop.svc.cluster.local]
  http:
  - match: [{uri: {pathPrefix: /}, port: 80}]
    route: [{destination: {host: payment.shop.svc.cluster.local, port: 80}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &[
                "WA0209 HTTPRoute shop/payment spec.rules[0].filters[0].requestMirror.backendRef.namespace",
                "WA0209 HTTPRoute shop/payment spec.rules[0].backendRefs[1].namespace",
            ],
        },
        Case {
            name: "gateway parents are not mesh routes; a consumer route narrows to its clients",
            // (shop/waypoint, the Gateway of the first parent, is among SERVICES.)
            input: r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-waypoint, namespace: shop}
spec:
  parentRefs: [{name: waypoint}, {name: public, namespace: ingress}]
  rules: [{backendRefs: [{name: payment, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payment-from-bank, namespace: bank}
spec:
  parentRefs:
  - {kind: Service, group: core, name: payment, namespace: shop, sectionName: grpc}
  - {kind: Service, group: "", name: ledger}
  - {kind: Service, group: "", name: missing}
  rules: [{backendRefs: [{name: ledger, port: 80}]}]
"#,
            routing: r#"
virtualServices:
- name: payment-from-bank
  namespace: bank
  kind: HTTPRoute
  hosts: [ledger.bank.svc.cluster.local]
  http:
  - match: [{uri: {pathPrefix: /}}]
    route: [{destination: {host: ledger.bank.svc.cluster.local, port: 80}, weight: 100}]
    retries: $RETRIES
- name: payment-from-bank
  namespace: bank
  kind: HTTPRoute
  hosts: [payment.shop.svc.cluster.local]
  http:
  - match: [{uri: {pathPrefix: /}, port: 9090, sourceNamespace: bank}]
    route: [{destination: {host: ledger.bank.svc.cluster.local, port: 80}, weight: 100}]
    retries: $RETRIES
"#,
            findings: &[
                "WA0207 HTTPRoute shop/to-waypoint spec.parentRefs[0]",
                "WA0207 HTTPRoute shop/to-waypoint spec.parentRefs[1]",
                "WA0202 HTTPRoute bank/payment-from-bank spec.parentRefs[2]",
            ],
        },
        Case {
            name: "rules that cannot forward answer 500",
            input: r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payment, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: payment}]
  rules:
  - matches: [{path: {type: Exact, value: /a}}]
  - matches: [{path: {type: Exact, value: /b}}]
    backendRefs: [{name: payment, port: 80, weight: 0}, {kind: ServiceImport, group: multicluster.x-k8s.io, name: far}]
  - matches: [{path: {type: Exact, value: /c}}]
    filters: [{type: ExtensionRef, extensionRef: {group: x, kind: Auth, name: strict}}]
    backendRefs: [{name: payment, port: 80}]
  - matches: [{path: {type: RegularExpression, value: "/d("}}]
    backendRefs: [{name: nowhere, port: 80}]
"#,
            routing: r#"
virtualServices:
- name: payment
  namespace: shop
  kind: HTTPRoute
  hosts: [payment.shop.svc.cluster.local]
  http:
  - match: [{uri: {exact: /a}}]
    directResponse: {status: 500}
  - match: [{uri: {exact: /b}}]
    directResponse: {status: 500}
  - match: [{uri: {exact: /c}}]
    directResponse: {status: 500}
"#,
            findings: &[
                "WA0206 HTTPRoute shop/payment spec.rules[1].backendRefs[1].kind",
                "WA0103 HTTPRoute shop/payment spec.rules[1].backendRefs",
                "WA0206 HTTPRoute shop/payment spec.rules[2].filters[0].type",
                "WA0205 HTTPRoute shop/payment spec.rules[3].matches[0].path.value",
                "WA0103 HTTPRoute shop/payment spec.rules[3].matches",
            ],
        },
    ]);
}

#[test]
fn destination_rules() {
    check(&[
        Case {
            name: "policies, subsets and Istio's defaults",
            input: r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment.shop
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: X-User}}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 0, maxRetries: 3, idleTimeout: 90s, maxConcurrentStreams: 50}
    outlierDetection: {consecutiveGatewayErrors: 7}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: LEAST_CONN}
      outlierDetection: {consecutive5xxErrors: 0, interval: 1m, baseEjectionTime: 2m, maxEjectionPercent: 50, minHealthPercent: 20}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 0s}}}
  - name: v3
    trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
  - name: v1
  - labels: {version: v4}
"#,
            routing: r#"
destinationRules:
- name: payment
  namespace: shop
  host: payment.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    connectionPool: {maxConnections: 100, http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRetries: 3, maxConcurrentStreams: 50, connectTimeoutMs: 250, idleTimeoutMs: 90000}
    outlierDetection:
      consecutive5xxErrors: 5
      consecutiveGatewayErrors: 7
      intervalMs: 10000
      baseEjectionTimeMs: 30000
      maxEjectionPercent: 10
      minHealthPercent: 0
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
      outlierDetection: {intervalMs: 60000, baseEjectionTimeMs: 120000, maxEjectionPercent: 50, minHealthPercent: 20}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session, ttlMs: 0}}}}
  - name: v3
    labels: {}
    trafficPolicy: {loadBalancer: {consistentHash: useSourceIp}}
"#,
            findings: &[
                "WA0103 DestinationRule shop/payment spec.subsets[3].name",
                "WA0103 DestinationRule shop/payment spec.subsets[4].name",
            ],
        },
        Case {
            name: "consistent-hash keys: a cookie made with a path and ttl, a query parameter",
            input: r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: session, path: /shop, ttl: 1h}}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: user}}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: soon}}}}
"#,
            routing: r#"
destinationRules:
- name: payment
  namespace: shop
  host: payment.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: session, path: /shop, ttlMs: 3600000}}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: user}}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session}}}}
"#,
            findings: &[
                "WA0103 DestinationRule shop/payment spec.subsets[1].trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            ],
        },
        Case {
            name: "port-level settings, at the rule and in a subset",
            input: r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevelSettings:
    - port: {number: 9090}
      connectionPool: {tcp: {maxConnections: 1}}
    - port: {number: 8080}
    - port: {number: 9090}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 80}
        loadBalancer: {simple: LEAST_REQUEST}
        outlierDetection: {consecutive5xxErrors: 2}
"#,
            routing: r#"
destinationRules:
- name: payment
  namespace: shop
  host: payment.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    portLevel:
    - port: 9090
      connectionPool: {maxConnections: 1}
    - port: 8080
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      portLevel:
      - port: 80
        loadBalancer: {simple: LEAST_REQUEST}
        outlierDetection:
          consecutive5xxErrors: 2
          intervalMs: 10000
          baseEjectionTimeMs: 30000
          maxEjectionPercent: 10
          minHealthPercent: 0
"#,
            findings: &[
                "WA0103 DestinationRule shop/payment spec.trafficPolicy.portLevelSettings[2].port.number",
            ],
        },
        Case {
            name: "what is refused costs only itself",
            input: r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: checkout, namespace: shop}
spec:
  host: checkout
  trafficPolicy:
    loadBalancer: {simple: PASSTHROUGH}
    connectionPool: {tcp: {maxConnections: -1, connectTimeout: never, tcpKeepalive: {time: 7200s}, maxConnectionDuration: 1h}, http: {idleTimeout: later, maxConcurrentStreams: -5, h2UpgradePolicy: UPGRADE}}
    outlierDetection: {interval: soon, maxEjectionPercent: 120}
    portLevelSettings: [{port: {number: 70000}}, {loadBalancer: {simple: RANDOM}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external, namespace: shop}
spec:
  host: api.example.com
"#,
            routing: r#"
destinationRules:
- name: checkout
  namespace: shop
  host: checkout.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 5
      intervalMs: 10000
      baseEjectionTimeMs: 30000
      maxEjectionPercent: 10
      minHealthPercent: 0
"#,
            findings: &[
                "WA0206 DestinationRule shop/checkout spec.trafficPolicy.loadBalancer.simple",
                "WA0206 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
                "WA0206 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration",
                "WA0206 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.http.h2UpgradePolicy",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.tcp.maxConnections",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.http.maxConcurrentStreams",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.tcp.connectTimeout",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.connectionPool.http.idleTimeout",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.outlierDetection.interval",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.outlierDetection.maxEjectionPercent",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.portLevelSettings[0].port.number",
                "WA0103 DestinationRule shop/checkout spec.trafficPolicy.portLevelSettings[1].port.number",
                "WA0202 DestinationRule shop/external spec.host",
            ],
        },
    ]);
}

#[test]
fn waypoint_authorization_policies() {
    check(&[
        Case {
            name: "targets, sources, operations, conditions",
            input: r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment, namespace: shop}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  - {kind: Service, group: "", name: payment}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/checkout"], notNamespaces: [test]}
    - source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.1.0.0/16], notPrincipals: ["*/sa/bot"], namespaces: [shop]}
    to:
    - operation: {methods: [POST], notMethods: [DELETE], paths: ["/api/*"], notPaths: [/api/admin], hosts: [payment], notHosts: [x], ports: ["80"], notPorts: ["9090"]}
    when:
    - {key: "request.headers[x-tenant]", values: [acme]}
    - {key: source.namespace, notValues: [test]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all-legacy, namespace: shop}
spec:
  targetRef: {kind: Service, group: core, name: legacy}
  action: DENY
  rules: [{}]
"#,
            routing: r#"
authorizations:
- name: deny-all-legacy
  namespace: shop
  targets: [{service: legacy}]
  action: DENY
  rules: [{}]
- name: payment
  namespace: shop
  targets: [{gateway: waypoint}, {service: payment}]
  action: ALLOW
  rules:
  - from:
    - {principals: ["cluster.local/ns/shop/sa/checkout"], notNamespaces: [test]}
    - {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.1.0.0/16], notPrincipals: ["*/sa/bot"], namespaces: [shop]}
    to:
    - {methods: [POST], notMethods: [DELETE], paths: ["/api/*"], notPaths: [/api/admin], hosts: [payment], notHosts: [x], ports: [80], notPorts: [9090]}
    when:
    - {key: "request.headers[x-tenant]", values: [acme]}
    - {key: source.namespace, notValues: [test]}
"#,
            findings: &["WA0208 AuthorizationPolicy shop/deny-all-legacy spec.targetRef"],
        },
        Case {
            name: "what a waypoint cannot evaluate: ALLOW rules never match, DENY rules deny more",
            input: r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules:
  - when: [{key: "request.auth.claims[iss]", values: [me]}]
  - from: [{source: {requestPrincipals: ["*"]}}]
  - to: [{operation: {ports: [http]}}, {operation: {ports: ["99999"], methods: [GET]}}]
  - to: [{operation: {ports: ["80", x], notPorts: [y]}}]
  - from: [{source: {serviceAccounts: [shop/checkout]}}]
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: [1.2.3.4], namespaces: [test]}}]
    to: [{operation: {ports: [http], paths: [/admin]}}]
    when: [{key: experimental.envoy.filters.x, values: ["1"]}, {key: request.method, values: [GET]}]
"#,
            routing: r#"
authorizations:
- name: allow
  namespace: shop
  targets: [{gateway: waypoint}]
  action: ALLOW
  rules:
  - to: [{ports: [80]}]
  - to: [{methods: [GET]}]
- name: deny
  namespace: shop
  targets: [{gateway: waypoint}]
  action: DENY
  rules:
  - from: [{namespaces: [test]}]
    to: [{paths: [/admin]}]
    when: [{key: request.method, values: [GET]}]
"#,
            findings: &[
                "WA0105 AuthorizationPolicy shop/allow spec.rules[0].when[0] (request.auth.claims[iss])",
                "WA0105 AuthorizationPolicy shop/allow spec.rules[1].from[0].source.requestPrincipals",
                "WA0103 AuthorizationPolicy shop/allow spec.rules[2].to[0].operation.ports",
                "WA0105 AuthorizationPolicy shop/allow spec.rules[2].to[0].operation.ports",
                "WA0103 AuthorizationPolicy shop/allow spec.rules[2].to[1].operation.ports",
                "WA0105 AuthorizationPolicy shop/allow spec.rules[2].to[1].operation.ports",
                "WA0105 AuthorizationPolicy shop/allow spec.rules[2].to",
                "WA0103 AuthorizationPolicy shop/allow spec.rules[3].to[0].operation.ports",
                "WA0103 AuthorizationPolicy shop/allow spec.rules[3].to[0].operation.notPorts",
                "WA0105 AuthorizationPolicy shop/allow spec.rules[4].from[0].source.serviceAccounts",
                "WA0103 AuthorizationPolicy shop/deny spec.rules[0].to[0].operation.ports",
                "WA0105 AuthorizationPolicy shop/deny spec.rules[0].to[0].operation.ports",
                "WA0105 AuthorizationPolicy shop/deny spec.rules[0].from[0].source.remoteIpBlocks, spec.rules[0].when[0] (experimental.envoy.filters.x)",
            ],
        },
        Case {
            name: "unsupported targets and actions are skipped; selector policies are ztunnel's",
            input: r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: entry, namespace: shop}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: api}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-namespace, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: ledger, namespace: bank}, {kind: Service, name: payment}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: payment}]
  action: AUDIT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: workloads, namespace: shop}
spec:
  selector: {matchLabels: {app: payment}}
"#,
            routing: r#"
authorizations:
- name: other-namespace
  namespace: shop
  targets: [{service: payment}]
  action: ALLOW
"#,
            findings: &[
                "WA0206 AuthorizationPolicy shop/entry spec.targetRefs[0].kind",
                "WA0206 AuthorizationPolicy shop/entry spec.targetRefs",
                "WA0103 AuthorizationPolicy shop/other-namespace spec.targetRefs[0].namespace",
                "WA0103 AuthorizationPolicy shop/audit spec.action",
            ],
        },
    ]);
}

/// The L7 demo's manifests: exactly this routing, and nothing to report from translation or
/// analysis.
#[test]
fn the_waypoint_fixture_translates_exactly() {
    let mut snapshot = Snapshot::default();
    let mut findings = Vec::new();
    read_documents("fixture", include_str!("../../fixtures/waypoint.yaml"), &mut snapshot, &mut findings);
    let (config, more) = translate(&snapshot);
    findings.extend(more);
    findings.extend(analyze(&snapshot));
    assert!(findings.is_empty(), "{findings:#?}");
    let expected = model(&format!(
        r#"
virtualServices:
- name: payment-service
  namespace: production
  hosts: [payment-service.production.svc.cluster.local]
  http:
  - name: beta-users
    match: [{{headers: {{x-beta-user: {{exact: "true"}}}}}}]
    route: [{{destination: {{host: payment-service.production.svc.cluster.local, subset: v2}}, weight: 100}}]
    retries: {RETRIES}
  - name: default
    route:
    - {{destination: {{host: payment-service.production.svc.cluster.local, subset: v1}}, weight: 95}}
    - {{destination: {{host: payment-service.production.svc.cluster.local, subset: v2}}, weight: 5}}
    timeoutMs: 3000
    retries: {RETRIES}
destinationRules:
- name: payment-service
  namespace: production
  host: payment-service.production.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
authorizations:
- name: payment-charge
  namespace: production
  targets: [{{gateway: waypoint}}]
  action: ALLOW
  rules:
  - from: [{{principals: ["cluster.local/ns/production/sa/checkout-service"]}}]
    to: [{{methods: [POST], paths: [/api/v1/charge]}}]
"#
    ))
    .unwrap();
    assert_eq!(shown(&config.routing), shown(&expected));
    assert_eq!(config.routing, expected);
    let payment = config.services.iter().find(|s| s.name == "payment-service").unwrap();
    assert_eq!(payment.waypoint.as_deref(), Some("waypoint"));
    assert!(config.authorizations.is_empty(), "the waypoint's policy is not ztunnel's");
}

#[test]
fn durations() {
    for (text, ms) in [
        ("1s", 1000),
        ("500ms", 500),
        ("1.5s", 1500),
        ("1m", 60_000),
        ("1h30m", 5_400_000),
        (".25s", 250),
        ("100us", 1),
        ("0s", 0),
        ("0", 0),
    ] {
        assert_eq!(duration_ms(text), Ok(ms), "{text}");
    }
    for bad in ["", "1", "s", "-1s", "1.2.3s", "1d", "fast", "1 s"] {
        assert!(duration_ms(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn host_names() {
    for (host, fq) in [
        ("payment", "payment.shop.svc.cluster.local"),
        ("payment.bank", "payment.bank.svc.cluster.local"),
        ("payment.bank.svc", "payment.bank.svc.cluster.local"),
        ("payment.bank.svc.cluster.local", "payment.bank.svc.cluster.local"),
        ("payment.bank.svc.cluster.local.", "payment.bank.svc.cluster.local"),
        ("api.example.com", "api.example.com"),
    ] {
        assert_eq!(fqdn(host, "shop"), fq);
    }
}
