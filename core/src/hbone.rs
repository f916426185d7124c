//! HBONE: TCP carried in an HTTP/2 CONNECT stream inside mutual TLS, as Istio's ztunnel speaks
//! it. The request is `CONNECT <ip:port>` with `forwarded`, `baggage` and `traceparent`
//! headers; the server answers 200 then streams bytes, 401 when policy denies, 400 for a
//! malformed request or a destination this connection does not serve, 503 when the upstream
//! connect fails.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode, header::HeaderName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HBONE's port on every meshed pod.
pub const PORT: u16 = 15008;

pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub static BAGGAGE: HeaderName = HeaderName::from_static("baggage");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// HTTP/2 windows: large enough that one stream can fill a fast link (h2's 64 KiB default
/// caps a stream at a window per round trip).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const FRAME_SIZE: u32 = 1024 * 1024;

/// What the CONNECT request says about the connection it carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    pub target: SocketAddr,
    /// The original client address (`forwarded: for=`), when given.
    pub forwarded_for: Option<SocketAddr>,
    pub baggage: Option<String>,
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    NotConnect(Method),
    #[error("CONNECT authority {0:?} is not an ip:port")]
    BadAuthority(String),
}

impl RequestError {
    /// The status HBONE answers with.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }
}

impl ConnectRequest {
    pub fn new(target: SocketAddr) -> Self {
        Self { target, forwarded_for: None, baggage: None, traceparent: None }
    }

    /// The HTTP/2 request to send.
    pub fn to_request(&self) -> Request<()> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.target.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        let headers = req.headers_mut();
        if let Some(src) = self.forwarded_for
            && let Ok(v) = format!("for=\"{src}\"").parse()
        {
            headers.insert(FORWARDED.clone(), v);
        }
        if let Some(b) = self.baggage.as_deref().and_then(|b| b.parse().ok()) {
            headers.insert(BAGGAGE.clone(), b);
        }
        if let Some(t) = self.traceparent.as_deref().and_then(|t| t.parse().ok()) {
            headers.insert(TRACEPARENT.clone(), t);
        }
        req
    }

    /// Reads a received request.
    pub fn from_request<B>(req: &Request<B>) -> Result<Self, RequestError> {
        if req.method() != Method::CONNECT {
            return Err(RequestError::NotConnect(req.method().clone()));
        }
        let authority = req.uri().authority().map(|a| a.as_str().to_string()).unwrap_or_default();
        let target = authority.parse().map_err(|_| RequestError::BadAuthority(authority))?;
        let header =
            |name: &HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let forwarded_for = header(&FORWARDED).and_then(|f| parse_forwarded_for(&f));
        Ok(Self { target, forwarded_for, baggage: header(&BAGGAGE), traceparent: header(&TRACEPARENT) })
    }
}

/// `for="10.0.0.1:1234"` (or `for="[fd00::1]:1234"`) from a `forwarded` header.
fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

/// The `baggage` header Istio's ztunnel sends: the source workload's Kubernetes facts.
pub fn baggage(namespace: &str, workload: &str, service: &str, version: &str) -> String {
    format!(
        "k8s.namespace.name={namespace},k8s.deployment.name={workload},service.name={service},service.version={version}"
    )
}

/// A fresh W3C `traceparent` (sampled flag off): new random trace and span ids.
pub fn new_traceparent() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-00", hex(&bytes[..16]), hex(&bytes[16..]))
}

/// One CONNECT stream as a byte stream, so `tokio::io::copy_bidirectional` can splice it to a
/// TCP socket. Reading releases HTTP/2 flow-control capacity as data is consumed; shutting
/// down the write side ends the stream (END_STREAM).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    recv_done: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new(), recv_done: false }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                let _ = self.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if self.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.recv_done = true,
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(buf.len());
                self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(h2_to_io(e))),
            None => Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_request_round_trips_with_its_headers() {
        let mut r = ConnectRequest::new("10.1.2.3:8080".parse().unwrap());
        r.forwarded_for = Some("[fd00::1]:4444".parse().unwrap());
        r.baggage = Some(baggage("shop", "checkout", "checkout", "v1"));
        r.traceparent = Some(new_traceparent());
        let req = r.to_request();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.1.2.3:8080");
        assert_eq!(req.headers()["forwarded"], "for=\"[fd00::1]:4444\"");
        assert_eq!(ConnectRequest::from_request(&req).unwrap(), r);
    }

    #[test]
    fn malformed_requests_are_400() {
        let get = Request::builder().method(Method::GET).uri("http://x/").body(()).unwrap();
        assert_eq!(ConnectRequest::from_request(&get).unwrap_err().status(), StatusCode::BAD_REQUEST);
        let by_name = Request::builder().method(Method::CONNECT).uri("payment.shop:8080").body(()).unwrap();
        assert!(matches!(ConnectRequest::from_request(&by_name), Err(RequestError::BadAuthority(_))));
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let t = new_traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 32, 16, 2]);
    }
}

/// Why an HBONE connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("mTLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("the peer presented no SPIFFE identity")]
    NoIdentity,
    #[error("HTTP/2 handshake failed: {0}")]
    H2(#[from] h2::Error),
}

/// The server side of an HBONE connection (what a pod's 15008 and a waypoint accept): mTLS
/// presenting `own` and requiring a client of its trust domain under `bundle`, then HTTP/2
/// with HBONE's windows. Returns the client's verified identity and the connection whose
/// CONNECT streams to serve.
pub async fn accept(
    tcp: tokio::net::TcpStream,
    own: &crate::ca::WorkloadCertificate,
    bundle: &crate::tls::TrustBundle,
) -> Result<
    (
        crate::identity::SpiffeId,
        h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Bytes>,
    ),
    HandshakeError,
> {
    let config = crate::tls::server_config(own, bundle)?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
        .accept(tcp)
        .await
        .map_err(HandshakeError::Tls)?;
    let peer =
        crate::tls::peer_identity(tls.get_ref().1.peer_certificates()).ok_or(HandshakeError::NoIdentity)?;
    let connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .handshake::<_, Bytes>(tls)
        .await?;
    Ok((peer, connection))
}

/// The client side over an established TCP connection: mTLS presenting `own` and expecting
/// the server to be `expected` (no SNI, ALPN h2), then HTTP/2 with HBONE's windows. The
/// returned connection future must be driven (spawned) for the sender to work.
pub async fn connect(
    tcp: tokio::net::TcpStream,
    own: &crate::ca::WorkloadCertificate,
    bundle: &crate::tls::TrustBundle,
    expected: &crate::identity::SpiffeId,
) -> Result<
    (
        h2::client::SendRequest<Bytes>,
        h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Bytes>,
    ),
    HandshakeError,
> {
    let config = crate::tls::client_config(own, bundle, expected)?;
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().map_err(HandshakeError::Tls)?;
    // HBONE sends no SNI; the name only satisfies the API.
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(HandshakeError::Tls)?;
    Ok(h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .handshake(tls)
        .await?)
}
