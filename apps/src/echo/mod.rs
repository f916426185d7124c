//! `warren-echo`: an HTTP/1.1 and h2c (prior knowledge) echo server on the same port, with a
//! deterministic failure schedule and per-request status and delay overrides.

mod handler;
mod schedule;
mod stream;
mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub use handler::{
    CALL_HEADER, CallResult, DELAY_HEADER, EchoBody, GRPC_STATUS_HEADER, HeaderValues, MAX_DELAY_MS,
    MAX_GRPC_STATUS, Overrides, ResponseBody, STATS_PATH, STATUS_HEADER, Stats, TRACE_HEADERS, parse_status,
    protocol_name,
};
use handler::{Handler, Identity};
pub use schedule::{FailFraction, FractionError};

/// How long a shutdown waits for requests in flight before dropping their connections:
/// shorter than Kubernetes' default 30 s grace period, so the pod still exits by itself.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Flags of `warren-echo`; build one in-process with `Config::try_parse_from`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "warren-echo",
    about = "HTTP/1.1 + h2c echo server: answers every request with JSON describing it",
    disable_version_flag = true
)]
pub struct Config {
    /// Address to listen on, IP:PORT. Repeat to listen on several, e.g. `--listen 0.0.0.0:8080
    /// --listen [::]:8080` for IPv4 and IPv6 (IPv6 listeners are IPv6-only, so both fit on one
    /// port). Port 0 picks a free port.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: Vec<SocketAddr>,

    /// Pod name reported in `x-echo-pod` and the body. Defaults to the host name, which is the
    /// pod name on Kubernetes.
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub pod: Option<String>,

    /// Namespace reported in `x-echo-namespace` and the body.
    #[arg(long, value_name = "NAME", env = "POD_NAMESPACE", default_value = "unknown")]
    pub namespace: String,

    /// Application version reported in `x-echo-version` and the body, so a load run can count
    /// which version answered (traffic splits).
    #[arg(long, value_name = "VERSION", env = "APP_VERSION", default_value = "v1")]
    pub version: String,

    /// Fraction of requests (0 to 1) answered with `--fail-status`. Deterministic: request n
    /// (from 0) fails when floor((n+1)·F) > floor(n·F), so the first N requests hold exactly
    /// floor(N·F) failures. `GET /healthz` and requests rejected with 400 do not count.
    #[arg(long, value_name = "F", default_value = "0")]
    pub fail_fraction: FailFraction,

    /// Status of the requests that `--fail-fraction` fails (200..=599).
    #[arg(long, value_name = "CODE", default_value_t = 503, value_parser = parse_status_flag)]
    pub fail_status: u16,

    /// gRPC status (1..=16) of the gRPC calls (`content-type: application/grpc`) that
    /// `--fail-fraction` fails, sent trailers-only (HTTP 200) as a gRPC server fails a call;
    /// 14 is UNAVAILABLE.
    #[arg(long, value_name = "CODE", default_value_t = 14,
          value_parser = clap::value_parser!(u8).range(1..=MAX_GRPC_STATUS as i64))]
    pub fail_grpc_status: u8,

    /// Streams one HTTP/2 client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// unset: hyper's default (200). A low limit shows whether a proxy opens more connections.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_concurrent_streams: Option<u32>,

    /// Delay in milliseconds before every answer (at most 60000) — for a streaming call
    /// (`…/Stream`), before its end; an `x-echo-delay-ms` request header replaces it for that
    /// request.
    #[arg(long, value_name = "MS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=MAX_DELAY_MS))]
    pub delay_ms: u64,
}

fn parse_status_flag(s: &str) -> Result<u16, String> {
    let code: u64 = s.parse().map_err(|_| format!("{s:?} is not a status code"))?;
    parse_status(code).map(|status| status.as_u16())
}

impl Config {
    /// Checks what clap cannot (a `Config` may also be built by hand) and resolves the defaults
    /// that depend on the machine.
    fn handler(&self) -> Result<Handler> {
        anyhow::ensure!(!self.listen.is_empty(), "at least one --listen address is needed");
        anyhow::ensure!(self.delay_ms <= MAX_DELAY_MS, "--delay-ms must be at most {MAX_DELAY_MS}");
        let fail_status = parse_status(u64::from(self.fail_status)).map_err(anyhow::Error::msg)?;
        let pod = self.pod.clone().unwrap_or_else(host_name);
        let value = |flag: &str, v: &str| {
            HeaderValue::from_str(v)
                .with_context(|| format!("--{flag} {v:?} cannot be sent as a header value"))
        };
        Ok(Handler {
            identity: Identity {
                pod: value("pod", &pod)?,
                namespace: value("namespace", &self.namespace)?,
                version: value("version", &self.version)?,
            },
            fail_fraction: self.fail_fraction,
            fail_status,
            fail_grpc_status: self.fail_grpc_status,
            delay: Duration::from_millis(self.delay_ms),
            counter: AtomicU64::new(0),
            stats: Default::default(),
        })
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// A server whose listeners are bound (so their ports are known) but not yet serving.
pub struct Server {
    listeners: Vec<TcpListener>,
    handler: Arc<Handler>,
    http2_max_concurrent_streams: Option<u32>,
}

/// Binds every `--listen` address. Separate from [`Server::run`] so a caller that asked for
/// port 0 can learn the port before traffic starts.
pub async fn bind(config: &Config) -> Result<Server> {
    let handler = Arc::new(config.handler()?);
    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        listeners.push(listen(*addr).with_context(|| format!("listening on {addr}"))?);
    }
    Ok(Server { listeners, handler, http2_max_concurrent_streams: config.http2_max_concurrent_streams })
}

/// Binds and serves until `shutdown` completes, then drains requests in flight (at most
/// [`SHUTDOWN_GRACE`]).
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    bind(&config).await?.run(shutdown).await
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // Otherwise `[::]:P` also takes IPv4 port P and collides with `0.0.0.0:P`.
        socket.set_only_v6(true)?;
    }
    // Lets a restarted server bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

impl Server {
    /// The bound addresses, in `--listen` order, with the real port where 0 was asked.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        for addr in self.local_addrs() {
            tracing::info!("warren-echo listening on {addr} (HTTP/1.1 and h2c)");
        }
        // Each listener accepts in its own task and hands connections here, so one place owns
        // the graceful-shutdown bookkeeping.
        let (accepted, mut incoming) = mpsc::channel::<(TcpStream, SocketAddr)>(64);
        let mut acceptors = JoinSet::new();
        for listener in self.listeners {
            acceptors.spawn(accept_loop(listener, accepted.clone()));
        }
        drop(accepted);

        let mut builder = auto::Builder::new(TokioExecutor::new());
        if let Some(streams) = self.http2_max_concurrent_streams {
            builder.http2().max_concurrent_streams(streams);
        }
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                next = incoming.recv() => {
                    let Some((stream, peer)) = next else { break };
                    let handler = self.handler.clone();
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        async move { handler.handle(req, peer).await }
                    });
                    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("connection from {peer}: {e}");
                        }
                    });
                }
            }
        }
        acceptors.shutdown().await;
        drop(incoming);
        tracing::info!("warren-echo shutting down");
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
            tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; dropping them");
        }
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, accepted: mpsc::Sender<(TcpStream, SocketAddr)>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Echo answers are small: do not let Nagle hold them back.
                let _ = stream.set_nodelay(true);
                if accepted.send((stream, peer)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("warren-echo").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen, vec!["0.0.0.0:8080".parse::<SocketAddr>().unwrap()]);
        assert_eq!(config.fail_fraction, FailFraction::ZERO);
        assert_eq!(config.fail_status, 503);
        assert_eq!(config.delay_ms, 0);
    }

    #[test]
    fn repeated_listen_and_ipv6() {
        let config = parse(&["--listen", "0.0.0.0:8080", "--listen", "[::]:8080"]).unwrap();
        assert_eq!(config.listen.len(), 2);
        assert!(config.listen[1].is_ipv6());
    }

    #[test]
    fn flag_validation() {
        assert!(parse(&["--fail-fraction", "1.5"]).is_err());
        assert!(parse(&["--fail-fraction", "-0.1"]).is_err());
        assert!(parse(&["--fail-status", "700"]).is_err());
        assert!(parse(&["--fail-status", "100"]).is_err());
        assert!(parse(&["--delay-ms", "60001"]).is_err());
        assert!(parse(&["--listen", "localhost:80"]).is_err());
        let config =
            parse(&["--fail-fraction", "0.1", "--fail-status", "500", "--delay-ms", "60000"]).unwrap();
        assert_eq!(config.fail_status, 500);
        assert!(config.handler().is_ok());
    }

    #[test]
    fn identity_must_be_a_header_value() {
        let mut config = parse(&[]).unwrap();
        config.version = "v1\nx-injected: 1".to_string();
        let err = config.handler().unwrap_err().to_string();
        assert!(err.contains("--version"), "{err}");
    }
}
