//! The admin endpoint (127.0.0.1:15000 by default): `/config_dump`, `/capture`,
//! `/healthz/ready`. Read-only.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes};
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use warren_core::{
    endpoints::{Endpoints, Limits, text, warn_line},
    model::NodeConfig,
};

use crate::{capture::Capture, config::Config, inpod::InPod, proxy::Proxy};

pub struct AdminState {
    pub config: Config,
    pub capture: Arc<Capture>,
    pub inpod: Arc<InPod>,
    pub proxy: Arc<Proxy>,
    pub workloads: Mutex<NodeConfig>,
    pub ready: AtomicBool,
    /// The config stream's state, when config comes from the controller.
    pub stream: Arc<Mutex<warren_core::config_stream::ClientStatus>>,
}

impl AdminState {
    /// What `/capture` serves and `ztunnel status` prints.
    pub fn capture_view(&self) -> serde_json::Value {
        json!({
            "node": self.config.node_name,
            "pinDir": self.config.pin_dir(),
            "programs": self.capture.cgroup_attachments(),
            "pods": self.inpod.view(),
            "enrolledMapCookies": self.capture.enrolled_cookies(),
            "exemptCgroups": self.capture.exempt_cgroups(),
            "originalDstEntries": self.capture.original_dst_entries(),
            "pendingDstEntries": self.capture.pending_dst_entries(),
            "stats": &self.proxy.stats,
            "openInboundConnections": self.proxy.tracker.open_connections(),
            "closedByPolicy": self.proxy.tracker.closed_by_policy.load(Ordering::Relaxed),
            "hbonePool": {
                "open": self.proxy.pool.open_connections(),
                "activeStreams": self.proxy.pool.active_streams(),
                "opened": self.proxy.pool.connections_opened.load(Ordering::Relaxed),
                "dialsFailed": self.proxy.pool.dials_failed.load(Ordering::Relaxed),
            },
        })
    }

    fn config_dump(&self) -> serde_json::Value {
        json!({
            "config": self.config,
            "workloads": *self.workloads.lock().expect("poisoned"),
            "certificates": self.proxy.certs.view(),
            "certificateRotations": self.proxy.certs.rotations.load(Ordering::Relaxed),
            "configStream": *self.stream.lock().expect("poisoned"),
            "capture": self.capture_view(),
        })
    }
}

pub async fn serve(listener: TcpListener, state: Arc<AdminState>, endpoints: Endpoints) {
    warren_core::endpoints::serve(listener, endpoints.name(), Limits::default(), warn_line, move |req| {
        route(&state, endpoints, req)
    })
    .await
}

/// Binds the readiness socket, replacing a file a previous process of this pod left (the
/// directory is the pod's own).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    UnixListener::bind(path)
}

/// Serves `/healthz/ready` on the readiness socket: 200 while `ready()` says so.
pub async fn serve_unix(listener: UnixListener, ready: impl Fn() -> bool + Send + Sync + 'static) {
    warren_core::endpoints::serve(listener, "readiness socket", Limits::default(), warn_line, move |req| {
        match (req.uri().path(), ready()) {
            ("/healthz/ready", true) => text(StatusCode::OK, "ready\n"),
            ("/healthz/ready", false) => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => text(StatusCode::NOT_FOUND, "endpoints: /healthz/ready\n"),
        }
    })
    .await
}

/// `ztunnel ready`: asks the readiness socket; Ok when this ztunnel is ready.
pub fn ready(path: &Path) -> Result<(), String> {
    use std::io::{Read, Write};
    let timeout = Some(std::time::Duration::from_secs(2));
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("{}: {e} (is ztunnel running with --readiness-socket here?)", path.display()))?;
    let _ = stream.set_read_timeout(timeout);
    let _ = stream.set_write_timeout(timeout);
    let mut text = String::new();
    stream
        .write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
        .and_then(|()| stream.read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let status = text.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("not ready ({status})"))
    }
}

fn route(
    state: &AdminState,
    endpoints: Endpoints,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let ready = state.ready.load(Ordering::Relaxed);
    let (status, body) = match (endpoints, req.uri().path()) {
        (Endpoints::Admin, "/config_dump") => (StatusCode::OK, pretty(&state.config_dump())),
        (Endpoints::Admin, "/capture") => (StatusCode::OK, pretty(&state.capture_view())),
        (Endpoints::Admin | Endpoints::Readiness, "/healthz/ready") if ready => {
            (StatusCode::OK, "ready\n".into())
        }
        (Endpoints::Admin | Endpoints::Readiness, "/healthz/ready") => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
        }
        (Endpoints::Metrics, "/metrics" | "/stats/prometheus") => {
            (StatusCode::OK, state.proxy.metrics.render() + &state.proxy.handshakes.render_metrics())
        }
        (Endpoints::Admin, _) => {
            (StatusCode::NOT_FOUND, "endpoints: /config_dump /capture /healthz/ready\n".into())
        }
        (Endpoints::Metrics, _) => (StatusCode::NOT_FOUND, "endpoints: /metrics /stats/prometheus\n".into()),
        (Endpoints::Readiness, _) => (StatusCode::NOT_FOUND, "endpoints: /healthz/ready\n".into()),
    };
    text(status, body)
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// A blocking GET against the admin endpoint, for `ztunnel status`.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("{path}: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_string())
}
