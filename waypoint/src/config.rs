//! The waypoint's one flat configuration, from flags or `WARREN_*` environment variables,
//! dumped as-is at `/config_dump` on the admin port.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::Serialize;
use warren_core::logging::LogFormat;

#[derive(Parser, Clone, Debug, Serialize)]
#[command(
    name = "waypoint",
    version,
    about = "Warren's L7 proxy: VirtualService, DestinationRule, HTTPRoute and L7 AuthorizationPolicy over HBONE"
)]
pub struct Config {
    /// The waypoint's name: the Gateway that declares it, and what services name in
    /// `istio.io/use-waypoint`.
    #[arg(long, env = "WARREN_WAYPOINT_NAME")]
    pub name: String,

    /// The namespace of the Gateway (services there that use it are served).
    #[arg(long, env = "WARREN_WAYPOINT_NAMESPACE")]
    pub namespace: String,

    /// The ServiceAccount the waypoint's identity is made of (default: its name, as Istio
    /// names a waypoint's account after its Gateway).
    #[arg(long, env = "WARREN_WAYPOINT_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// The mesh config as a file (JSON, as `controller watch`/`serve` writes it), re-read when
    /// it changes. A bad file is reported and the last good config kept. Exactly one of this
    /// and `--controller` is needed.
    #[arg(
        long = "config",
        env = "WARREN_CONFIG_FILE",
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    pub config_file: Option<PathBuf>,

    /// The controller's config stream (`IP:PORT`, the port of its CA): subscribe there, with
    /// --ca-root to verify it and --ca-token-file to authenticate. The last good config stays
    /// in force while the controller is away.
    #[arg(long, env = "WARREN_CONTROLLER_ADDR", requires_all = ["ca_root", "ca_token_file", "node"])]
    pub controller: Option<SocketAddr>,

    /// The node the waypoint runs on (the controller checks it against the token: the node's
    /// own, or the node of the pod a ServiceAccount token is bound to).
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node: Option<String>,

    /// Where HBONE (mTLS HTTP/2 CONNECT) from ztunnels arrives.
    #[arg(long, env = "WARREN_HBONE_ADDR", default_value = "[::]:15008")]
    pub hbone_addr: SocketAddr,

    /// Admin endpoint (/config_dump, /healthz/ready).
    #[arg(long, env = "WARREN_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, env = "WARREN_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (/healthz/ready): 200 once a config is loaded and the certificate issued.
    #[arg(long, env = "WARREN_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "WARREN_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The mesh CA (the controller's `serve`) to ask for the waypoint's certificate.
    #[arg(long, env = "WARREN_CA_ADDR", conflicts_with = "dev_ca_dir")]
    pub ca_addr: Option<SocketAddr>,

    /// The mesh root certificate (PEM).
    #[arg(long, env = "WARREN_CA_ROOT")]
    pub ca_root: Option<PathBuf>,

    /// File holding the token for the CA and the config stream: in local mode the bootstrap
    /// token of the node the waypoint runs on; on Kubernetes the waypoint pod's projected
    /// ServiceAccount token, with which it gets only its own identity. Re-read at every use
    /// (the kubelet rotates projected tokens).
    #[arg(long, env = "WARREN_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// Development and tests only: sign the waypoint's certificate in-process with the root in
    /// this directory (`root-cert.pem`, `root-key.pem`).
    #[arg(long, env = "WARREN_DEV_CA_DIR")]
    pub dev_ca_dir: Option<PathBuf>,

    /// Lifetime of the certificate the development CA signs.
    #[arg(long, env = "WARREN_CERT_LIFETIME_SECS", default_value_t = 24 * 3600)]
    pub cert_lifetime_secs: u64,

    /// How often the config file is checked for changes.
    #[arg(long, env = "WARREN_RELOAD_INTERVAL_MS", default_value_t = 500)]
    pub reload_interval_ms: u64,

    /// How much of a request body is kept so that a retry or a mirror can send it again. A
    /// body streams upstream as it arrives either way; one longer than this is not retried and
    /// not mirrored (Envoy's retry buffer).
    #[arg(long, alias = "max-request-body-bytes", env = "WARREN_REQUEST_BUFFER_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub request_buffer_bytes: usize,

    /// How long to wait for a client's first bytes to tell HTTP/1.1, HTTP/2 and other TCP
    /// apart; a silent client (a server-first protocol) is passed through as TCP.
    #[arg(long, env = "WARREN_SNIFF_TIMEOUT_MS", default_value_t = 1000)]
    pub sniff_timeout_ms: u64,

    /// An OTLP/HTTP collector (`IP:PORT`) that sampled spans are sent to (POST /v1/traces,
    /// JSON). Unset: spans are not exported (trace headers are still propagated).
    #[arg(long, env = "WARREN_TRACING_COLLECTOR")]
    pub tracing_collector: Option<SocketAddr>,

    /// Percentage (0–100) of new traces that are sampled; a caller's sampling decision, carried
    /// in `traceparent` or `x-b3-sampled`, is kept. Istio's default is 1.
    #[arg(long, env = "WARREN_TRACING_SAMPLING", default_value_t = 1.0)]
    pub tracing_sampling: f64,

    /// Milliseconds a TCP connection to an upstream (an endpoint's ztunnel over HBONE, an
    /// endpoint outside the mesh) may take to be established: Envoy's connect timeout, 10 s in
    /// Istio. A failed connect is answered 503 `UF` (retried when `retryOn` has
    /// connect-failure).
    #[arg(long, env = "WARREN_CONNECT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,

    /// Worker threads (Envoy's `--concurrency`): 0 = one per CPU this process may run on (its
    /// affinity and cgroup CPU quota). One worker is a single-threaded event loop, the cheapest
    /// per request when the waypoint has one CPU.
    #[arg(long, env = "WARREN_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// A client's HTTP connection with no request in flight for this many seconds is closed
    /// (Envoy's `idle_timeout`, 1 h by default); a request counts until its response body has
    /// been sent. A stream passed through as TCP is closed after as long with no byte either
    /// way (Envoy's `tcp_proxy` `idle_timeout`). 0: never.
    #[arg(long, env = "WARREN_IDLE_TIMEOUT_SECS", default_value_t = 3600)]
    pub idle_timeout_secs: u64,

    /// Requests a client may have in flight at once on one HTTP/2 connection (the
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the waypoint announces). Envoy's default, which
    /// Istio's waypoints keep, is 2^31 - 1: a gRPC client holding more long-lived calls on one
    /// channel than a lower limit would see the rest wait behind them, not fail. Each request
    /// in flight holds memory until it ends (~9 KB measured, docs/waypoint.md).
    #[arg(long, env = "WARREN_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = 2_147_483_647, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_concurrent_streams: u32,

    /// On SIGTERM: stop accepting, then give open streams this long to finish.
    #[arg(long, env = "WARREN_DRAIN_TIMEOUT_SECS", default_value_t = 5)]
    pub drain_timeout_secs: u64,

    /// Log output format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }

    /// The downstream idle timeout, if any.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms.max(10))
    }
}
