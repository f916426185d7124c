//! ztunnel's one flat configuration, from flags or `WARREN_*` environment variables, dumped
//! as-is at `/config_dump` on the admin port.

use std::{net::IpAddr, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use serde::Serialize;
use warren_core::logging::LogFormat;

#[derive(Args, Clone, Debug, Serialize)]
pub struct Config {
    /// This node's name: ztunnel enrolls the workloads scheduled here.
    #[arg(long = "node", env = "WARREN_NODE_NAME")]
    pub node_name: String,

    /// The config as a file (JSON, as `controller watch` writes it), re-read when it changes.
    /// Exactly one of this and `--controller` is needed.
    #[arg(
        long = "workloads",
        env = "WARREN_WORKLOADS_FILE",
        required_unless_present = "controller",
        conflicts_with = "controller"
    )]
    pub workloads_file: Option<PathBuf>,

    /// The controller's config stream (`IP:PORT`, the port of its CA): subscribe there, with
    /// --ca-root to verify it and --ca-token-file to authenticate. The last good config stays
    /// in force while the controller is away.
    #[arg(long, env = "WARREN_CONTROLLER_ADDR", requires_all = ["ca_root", "ca_token_file"])]
    pub controller: Option<SocketAddr>,

    /// Where the BPF filesystem is (mounted there by ztunnel if it is not yet).
    #[arg(long, env = "WARREN_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// cgroup v2 mount to attach the connect and sock_ops programs to (its root). Found in
    /// /proc/self/mountinfo when not given.
    #[arg(long, env = "WARREN_CGROUP2_ROOT")]
    pub cgroup2_root: Option<PathBuf>,

    /// A cgroup (relative to the cgroup2 root) that ztunnel moves itself into at start. Its
    /// sockets are exempt from capture by cgroup, so it must not share its cgroup with pods.
    /// Unset: stay where started (Kubernetes gives ztunnel's pod its own cgroup).
    #[arg(long, env = "WARREN_OWN_CGROUP")]
    pub own_cgroup: Option<String>,

    /// SO_MARK on every socket ztunnel opens in a pod netns (Istio's 0x539 by default).
    #[arg(long, env = "WARREN_MARK", default_value_t = 0x539)]
    pub mark: u32,

    /// Admin endpoint (/config_dump, /capture).
    #[arg(long, env = "WARREN_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics (/metrics, /stats/prometheus).
    #[arg(long, env = "WARREN_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness (/healthz/ready): 200 once capture is attached and the first reconcile ran.
    #[arg(long, env = "WARREN_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// A Unix socket serving `/healthz/ready` for this process alone (`ztunnel ready --socket`
    /// asks it). During a rolling update two ztunnels share the node's TCP ports, so a probe
    /// of :15021 may reach the other one; a socket in the pod's own volume cannot.
    #[arg(long, env = "WARREN_READINESS_SOCKET")]
    pub readiness_socket: Option<PathBuf>,

    /// On SIGTERM: stop accepting, then give open connections this long to finish.
    #[arg(long, env = "WARREN_DRAIN_TIMEOUT_SECS", default_value_t = 5)]
    pub drain_timeout_secs: u64,

    /// Source IPs whose connections to pods are not captured (kubelet probes from the node).
    #[arg(long = "probe-source", env = "WARREN_PROBE_SOURCES", value_delimiter = ',')]
    pub probe_sources: Vec<IpAddr>,

    /// How often the workloads file and the pods' network namespaces are checked.
    #[arg(long, env = "WARREN_RECONCILE_INTERVAL_MS", default_value_t = 500)]
    pub reconcile_interval_ms: u64,

    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "WARREN_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Development and tests only: a directory with the mesh root (`root-cert.pem`,
    /// `root-key.pem`) that ztunnel signs its workloads' certificates with itself. In a real
    /// mesh the controller is the CA. Without it ztunnel has no certificates and refuses HBONE.
    #[arg(long, env = "WARREN_DEV_CA_DIR")]
    pub dev_ca_dir: Option<PathBuf>,

    /// The mesh CA (the controller's `serve`) to ask for workload certificates.
    #[arg(long, env = "WARREN_CA_ADDR", conflicts_with = "dev_ca_dir")]
    pub ca_addr: Option<SocketAddr>,

    /// The mesh root certificate (PEM): what the CA, the controller and every peer must chain
    /// to.
    #[arg(long, env = "WARREN_CA_ROOT")]
    pub ca_root: Option<PathBuf>,

    /// File holding the token for the CA and the config stream: this node's bootstrap token
    /// (local mode), or on Kubernetes the ztunnel pod's projected ServiceAccount token. Re-read
    /// at every use (the kubelet rotates projected tokens).
    #[arg(long, env = "WARREN_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,

    /// Lifetime of the workload certificates the development CA signs (renewed at half-life).
    #[arg(long, env = "WARREN_CERT_LIFETIME_SECS", default_value_t = 24 * 3600)]
    pub cert_lifetime_secs: u64,

    /// Worker threads of the proxy's runtime; 0 = one per CPU this process may run on. A
    /// DaemonSet usually runs without a CPU limit, so "one per CPU" would be 64 threads (and
    /// as many allocator arenas) on a 64-core node; Istio's ztunnel also defaults to 2.
    #[arg(long, env = "WARREN_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// CONNECT streams per pooled HBONE connection before another connection is opened.
    #[arg(long, env = "WARREN_POOL_MAX_STREAMS", default_value_t = 100)]
    pub pool_max_streams: usize,

    /// Seconds an HBONE connection with no streams stays open for reuse.
    #[arg(long, env = "WARREN_POOL_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub pool_idle_timeout_secs: u64,

    /// Milliseconds a TCP connection from ztunnel (to a peer's 15008, a destination outside
    /// the mesh, a pod's application) may take to be established: Envoy's connect timeout,
    /// 10 s in Istio. Without it, a peer whose node died mid-flight would hold the client for
    /// the kernel's SYN retries (about two minutes).
    #[arg(long, env = "WARREN_CONNECT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,

    /// Log output format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// bpffs directory holding this node's pinned maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join("warren").join(&self.node_name)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms.max(10))
    }
}
