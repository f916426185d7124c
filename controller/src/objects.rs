//! The Kubernetes objects Warren reads. Core kinds come from k8s-openapi; Istio's CRDs and the
//! Gateway API kinds are declared here with the fields Warren uses (unknown fields are kept out
//! of the way, not rejected: newer Istio fields must not break the controller). Numbers that
//! have a valid range are read wide (`i64`) so that translation reports a bad value on its own
//! field instead of the whole object failing to parse.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

/// Everything read from one source, as typed objects. Shared (`Arc`): a snapshot is put
/// together again on every change from objects that mostly did not change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub virtual_services: Vec<Arc<VirtualService>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    pub http_routes: Vec<Arc<gateway_api::HttpRoute>>,
    pub gateways: Vec<Arc<gateway_api::Gateway>>,
    pub reference_grants: Vec<Arc<gateway_api::ReferenceGrant>>,
}

impl Snapshot {
    /// Appends `other`'s objects (a file read earlier joining the whole): shares, not copies.
    pub fn extend_from(&mut self, other: &Snapshot) {
        self.namespaces.extend_from_slice(&other.namespaces);
        self.pods.extend_from_slice(&other.pods);
        self.services.extend_from_slice(&other.services);
        self.service_accounts.extend_from_slice(&other.service_accounts);
        self.peer_authentications.extend_from_slice(&other.peer_authentications);
        self.authorization_policies.extend_from_slice(&other.authorization_policies);
        self.virtual_services.extend_from_slice(&other.virtual_services);
        self.destination_rules.extend_from_slice(&other.destination_rules);
        self.http_routes.extend_from_slice(&other.http_routes);
        self.gateways.extend_from_slice(&other.gateways);
        self.reference_grants.extend_from_slice(&other.reference_grants);
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Mtls {
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    /// Policies attached to a waypoint (Gateway) or Service apply at L7 in the waypoint.
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    pub target_ref: Option<PolicyTargetRef>,
    /// ALLOW (default), DENY, AUDIT or CUSTOM.
    pub action: Option<String>,
    /// Absent rules: the policy matches nothing (an ALLOW policy then denies all it selects).
    pub rules: Option<Vec<AuthorizationRule>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AuthorizationRule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct From {
    #[serde(default)]
    pub source: SourceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    /// Fields Warren does not know (newer Istio): a waypoint treats them as unsupported.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct To {
    #[serde(default)]
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    /// Fields Warren does not know (newer Istio): a waypoint treats them as unsupported.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A `when` condition: `source.ip`, `source.namespace`, `source.principal` and
/// `destination.port` are L4 (ztunnel evaluates them); any other key is L7.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `namespace/name` of an object, for messages.
pub fn object_name(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// An AuthorizationPolicy's `targetRef(s)`: a waypoint `Gateway` or a `Service` in the
/// policy's namespace.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// networking.istio.io VirtualService (v1, v1beta1, v1alpha3).
#[derive(Clone, Debug, Deserialize)]
pub struct VirtualService {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Empty, or containing `mesh`: the routes apply to mesh traffic.
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// Read only to report that they are not translated.
    #[serde(default)]
    pub tcp: Vec<serde_json::Value>,
    #[serde(default)]
    pub tls: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<HttpDirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub mirror: Option<Destination>,
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<i64>,
    #[serde(default)]
    pub mirrors: Vec<HttpMirror>,
    pub headers: Option<HeadersSpec>,
    /// Not implemented by the waypoint: read to be reported.
    pub delegate: Option<serde_json::Value>,
    pub cors_policy: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    pub port: Option<i64>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    /// Empty, or containing `mesh`: the match applies to mesh traffic.
    #[serde(default)]
    pub gateways: Vec<String>,
}

/// Istio's StringMatch: one of `exact`, `prefix`, `regex` (RE2). `{}` on a header or query
/// parameter means "present".
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<HeadersSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PortSelector {
    pub number: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<i64>,
    pub redirect_code: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpDirectResponse {
    pub status: Option<i64>,
    pub body: Option<HttpBody>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RegexRewrite {
    #[serde(default, rename = "match")]
    pub regex: String,
    #[serde(default)]
    pub rewrite: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub percentage: Option<Percent>,
    /// Deprecated integer form of `percentage`.
    pub percent: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    /// A gRPC status by name (`UNAVAILABLE`).
    pub grpc_status: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Percent {
    pub value: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpMirror {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HeadersSpec {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// networking.istio.io DestinationRule (v1, v1beta1, v1alpha3).
#[derive(Clone, Debug, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    /// (`tls` is not read: mesh traffic is always mTLS.)
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpCookie {
    #[serde(default)]
    pub name: String,
    pub path: Option<String>,
    /// A duration (`3600s`); `0s` asks for a session cookie.
    pub ttl: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConnectionPool {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    /// A duration (`10s`, `500ms`).
    pub connect_timeout: Option<String>,
    /// Not implemented by the waypoint: read to be reported.
    pub tcp_keepalive: Option<serde_json::Value>,
    /// Not implemented by the waypoint: read to be reported.
    pub max_connection_duration: Option<serde_json::Value>,
    /// Not implemented by the waypoint (it has `http.idleTimeout`): read to be reported.
    pub idle_timeout: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpSettings {
    #[serde(rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub max_concurrent_streams: Option<i64>,
    /// `UPGRADE` is not implemented (the waypoint speaks the client's protocol upstream).
    pub h2_upgrade_policy: Option<String>,
    /// A duration (`1h`, `30s`); `0s` keeps idle connections open.
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    pub min_health_percent: Option<i64>,
}

/// Gateway API kinds (gateway.networking.k8s.io), in their own namespace since their names
/// clash with Istio's.
pub mod gateway_api {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::Deserialize;

    /// A Gateway: its class, to tell a waypoint from an ingress gateway, and its listeners'
    /// `allowedRoutes`, which say from which namespaces Services may use it as their waypoint.
    #[derive(Clone, Debug, Deserialize)]
    pub struct Gateway {
        pub metadata: ObjectMeta,
        #[serde(default)]
        pub spec: GatewaySpec,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct GatewaySpec {
        #[serde(default)]
        pub gateway_class_name: String,
        #[serde(default)]
        pub listeners: Vec<Listener>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Listener {
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub port: i64,
        #[serde(default)]
        pub protocol: String,
        pub allowed_routes: Option<AllowedRoutes>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct AllowedRoutes {
        pub namespaces: Option<RouteNamespaces>,
    }

    /// `from`: `Same` (the default), `All` or `Selector` (namespaces whose labels `selector`
    /// matches).
    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct RouteNamespaces {
        pub from: Option<String>,
        pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    }

    /// A ReferenceGrant (v1beta1): lets objects of the `from` kinds in the `from` namespaces
    /// refer to objects of the `to` kinds in the grant's own namespace. Warren reads it for
    /// HTTPRoute backends (and mirrors) in another namespace.
    #[derive(Clone, Debug, Deserialize)]
    pub struct ReferenceGrant {
        pub metadata: ObjectMeta,
        #[serde(default)]
        pub spec: ReferenceGrantSpec,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct ReferenceGrantSpec {
        #[serde(default)]
        pub from: Vec<GrantFrom>,
        #[serde(default)]
        pub to: Vec<GrantTo>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct GrantFrom {
        #[serde(default)]
        pub group: String,
        #[serde(default)]
        pub kind: String,
        #[serde(default)]
        pub namespace: String,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct GrantTo {
        #[serde(default)]
        pub group: String,
        #[serde(default)]
        pub kind: String,
        /// Unset: every object of the kind in the namespace.
        pub name: Option<String>,
    }

    /// An HTTPRoute (v1, v1beta1). Warren translates the mesh (GAMMA) form: routes whose
    /// parents are Services.
    #[derive(Clone, Debug, Deserialize)]
    pub struct HttpRoute {
        pub metadata: ObjectMeta,
        #[serde(default)]
        pub spec: HttpRouteSpec,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct HttpRouteSpec {
        #[serde(default)]
        pub parent_refs: Vec<ParentRef>,
        #[serde(default)]
        pub rules: Vec<Rule>,
    }

    /// A parent (or backend) object reference. `group`/`kind` default per use: `Gateway` in
    /// `gateway.networking.k8s.io` for parents, core `Service` for backends.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ObjectRef {
        pub group: Option<String>,
        pub kind: Option<String>,
        #[serde(default)]
        pub name: String,
        pub namespace: Option<String>,
        pub port: Option<i64>,
        /// For a Service parent: the name of one of its ports.
        pub section_name: Option<String>,
    }

    pub type ParentRef = ObjectRef;

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Rule {
        pub name: Option<String>,
        #[serde(default)]
        pub matches: Vec<Match>,
        #[serde(default)]
        pub filters: Vec<Filter>,
        #[serde(default)]
        pub backend_refs: Vec<BackendRef>,
        pub timeouts: Option<Timeouts>,
        pub retry: Option<Retry>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Match {
        pub path: Option<PathMatch>,
        #[serde(default)]
        pub headers: Vec<ValueMatch>,
        #[serde(default)]
        pub query_params: Vec<ValueMatch>,
        pub method: Option<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct PathMatch {
        /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
        #[serde(rename = "type")]
        pub kind: Option<String>,
        pub value: Option<String>,
    }

    /// A header or query parameter match: `Exact` (default) or `RegularExpression`.
    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct ValueMatch {
        #[serde(rename = "type")]
        pub kind: Option<String>,
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub value: String,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Filter {
        #[serde(rename = "type", default)]
        pub kind: String,
        pub request_header_modifier: Option<HeaderModifier>,
        pub response_header_modifier: Option<HeaderModifier>,
        #[serde(rename = "urlRewrite")]
        pub url_rewrite: Option<UrlRewrite>,
        pub request_mirror: Option<RequestMirror>,
        pub request_redirect: Option<RequestRedirect>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct HeaderModifier {
        #[serde(default)]
        pub set: Vec<Header>,
        #[serde(default)]
        pub add: Vec<Header>,
        #[serde(default)]
        pub remove: Vec<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct Header {
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub value: String,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct UrlRewrite {
        pub hostname: Option<String>,
        pub path: Option<PathModifier>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PathModifier {
        /// `ReplaceFullPath` or `ReplacePrefixMatch`.
        #[serde(rename = "type", default)]
        pub kind: String,
        pub replace_full_path: Option<String>,
        pub replace_prefix_match: Option<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct RequestMirror {
        #[serde(default)]
        pub backend_ref: ObjectRef,
        pub percent: Option<i64>,
        pub fraction: Option<Fraction>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct Fraction {
        pub numerator: i64,
        pub denominator: Option<i64>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct RequestRedirect {
        pub scheme: Option<String>,
        pub hostname: Option<String>,
        pub path: Option<PathModifier>,
        pub port: Option<i64>,
        pub status_code: Option<i64>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct BackendRef {
        pub group: Option<String>,
        pub kind: Option<String>,
        #[serde(default)]
        pub name: String,
        pub namespace: Option<String>,
        pub port: Option<i64>,
        pub weight: Option<i64>,
        #[serde(default)]
        pub filters: Vec<Filter>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Timeouts {
        pub request: Option<String>,
        pub backend_request: Option<String>,
    }

    /// Experimental in Gateway API v1.2 (GEP-1731).
    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct Retry {
        #[serde(default)]
        pub codes: Vec<i64>,
        pub attempts: Option<i64>,
    }
}
