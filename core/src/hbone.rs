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

use crate::activity::{Activity, Direction};

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

/// One CONNECT stream as a byte stream (`AsyncRead` + `AsyncWrite`), so that hyper can serve
/// HTTP inside it. Reading releases HTTP/2 flow-control capacity as data is consumed; shutting
/// down the write side ends the stream (END_STREAM). For relaying, `relay_with_tcp` and
/// `relay_with_stream` move the frames' buffers themselves, without copying.
pub struct H2Stream {
    send: SendStream<Bytes>,
    received: Received,
    /// Told of every chunk the relays move, either way, when set.
    activity: Option<Activity>,
}

/// The receiving half: bytes handed back by the caller, then what h2 delivers.
struct Received {
    recv: RecvStream,
    /// Given back with `unread`: read first, their capacity already released.
    replay: Bytes,
    /// The rest of a frame a read did not take; its capacity not yet released.
    pending: Bytes,
    done: bool,
}

impl Received {
    /// The next received bytes and how much flow-control capacity to release once they have
    /// been passed on; `None` at the end of the stream.
    async fn next(&mut self) -> io::Result<Option<(Bytes, usize)>> {
        if !self.replay.is_empty() {
            return Ok(Some((std::mem::take(&mut self.replay), 0)));
        }
        if !self.pending.is_empty() {
            let data = std::mem::take(&mut self.pending);
            let n = data.len();
            return Ok(Some((data, n)));
        }
        if self.done {
            return Ok(None);
        }
        match std::future::poll_fn(|cx| self.recv.poll_data(cx)).await {
            Some(Ok(data)) => {
                let n = data.len();
                Ok(Some((data, n)))
            }
            Some(Err(e)) => Err(h2_to_io(e)),
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }

    fn release(&mut self, n: usize) {
        if n > 0 {
            let _ = self.recv.flow_control().release_capacity(n);
        }
    }

    /// Passes everything received to `send` as DATA frames, then END_STREAM.
    async fn forward_to(
        &mut self,
        send: &mut SendStream<Bytes>,
        activity: Option<(&Activity, Direction)>,
    ) -> io::Result<u64> {
        let mut moved = 0u64;
        while let Some((data, release)) = self.next().await? {
            let data_len = data.len();
            moved += data_len as u64;
            send_all(send, data).await?;
            self.release(release);
            if let Some((activity, direction)) = activity {
                activity.moved(direction, data_len);
            }
        }
        send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        Ok(moved)
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        let received = Received { recv, replay: Bytes::new(), pending: Bytes::new(), done: false };
        Self { send, received, activity: None }
    }

    /// Has the relays report every chunk they move, in either direction, to `activity` (for
    /// an idle timeout).
    pub fn watch_activity(&mut self, activity: Activity) {
        self.activity = Some(activity);
    }

    /// Puts bytes already read (a protocol sniff's) back in front of what is still to come.
    pub fn unread(&mut self, bytes: Bytes) {
        let replay = &mut self.received.replay;
        *replay = if replay.is_empty() { bytes } else { [bytes, std::mem::take(replay)].concat().into() };
    }

    /// Relays between this stream and a TCP socket until both directions have ended; returns
    /// (bytes TCP → stream, bytes stream → TCP). Unlike `copy_bidirectional` over the byte-
    /// stream view, no byte is copied in user space: each read from the socket lands in a
    /// buffer that becomes the DATA frame as is, and each received frame is written to the
    /// socket from h2's own buffer. The first end (EOF) is passed on as END_STREAM or FIN
    /// while the other direction runs on, as with `copy_bidirectional`.
    pub async fn relay_with_tcp(&mut self, tcp: &mut tokio::net::TcpStream) -> io::Result<(u64, u64)> {
        let (tcp_read, mut tcp_write) = tcp.split();
        let Self { send, received, activity } = self;
        let activity = activity.as_ref();
        let upstream = async {
            let mut moved = 0u64;
            loop {
                tcp_read.readable().await?;
                // Allocated only once there is something to read: an idle connection holds
                // no buffer. h2 frees the chunk once it has been encrypted.
                let mut chunk = bytes::BytesMut::with_capacity(DATA_CHUNK);
                match tcp_read.try_read_buf(&mut chunk) {
                    Ok(0) => {
                        send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                        return Ok::<_, io::Error>(moved);
                    }
                    Ok(n) => {
                        moved += n as u64;
                        send_all(send, chunk.freeze()).await?;
                        if let Some(activity) = activity {
                            activity.moved(Direction::IntoStream, n);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        let downstream = async {
            use tokio::io::AsyncWriteExt;
            let mut moved = 0u64;
            while let Some((data, release)) = received.next().await? {
                tcp_write.write_all(&data).await?;
                moved += data.len() as u64;
                received.release(release);
                if let Some(activity) = activity {
                    activity.moved(Direction::OutOfStream, data.len());
                }
            }
            tcp_write.shutdown().await?;
            Ok(moved)
        };
        tokio::try_join!(upstream, downstream)
    }

    /// Relays between two CONNECT streams (a waypoint's TCP passthrough) until both
    /// directions have ended, handing each received frame's buffer on as it is; returns
    /// (bytes self → other, bytes other → self). Reports to this stream's activity, not
    /// `other`'s.
    pub async fn relay_with_stream(&mut self, other: &mut H2Stream) -> io::Result<(u64, u64)> {
        let activity = self.activity.as_ref();
        tokio::try_join!(
            self.received.forward_to(&mut other.send, activity.map(|a| (a, Direction::OutOfStream))),
            other.received.forward_to(&mut self.send, activity.map(|a| (a, Direction::IntoStream)))
        )
    }
}

/// Sends `data` as DATA frames as flow control allows, without copying it.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n.min(data.len()),
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed")),
        };
        if granted > 0 {
            send.send_data(data.split_to(granted), false).map_err(h2_to_io)?;
        }
    }
    Ok(())
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
        let received = &mut self.received;
        loop {
            if !received.replay.is_empty() {
                let n = received.replay.len().min(buf.remaining());
                buf.put_slice(&received.replay[..n]);
                received.replay.advance(n);
                return Poll::Ready(Ok(()));
            }
            if !received.pending.is_empty() {
                let n = received.pending.len().min(buf.remaining());
                buf.put_slice(&received.pending[..n]);
                received.pending.advance(n);
                received.release(n);
                return Poll::Ready(Ok(()));
            }
            if received.done {
                return Poll::Ready(Ok(()));
            }
            match ready!(received.recv.poll_data(cx)) {
                Some(Ok(data)) => received.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => received.done = true,
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
mod relay_tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::*;
    use crate::{ca::Ca, identity::SpiffeId, tls::TrustBundle};

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    /// A connected pair of loopback TCP sockets.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
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

    /// Client application ⇄ relay ⇄ HBONE (real mTLS and HTTP/2 over loopback) ⇄ relay ⇄ an
    /// echoing server application: every byte arrives in order both ways, the half-close
    /// travels as END_STREAM and FIN, and both relays count what they moved.
    #[tokio::test]
    async fn relay_with_tcp_moves_every_byte_both_ways_and_passes_the_half_close_on() {
        let ca = Ca::generate("cluster.local").unwrap();
        let bundle = TrustBundle::new(std::slice::from_ref(ca.root())).unwrap();
        let client_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/checkout"), Duration::from_secs(600)).unwrap();
        let server_id =
            ca.issue(&id("spiffe://cluster.local/ns/shop/sa/payment"), Duration::from_secs(600)).unwrap();
        let (hbone_client_tcp, hbone_server_tcp) = tcp_pair().await;

        let server_bundle = bundle.clone();
        let expected = server_id.identity.clone();
        let server = tokio::spawn(async move {
            let (_peer, mut connection) = accept(hbone_server_tcp, &server_id, &server_bundle).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            let mut stream = H2Stream::new(send, request.into_body());
            // The server application echoes until the client's FIN, then closes.
            let (mut to_app, mut app) = tcp_pair().await;
            let echo = tokio::spawn(async move {
                let (mut r, mut w) = app.split();
                let n = tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
                n
            });
            let moved = stream.relay_with_tcp(&mut to_app).await.unwrap();
            (moved, echo.await.unwrap())
        });

        let (send_request, connection) =
            connect(hbone_client_tcp, &client_id, &bundle, &expected).await.unwrap();
        tokio::spawn(connection);
        let mut send_request = send_request.ready().await.unwrap();
        let target = "10.0.0.1:80".parse().unwrap();
        let (response, send) =
            send_request.send_request(ConnectRequest::new(target).to_request(), false).unwrap();
        let mut stream = H2Stream::new(send, response.await.unwrap().into_body());
        let (mut app, mut to_relay) = tcp_pair().await;
        let client_relay = tokio::spawn(async move { stream.relay_with_tcp(&mut to_relay).await.unwrap() });

        // More than the stream window, in writes that do not line up with the relay's chunks.
        let sent: Vec<u8> = (0..5 * 1024 * 1024 + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        let (mut r, mut w) = app.split();
        let write = async {
            for piece in sent.chunks(100_003) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let read = r.read_to_end(&mut echoed);
        let ((), read) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
            .await
            .expect("the relays moved 5 MiB within 30 s");
        read.unwrap();
        assert!(
            echoed == sent,
            "the echo differs from what was sent ({} of {} bytes)",
            echoed.len(),
            sent.len()
        );

        let len = sent.len() as u64;
        assert_eq!(client_relay.await.unwrap(), (len, len), "client relay: (TCP → HBONE, HBONE → TCP)");
        let ((to_stream, to_tcp), echoed_by_app) = server.await.unwrap();
        assert_eq!((to_stream, to_tcp, echoed_by_app), (len, len, len), "server relay and application");
    }

    /// Both ends of one CONNECT stream over plain HTTP/2 in memory (h2's default 64 KiB
    /// windows, so flow control must be released for more to come).
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let client = async {
            let (send_request, connection) = h2::client::handshake(c).await.unwrap();
            tokio::spawn(connection);
            let mut send_request = send_request.ready().await.unwrap();
            let request = ConnectRequest::new("10.0.0.1:80".parse().unwrap()).to_request();
            send_request.send_request(request, false).unwrap()
        };
        let server = async {
            let mut connection = h2::server::handshake(s).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let send = respond.send_response(http::Response::new(()), false).unwrap();
            H2Stream::new(send, request.into_body())
        };
        let ((response, send), server_end) = tokio::join!(client, server);
        (H2Stream::new(send, response.await.unwrap().into_body()), server_end)
    }

    /// Writes of every size, small ones between bulk ones, while earlier writes are still
    /// queued behind flow control: every byte arrives, in order.
    #[tokio::test]
    async fn writes_of_any_size_arrive_whole_and_in_order() {
        let (mut writer, mut reader) = stream_pair().await;
        let sizes = [1, 7, 300, 16 * 1024, 16 * 1024 + 1, 5, 40_000, 2, 900, 70_000, 3, 16 * 1024 - 1, 11];
        let mut sent = Vec::new();
        for (round, size) in sizes.iter().cycle().take(60).enumerate() {
            sent.extend((0..*size).map(|i| ((i * 31 + round * 7) % 253) as u8));
        }
        let expected = sent.clone();
        let write = async move {
            let mut rest = &sent[..];
            for size in sizes.iter().cycle().take(60) {
                let (piece, tail) = rest.split_at(*size);
                writer.write_all(piece).await.unwrap();
                rest = tail;
            }
            writer.shutdown().await.unwrap();
            // Kept open till the reader is done: dropping a stream resets it.
            writer
        };
        let mut received = Vec::new();
        let read = reader.read_to_end(&mut received);
        let (_writer, read) =
            tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
                .await
                .expect("the writes arrived within 30 s");
        read.unwrap();
        assert!(received == expected, "{} of {} bytes, or out of order", received.len(), expected.len());
    }

    /// client ⇄ [stream a | relay | stream b] ⇄ server, as a waypoint passes TCP through:
    /// the bytes the relay sniffed and handed back with `unread` go first, the rest follows
    /// in order, END_STREAM crosses in both directions, and the counts are right.
    #[tokio::test]
    async fn relay_with_stream_replays_unread_bytes_and_moves_the_rest_both_ways() {
        let (mut client, mut a) = stream_pair().await;
        let (mut b, mut server) = stream_pair().await;
        let sent: Vec<u8> = (0..1024 * 1024 + 77).map(|i| (i * 13 % 241) as u8).collect();
        let relay = tokio::spawn(async move {
            let mut sniffed = [0u8; 10];
            a.read_exact(&mut sniffed).await.unwrap();
            // Handed back in pieces: each call goes in front of what was handed back before.
            a.unread(Bytes::copy_from_slice(&sniffed[6..]));
            a.unread(Bytes::new());
            a.unread(Bytes::copy_from_slice(&sniffed[..6]));
            let counts = a.relay_with_stream(&mut b).await.unwrap();
            (counts, a, b)
        });
        let reply = b"received everything".to_vec();
        let serve = {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                server.write_all(&reply).await.unwrap();
                server.shutdown().await.unwrap();
                got
            })
        };
        let talk = async {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), talk).await.expect("relayed within 30 s");
        assert_eq!(answer, reply);
        let got = serve.await.unwrap();
        assert!(got == sent, "the server got {} bytes, not the {} sent in order", got.len(), sent.len());
        let (counts, _a, _b) = relay.await.unwrap();
        assert_eq!(counts, (sent.len() as u64, reply.len() as u64));
    }
}
