//! HBONE: TCP carried in an HTTP/2 CONNECT stream inside mutual TLS, as Istio's ztunnel speaks
//! it. The request is `CONNECT <ip:port>` with `forwarded`, `baggage` and `traceparent`
//! headers; the server answers 200 then streams bytes, 401 when policy denies, 400 for a
//! malformed request or a destination this connection does not serve, 503 when the upstream
//! connect fails.

use std::{io, net::SocketAddr};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header::HeaderName};

mod stream;

pub use stream::H2Stream;

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

/// How much encrypted output rustls may hold for one HBONE connection before a write waits
/// for the socket. rustls's default (64 KiB) is smaller than one 64 KiB DATA frame plus its
/// 9-byte header, so every such frame was cut: the last bytes went out in a TLS record, a
/// `writev` and a TCP segment of their own (measured: one 31-byte segment per 64 KiB). Four
/// frames' worth keeps a frame whole and still bounds what a connection buffers.
pub const TLS_OUTPUT_LIMIT: usize = 256 * 1024;

/// The largest TLS record's plaintext (RFC 8446 §5.1).
pub const TLS_RECORD_PLAINTEXT: usize = 16 * 1024;

/// A relay chunk that, with the DATA frame header in front of it, fills whole TLS records
/// exactly (4 × 16 KiB), so HBONE sends no record smaller than the ones before it.
pub const DATA_CHUNK: usize = 4 * TLS_RECORD_PLAINTEXT - 9;

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
    #[error("the mTLS and HTTP/2 handshakes did not complete within {0:?}")]
    Timeout(std::time::Duration),
}

/// The server side of an HBONE connection (what a pod's 15008 and a waypoint accept): mTLS
/// presenting `own` and requiring a client of its trust domain under `bundle`, then HTTP/2
/// with HBONE's windows. Returns the client's verified identity and the connection whose
/// CONNECT streams to serve. Both handshakes must be done within
/// [`crate::accept::HANDSHAKE_TIMEOUT`].
pub async fn accept(
    tcp: tokio::net::TcpStream,
    own: &crate::ca::WorkloadCertificate,
    bundle: &crate::tls::TrustBundle,
) -> Result<(crate::identity::SpiffeId, ServerConnection), HandshakeError> {
    bounded(crate::accept::HANDSHAKE_TIMEOUT, handshakes(tcp, own, bundle)).await
}

/// An accepted HBONE connection, whose CONNECT streams are to be served.
pub type ServerConnection =
    h2::server::Connection<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Bytes>;

async fn handshakes(
    tcp: tokio::net::TcpStream,
    own: &crate::ca::WorkloadCertificate,
    bundle: &crate::tls::TrustBundle,
) -> Result<(crate::identity::SpiffeId, ServerConnection), HandshakeError> {
    let config = crate::tls::server_config(own, bundle)?;
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
        .accept(tcp)
        .await
        .map_err(HandshakeError::Tls)?;
    tls.get_mut().1.set_buffer_limit(Some(TLS_OUTPUT_LIMIT));
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
) -> Result<(h2::client::SendRequest<Bytes>, ClientConnection), HandshakeError> {
    bounded(crate::accept::HANDSHAKE_TIMEOUT, client_handshakes(tcp, own, bundle, expected)).await
}

/// A dialled HBONE connection's driver, to be spawned.
pub type ClientConnection =
    h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Bytes>;

/// `handshakes` if they complete within `timeout`. Unbounded, a client that connects and sends
/// nothing would hold a server's task and descriptor for good, and a server that takes the
/// connection and never answers would hold the dial (in a pool that dials once per key, every
/// stream waiting for it).
async fn bounded<T>(
    timeout: std::time::Duration,
    handshakes: impl std::future::Future<Output = Result<T, HandshakeError>>,
) -> Result<T, HandshakeError> {
    tokio::time::timeout(timeout, handshakes).await.unwrap_or(Err(HandshakeError::Timeout(timeout)))
}

async fn client_handshakes(
    tcp: tokio::net::TcpStream,
    own: &crate::ca::WorkloadCertificate,
    bundle: &crate::tls::TrustBundle,
    expected: &crate::identity::SpiffeId,
) -> Result<(h2::client::SendRequest<Bytes>, ClientConnection), HandshakeError> {
    let config = crate::tls::client_config(own, bundle, expected)?;
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().map_err(HandshakeError::Tls)?;
    // HBONE sends no SNI; the name only satisfies the API.
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(HandshakeError::Tls)?;
    tls.get_mut().1.set_buffer_limit(Some(TLS_OUTPUT_LIMIT));
    Ok(h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .handshake(tls)
        .await?)
}

// A relay chunk plus its DATA frame header is exactly four full TLS records.
const _: () = assert!(DATA_CHUNK + 9 == 4 * TLS_RECORD_PLAINTEXT);

#[cfg(test)]
mod handshake_tests {
    use std::time::Duration;

    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::{ca::Ca, identity::SpiffeId, tls::TrustBundle};

    pub(crate) fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// A connected pair of loopback TCP sockets.
    pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A client that connects and sends nothing is let go when the handshake time is up
    /// (else each such connection would hold a task and a descriptor for good); one that
    /// completes mTLS but never sends the HTTP/2 preface, too.
    #[tokio::test]
    async fn a_client_that_never_completes_the_handshakes_is_dropped() {
        let ca = Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        let server_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/payment"), Duration::from_secs(600)).unwrap();
        let client_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/checkout"), Duration::from_secs(600)).unwrap();
        let limit = Duration::from_millis(300);

        let (mut silent, server_side) = tcp_pair().await;
        let outcome = bounded(limit, handshakes(server_side, &server_id, &bundle)).await;
        assert!(matches!(outcome, Err(HandshakeError::Timeout(t)) if t == limit), "{:?}", outcome.err());
        let mut byte = [0u8; 1];
        assert_eq!(silent.read(&mut byte).await.unwrap(), 0, "the server kept the silent connection");

        // mTLS done, then nothing: the HTTP/2 preface is part of the bound.
        let (client_tcp, server_side) = tcp_pair().await;
        let config = crate::tls::client_config(&client_id, &bundle, &server_id.identity).unwrap();
        let client = tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let mut tls = connector.connect(name, client_tcp).await.unwrap();
            // Held open without a preface, reading (the server's SETTINGS) until it closes.
            let mut sink = Vec::new();
            let _ = tls.read_to_end(&mut sink).await;
        });
        let outcome = bounded(limit, handshakes(server_side, &server_id, &bundle)).await;
        assert!(matches!(outcome, Err(HandshakeError::Timeout(_))), "{:?}", outcome.err());
        let closed = tokio::time::timeout(Duration::from_secs(5), client).await;
        assert!(closed.is_ok(), "the server kept the connection");
    }

    /// A server that takes the connection and never answers ends the dial with a timeout.
    #[tokio::test]
    async fn a_server_that_never_answers_ends_the_dial() {
        let ca = Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        let client_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/checkout"), Duration::from_secs(600)).unwrap();
        let (client_tcp, _silent_server) = tcp_pair().await;
        let limit = Duration::from_millis(300);
        let expected = id("spiffe://cluster.local/ns/shop/sa/payment");
        let outcome = bounded(limit, client_handshakes(client_tcp, &client_id, &bundle, &expected)).await;
        assert!(matches!(outcome, Err(HandshakeError::Timeout(t)) if t == limit), "{:?}", outcome.err());
    }
}
