//! The small HTTP/1.1 endpoints every Warren process serves next to its real work: admin
//! (`/config_dump`), Prometheus metrics, readiness, the controller's debug port. They answer
//! from memory, but they listen where others can connect — the metrics and readiness ports on
//! every address, for Prometheus and the kubelet — and share the process's file descriptors
//! with the data path. So each listener bounds what one client can hold:
//!
//! - a connection that sends no complete request head within [`IDLE_TIMEOUT`] (at first, or
//!   between keep-alive requests) is closed — without it, a client that connected and went
//!   silent held a task and a descriptor for good;
//! - at most [`MAX_CONNECTIONS`] are open at once; a connection beyond that is closed as
//!   soon as it is accepted (and reported, at most once a second), so a flood of them cannot
//!   take the descriptors ztunnel needs for pods' traffic.
//!
//! Scrapers and probes open one connection at a time and finish in milliseconds.

use std::{
    convert::Infallible,
    future::Future,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::accept::{AcceptErrors, Throttle};

/// Which of a proxy's TCP endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// 127.0.0.1:15000: `/config_dump`, `/healthz/ready` (and ztunnel's `/capture`).
    Admin,
    /// :15020: Prometheus metrics at `/metrics` and `/stats/prometheus`.
    Metrics,
    /// :15021: `/healthz/ready` only.
    Readiness,
}

impl Endpoints {
    /// How log lines name the listener.
    pub fn name(self) -> &'static str {
        match self {
            Endpoints::Admin => "admin port",
            Endpoints::Metrics => "metrics port",
            Endpoints::Readiness => "readiness port",
        }
    }
}

/// How long a connection may go without sending a complete request head.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections one endpoint listener serves at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What one listener allows; [`Limits::default`] is what the binaries use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub idle: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { idle: IDLE_TIMEOUT, max_connections: MAX_CONNECTIONS }
    }
}

/// An HTTP/1.1 server connection builder that closes a connection idle for `idle` before a
/// request head (hyper's header-read timeout, which also runs between keep-alive requests).
/// For servers whose handler is not a plain function of the request (the controller's CA).
pub fn http1_server(idle: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(idle);
    builder
}

/// A listener the endpoints can be served on: TCP, or ztunnel's Unix readiness socket.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> io::Result<Self::Io> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> io::Result<Self::Io> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Serves `respond` on every connection `listener` accepts, within `limits`, until the task
/// is dropped. `name` says which endpoint ("admin port", "metrics port") in the lines handed
/// to `report` for the operator (the proxies log them with [`warn_line`]; the controller
/// writes its own log).
pub async fn serve<L, F>(listener: L, name: &'static str, limits: Limits, report: fn(&str), respond: F)
where
    L: Listener,
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let respond = Arc::new(respond);
    let open = Arc::new(AtomicUsize::new(0));
    let mut errors = AcceptErrors::new();
    let mut refusals = Throttle::default();
    loop {
        let io = match listener.accept_io().await {
            Ok(io) => io,
            Err(e) => {
                errors.back_off(&e, |line| report(&format!("{name}: {line}"))).await;
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= limits.max_connections {
            drop(io);
            if let Some(count) = refusals.note(Instant::now()) {
                report(&format!(
                    "{name}: {} connections are open, the most it serves at once; closed {count} more \
                     since the last report (a client opening connections without closing them?)",
                    limits.max_connections
                ));
            }
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let slot = OpenConnection(open.clone());
        let respond = respond.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let response = respond(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            // Timeouts and clients that went away: theirs to know, not the operator's.
            if let Err(e) = http1_server(limits.idle).serve_connection(TokioIo::new(io), service).await {
                debug!("{name}: connection ended: {e}");
            }
        });
    }
}

/// Logs a report line as a warning (the proxies' `report` for [`serve`]).
pub fn warn_line(line: &str) {
    warn!("{line}");
}

/// Counts a connection as open until its task ends.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response with `status` and a text body.
pub fn text(status: http::StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::StatusCode;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        time::timeout,
    };

    use super::*;

    async fn start(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            "test port",
            limits,
            |line| eprintln!("{line}"),
            |req| text(StatusCode::OK, format!("you asked for {}\n", req.uri().path())),
        ));
        addr
    }

    /// Sends one request on `stream` and reads the response (Content-Length framed).
    async fn exchange(stream: &mut TcpStream, path: &str) -> String {
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !String::from_utf8_lossy(&got).ends_with('\n') || !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    /// How long until the server closes `stream` (EOF or reset), up to `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        match timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => Some(started.elapsed()),
            Ok(Ok(n)) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn it_answers_and_keeps_the_connection_alive() {
        let addr = start(Limits::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(exchange(&mut stream, "/a").await.ends_with("you asked for /a\n"));
        assert!(exchange(&mut stream, "/b").await.ends_with("you asked for /b\n"));
    }

    #[tokio::test]
    async fn a_silent_or_idle_connection_is_closed_after_the_idle_timeout() {
        let idle = Duration::from_millis(300);
        let addr = start(Limits { idle, ..Limits::default() }).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut idle_after_one = TcpStream::connect(addr).await.unwrap();
        exchange(&mut idle_after_one, "/").await;
        for stream in [&mut silent, &mut partial, &mut idle_after_one] {
            let after = closed_within(stream, Duration::from_secs(10)).await.expect("closed by the server");
            assert!(after < Duration::from_secs(5), "closed only after {after:?}");
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once_until_others_end() {
        let limits = Limits { idle: Duration::from_secs(60), max_connections: 2 };
        let addr = start(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // Served, so the server has counted it before the next connect.
            exchange(&mut stream, "/").await;
            held.push(stream);
        }
        let mut third = TcpStream::connect(addr).await.unwrap();
        let after = closed_within(&mut third, Duration::from_secs(10)).await.expect("closed at once");
        assert!(after < Duration::from_secs(5), "closed only after {after:?}");
        drop(held);
        // The server sees the two close and serves again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET /again HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) = timeout(Duration::from_secs(5), stream.read(&mut buf)).await
                && n > 0
            {
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
                break;
            }
            assert!(Instant::now() < deadline, "never served again after the held connections closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
