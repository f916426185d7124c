//! L7 configuration for waypoints: what the controller makes of VirtualService, HTTPRoute,
//! DestinationRule and the AuthorizationPolicies attached to a waypoint or a Service.
//!
//! The controller does the Kubernetes-shaped work (short host names resolved to FQDNs, defaults
//! filled, HTTPRoute turned into the same route form as a VirtualService, durations in
//! milliseconds), so a waypoint evaluates this model as it is. Everything here is plain data;
//! the waypoint compiles regexes and weights into its own structures when a config arrives.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::{Action, Source};

/// All L7 configuration of the mesh. Waypoints pick what concerns the services they serve.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Routing {
    /// VirtualServices and HTTPRoutes, in the order routing must consider them (oldest first,
    /// as Istio merges several routes for one host).
    #[serde(default)]
    pub virtual_services: Vec<VirtualService>,
    #[serde(default)]
    pub destination_rules: Vec<DestinationRule>,
    /// AuthorizationPolicies with `targetRefs` to a waypoint (Gateway) or a Service.
    #[serde(default)]
    pub authorizations: Vec<L7Authorization>,
}

impl Routing {
    pub fn is_empty(&self) -> bool {
        self.virtual_services.is_empty()
            && self.destination_rules.is_empty()
            && self.authorizations.is_empty()
    }
}

/// Where a route table came from, for logs and `/config_dump`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteKind {
    #[default]
    VirtualService,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
}

/// The HTTP routes of one VirtualService (or one HTTPRoute) for the services in `hosts`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub kind: RouteKind,
    /// Service FQDNs (`name.namespace.svc.cluster.local`).
    pub hosts: Vec<String>,
    /// Ordered: the first route whose match holds handles the request.
    #[serde(default)]
    pub http: Vec<HttpRoute>,
}

impl VirtualService {
    /// `VirtualService production/payment`, how messages name it.
    pub fn display_name(&self) -> String {
        let kind = match self.kind {
            RouteKind::VirtualService => "VirtualService",
            RouteKind::HttpRoute => "HTTPRoute",
        };
        format!("{kind} {}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must hold (ORed); none: every request.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RequestMatch>,
    /// Weighted destinations. Exactly one of `route`, `redirect`, `directResponse` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Bounds the whole request, retries included. None: no timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// None: no retries. The controller fills Istio's default policy when the object says
    /// nothing (see [`Retries`]), so an explicit `attempts: 0` is the only way to None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    /// Header operations for every destination of the route.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
}

/// A request match: every field set must hold (ANDed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The path, without the query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Header names lower-case.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    /// The request must NOT carry a matching header.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// `uri` compared case-insensitively.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// The service port the request arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Labels the source workload must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

/// How a string is matched. Regexes are RE2 syntax and must match the whole value (Istio's
/// semantics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
    /// Gateway API `PathPrefix`: a prefix of whole path segments (`/api` matches `/api` and
    /// `/api/x`, not `/apix`).
    PathPrefix(String),
    /// The header or parameter is present, whatever its value.
    Present,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    /// Relative weight; the controller fills 100 for a lone destination.
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// Service FQDN.
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Service port; none: the port the request arrived on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    #[serde(default, skip_serializing_if = "HeaderOperations::is_empty")]
    pub request: HeaderOperations,
    #[serde(default, skip_serializing_if = "HeaderOperations::is_empty")]
    pub response: HeaderOperations,
}

impl Headers {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// Applied in the order remove, set, add (names lower-case).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderOperations {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// Replaces the whole path, whatever the match (Istio's `redirect.uri`; HTTPRoute
    /// `ReplaceFullPath`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// HTTPRoute `ReplacePrefixMatch`: replaces the matched prefix, keeping the rest of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 unless set.
    pub redirect_code: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// VirtualService `rewrite.uri` / HTTPRoute `ReplacePrefixMatch`: replaces the matched
    /// prefix when the route matched on a prefix, the whole path otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// HTTPRoute `ReplaceFullPath`: replaces the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_path: Option<String>,
    /// `uriRegexRewrite`: every match of `regex` in the path replaced by `rewrite` (`\1`
    /// references groups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex: Option<RegexRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub regex: String,
    pub rewrite: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    /// Istio/Envoy conditions ([`RETRY_CONDITIONS`]: `5xx`, `gateway-error`,
    /// `connect-failure`, `reset`, `retriable-4xx`, `refused-stream`, `retriable-status-codes`,
    /// and gRPC's `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`), or bare status codes (the codes `retriable-status-codes` retries). Istio's default policy, which the controller
    /// fills when a route has no `retries`: 2 attempts on `connect-failure`, `refused-stream`,
    /// `unavailable`, `cancelled`, `retriable-status-codes`, `503`.
    #[serde(default)]
    pub retry_on: Vec<String>,
}

/// The `retryOn` conditions the waypoint evaluates (Envoy's names); a bare status code is
/// retried under `retriable-status-codes`.
pub const RETRY_CONDITIONS: [&str; 12] = [
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Istio's retry conditions for a route that names none (its `DefaultPolicy`).
pub const ISTIO_DEFAULT_RETRY_ON: [&str; 6] =
    ["connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes", "503"];

impl Retries {
    /// Istio's retry policy for a route that says nothing about retries, and for a service
    /// that no route covers: 2 retries on [`ISTIO_DEFAULT_RETRY_ON`], no per-try timeout.
    pub fn istio_default() -> Self {
        Retries {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: ISTIO_DEFAULT_RETRY_ON.map(String::from).to_vec(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay_ms: u64,
    /// 0–100; the controller fills 100 when unset.
    pub percentage: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// 200 with `grpc_status`: what Envoy answers a request that is not a gRPC call then.
    pub http_status: u16,
    /// `grpcStatus` (0..=16): a gRPC call is answered trailers-only with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    pub percentage: f64,
}

/// gRPC's status codes by name (`grpcStatus: UNAVAILABLE`), index = code.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub destination: Destination,
    /// 0–100 of requests copied; the controller fills 100 when unset.
    pub percentage: f64,
}

/// A DestinationRule: subsets and traffic policy for one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    /// Service FQDN.
    pub host: String,
    #[serde(default, skip_serializing_if = "TrafficPolicy::is_empty")]
    pub traffic_policy: TrafficPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
}

impl DestinationRule {
    /// The policy for `subset` on service port `port`, merged as Istio does: the rule's policy,
    /// replaced as a whole by its port-level settings for `port` (they do not inherit: an
    /// omitted field is the default); the subset's own fields over that, field by field; and
    /// the subset's port-level settings for `port`, again replacing all.
    pub fn policy_for(&self, subset: Option<&str>, port: u16) -> TrafficPolicy {
        let rule = self.traffic_policy.at_port(port);
        let own = subset.and_then(|name| self.subsets.iter().find(|s| s.name == name));
        let Some(p) = own.and_then(|s| s.traffic_policy.as_ref()) else { return rule };
        if let Some(at_port) = p.port_level.iter().find(|l| l.port == port) {
            return at_port.policy();
        }
        TrafficPolicy {
            load_balancer: p.load_balancer.clone().or(rule.load_balancer),
            connection_pool: p.connection_pool.clone().or(rule.connection_pool),
            outlier_detection: p.outlier_detection.clone().or(rule.outlier_detection),
            port_level: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    /// Labels an endpoint must carry to belong to the subset.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// `portLevelSettings`: per service port, a policy that replaces this one on that port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level: Vec<PortTrafficPolicy>,
}

impl TrafficPolicy {
    pub fn is_empty(&self) -> bool {
        self.load_balancer.is_none()
            && self.connection_pool.is_none()
            && self.outlier_detection.is_none()
            && self.port_level.is_empty()
    }

    /// This policy on service port `port`: its port-level settings for the port if it has
    /// some (in place of all of its own fields), else its own fields.
    pub fn at_port(&self, port: u16) -> TrafficPolicy {
        match self.port_level.iter().find(|l| l.port == port) {
            Some(at_port) => at_port.policy(),
            // Field by field: the port-level list is not needed once resolved (this runs per
            // request), so it is not cloned.
            None => TrafficPolicy {
                load_balancer: self.load_balancer.clone(),
                connection_pool: self.connection_pool.clone(),
                outlier_detection: self.outlier_detection.clone(),
                port_level: Vec::new(),
            },
        }
    }
}

/// One entry of `portLevelSettings`: the policy of one service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

impl PortTrafficPolicy {
    fn policy(&self) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: self.load_balancer.clone(),
            connection_pool: self.connection_pool.clone(),
            outlier_detection: self.outlier_detection.clone(),
            port_level: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    Simple(SimpleLb),
    ConsistentHash(HashKey),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    RoundRobin,
    /// Also what Istio's `LEAST_CONN` means.
    LeastRequest,
    Random,
}

/// What a consistent-hash load balancer hashes. A request without the key (the header,
/// cookie or query parameter absent) goes to a random endpoint, as in Envoy — but for a cookie
/// with a `ttl`, which is made up and set on the response so the client's next requests stick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    HttpHeaderName(String),
    HttpCookie(HashCookie),
    UseSourceIp,
    HttpQueryParameterName(String),
}

/// Istio's `consistentHash.httpCookie`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    pub name: String,
    /// The generated cookie's `Path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Set: a request without the cookie gets one, with this `Max-Age` (0: a session cookie).
    /// Unset: none is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// Limits per destination (service or subset), enforced by the waypoint; overflow answers 503
/// with response flag `UO`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: upstream connections open at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: an upstream connection is retired after this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// `http.maxConcurrentStreams`: streams one upstream HTTP/2 connection carries at once
    /// (fewer if the server allows fewer); past it, another connection is opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    /// `tcp.connectTimeout`: how long setting up a connection to an endpoint may take (for one
    /// in the mesh: TCP, mTLS and HTTP/2 to its ztunnel); unset, the waypoint's
    /// `--connect-timeout-ms` bounds the TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// `http.idleTimeout`: a pooled upstream connection unused this long is closed; 0: never.
    /// Unset, Istio's default of one hour applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    pub interval_ms: u64,
    /// Ejection lasts this times the number of times the endpoint was ejected.
    pub base_ejection_time_ms: u64,
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejection is suspended.
    pub min_health_percent: u32,
}

/// An AuthorizationPolicy enforced by waypoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Authorization {
    pub name: String,
    pub namespace: String,
    /// What it is attached to; it applies to requests through that waypoint or to that
    /// service, in the policy's namespace (mesh-wide when that is the root namespace).
    pub targets: Vec<PolicyTarget>,
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<L7Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PolicyTarget {
    /// A waypoint, by Gateway name.
    Gateway(String),
    /// A Service, by name.
    Service(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<L7Condition>,
}

/// Istio's `to.operation`. Paths and hosts accept `*` as a prefix or suffix wildcard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
}

/// A `when` condition. Keys a waypoint evaluates: `request.headers[<name>]`, `source.ip`,
/// `source.namespace`, `source.principal`, `destination.port`, `request.method`,
/// `request.path`; the controller refuses others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The `when` keys a waypoint understands.
pub fn condition_key_supported(key: &str) -> bool {
    matches!(
        key,
        "source.ip"
            | "source.namespace"
            | "source.principal"
            | "destination.port"
            | "request.method"
            | "request.path"
    ) || key.strip_prefix("request.headers[").is_some_and(|rest| rest.ends_with(']') && rest.len() > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_policy_overrides_the_rule_field_by_field() {
        let rule = DestinationRule {
            name: "payment".into(),
            namespace: "shop".into(),
            host: "payment.shop.svc.cluster.local".into(),
            traffic_policy: TrafficPolicy {
                load_balancer: Some(LoadBalancer::Simple(SimpleLb::Random)),
                connection_pool: Some(ConnectionPool { max_connections: Some(5), ..Default::default() }),
                ..Default::default()
            },
            subsets: vec![Subset {
                name: "v2".into(),
                labels: [("version".to_string(), "v2".to_string())].into(),
                traffic_policy: Some(TrafficPolicy {
                    load_balancer: Some(LoadBalancer::Simple(SimpleLb::LeastRequest)),
                    ..Default::default()
                }),
            }],
        };
        let v2 = rule.policy_for(Some("v2"), 80);
        assert_eq!(v2.load_balancer, Some(LoadBalancer::Simple(SimpleLb::LeastRequest)));
        assert_eq!(v2.connection_pool.unwrap().max_connections, Some(5));
        assert_eq!(rule.policy_for(None, 80).load_balancer, Some(LoadBalancer::Simple(SimpleLb::Random)));
        assert_eq!(rule.policy_for(Some("missing"), 80), rule.traffic_policy);
    }

    fn pool(max_connections: u32) -> Option<ConnectionPool> {
        Some(ConnectionPool { max_connections: Some(max_connections), ..Default::default() })
    }

    /// Istio's merge (pilot's MergeTrafficPolicy): port-level settings replace the policy they
    /// sit in as a whole on their port, and do not inherit from it.
    #[test]
    fn port_level_settings_replace_the_policy_on_their_port() {
        let random = Some(LoadBalancer::Simple(SimpleLb::Random));
        let least = Some(LoadBalancer::Simple(SimpleLb::LeastRequest));
        let rule = DestinationRule {
            name: "payment".into(),
            namespace: "shop".into(),
            host: "payment.shop.svc.cluster.local".into(),
            traffic_policy: TrafficPolicy {
                load_balancer: random.clone(),
                connection_pool: pool(5),
                port_level: vec![PortTrafficPolicy {
                    port: 9090,
                    load_balancer: None,
                    connection_pool: pool(1),
                    outlier_detection: None,
                }],
                ..Default::default()
            },
            subsets: vec![
                Subset {
                    name: "v2".into(),
                    labels: BTreeMap::new(),
                    traffic_policy: Some(TrafficPolicy {
                        load_balancer: least.clone(),
                        ..Default::default()
                    }),
                },
                Subset {
                    name: "v3".into(),
                    labels: BTreeMap::new(),
                    traffic_policy: Some(TrafficPolicy {
                        load_balancer: least.clone(),
                        port_level: vec![PortTrafficPolicy {
                            port: 80,
                            load_balancer: None,
                            connection_pool: pool(2),
                            outlier_detection: None,
                        }],
                        ..Default::default()
                    }),
                },
            ],
        };
        // Port 80: the rule's own fields. Port 9090: only what the port-level entry sets.
        let at_80 = rule.policy_for(None, 80);
        assert_eq!((at_80.load_balancer, at_80.connection_pool), (random.clone(), pool(5)));
        assert!(at_80.port_level.is_empty(), "a resolved policy carries no port-level settings");
        let at_9090 = rule.policy_for(None, 9090);
        assert_eq!((at_9090.load_balancer, at_9090.connection_pool), (None, pool(1)));
        // A subset's fields go over the rule's as resolved for the port.
        let v2 = rule.policy_for(Some("v2"), 9090);
        assert_eq!((v2.load_balancer, v2.connection_pool), (least.clone(), pool(1)));
        // A subset's own port-level settings replace everything on their port.
        let v3 = rule.policy_for(Some("v3"), 80);
        assert_eq!((v3.load_balancer, v3.connection_pool), (None, pool(2)));
        let v3 = rule.policy_for(Some("v3"), 9090);
        assert_eq!((v3.load_balancer, v3.connection_pool), (least, pool(1)));
    }

    #[test]
    fn string_matches_have_istio_shapes() {
        let m: BTreeMap<String, StringMatch> = serde_json::from_str(
            r#"{"a":{"exact":"x"},"b":{"prefix":"/p"},"c":{"regex":"v[0-9]"},"d":"present"}"#,
        )
        .unwrap();
        assert_eq!(m["a"], StringMatch::Exact("x".into()));
        assert_eq!(m["d"], StringMatch::Present);
    }

    #[test]
    fn condition_keys() {
        assert!(condition_key_supported("request.headers[x-user]"));
        assert!(!condition_key_supported("request.headers[]"));
        assert!(!condition_key_supported("request.auth.claims[iss]"));
    }
}
