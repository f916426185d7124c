//! HBONE in ztunnel: the client side (a pool of mTLS HTTP/2 connections, many CONNECT streams
//! on each) and the server side (a pod's 15008 listener).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Response, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::{debug, info, warn};
use warren_core::{
    accept::HandshakeSlot,
    activity::Activity,
    dial_gate::DialGate,
    hbone::{self, ConnectRequest, H2Stream},
    identity::SpiffeId,
};

use crate::{
    certs::CertError,
    metrics::{ConnectionLabels, Peer, Reporter, Security},
    proxy::{PodContext, connect_from_pod},
};

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("certificates: {0}")]
    Certs(#[from] CertError),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("mTLS handshake with {addr} (expecting {expected}): {source}")]
    Tls { addr: SocketAddr, expected: SpiffeId, source: io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: h2::Error },
    #[error("the peer answered the CONNECT with {0}")]
    Status(StatusCode),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The dial this connection waited behind failed; it fails alike rather than dial again.
    #[error("{0}")]
    DialFailed(String),
}

/// What a pooled connection is for: the same source and destination identities, the same
/// destination address, from the same source IP.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: SpiffeId,
    pub dst_identity: SpiffeId,
    pub dst: SocketAddr,
    pub src_ip: IpAddr,
}

struct PooledConn {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

impl PooledConn {
    /// Takes a stream slot if the connection is alive and below the limit.
    fn reserve(&self, max: usize) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        self.active.try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }
}

pub struct Pool {
    max_streams: usize,
    idle_timeout: Duration,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<PooledConn>>>>,
    /// One dial per key at a time; connections that waited behind a failed dial fail with it
    /// (a dead node costs them one connect timeout together, not one each in turn).
    dialing: DialGate<PoolKey>,
    pub connections_opened: AtomicUsize,
    /// Dials that failed (connect, mTLS, HTTP/2 handshake); the connections that waited
    /// behind one and failed with it are not counted again.
    pub dials_failed: AtomicUsize,
}

impl Pool {
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(Self {
            max_streams: max_streams.max(1),
            idle_timeout,
            conns: Mutex::new(HashMap::new()),
            dialing: DialGate::default(),
            connections_opened: AtomicUsize::new(0),
            dials_failed: AtomicUsize::new(0),
        });
        tokio::spawn(Self::release_idle(Arc::downgrade(&pool)));
        pool
    }

    /// Open pooled connections, for the admin view.
    pub fn open_connections(&self) -> usize {
        self.conns
            .lock()
            .expect("poisoned")
            .values()
            .flatten()
            .filter(|c| !c.closed.load(Ordering::Relaxed))
            .count()
    }

    /// CONNECT streams in use across the pooled connections.
    pub fn active_streams(&self) -> usize {
        self.conns
            .lock()
            .expect("poisoned")
            .values()
            .flatten()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }

    fn try_reserve(&self, key: &PoolKey) -> Option<Arc<PooledConn>> {
        let mut conns = self.conns.lock().expect("poisoned");
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.closed.load(Ordering::Relaxed));
        list.iter().find(|c| c.reserve(self.max_streams)).cloned()
    }

    /// A connection with a free stream slot: an existing one, or a new one. Only one dial per
    /// key is in flight; others wait for it, and fail with it if it fails.
    async fn checkout(&self, key: &PoolKey, pod: &PodContext) -> Result<Arc<PooledConn>, HboneError> {
        if let Some(c) = self.try_reserve(key) {
            return Ok(c);
        }
        let mut turn = self.dialing.turn(key).await;
        if let Some(c) = self.try_reserve(key) {
            return Ok(c);
        }
        if let Some(error) = turn.failed_while_waiting() {
            return Err(HboneError::DialFailed(error.to_owned()));
        }
        let dialed = dial(key, pod).await;
        turn.record(dialed.as_ref().err());
        if dialed.is_err() {
            self.dials_failed.fetch_add(1, Ordering::Relaxed);
        }
        let conn = Arc::new(dialed?);
        conn.active.store(1, Ordering::Release);
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().expect("poisoned").entry(key.clone()).or_default().push(conn.clone());
        Ok(conn)
    }

    /// Opens a CONNECT stream for `request` over a pooled connection.
    pub async fn connect(
        &self,
        key: &PoolKey,
        request: &ConnectRequest,
        pod: &PodContext,
    ) -> Result<PooledStream, HboneError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let conn = self.checkout(key, pod).await?;
            let guard = StreamGuard(conn.clone());
            match open_stream(&conn, request, key.dst).await {
                Ok(stream) => {
                    return Ok(PooledStream { inner: stream, _guard: guard });
                }
                // A pooled connection the peer has since closed: mark it and dial afresh once.
                Err(HboneError::H2 { .. }) if attempt == 1 => conn.closed.store(true, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
    }

    async fn release_idle(pool: std::sync::Weak<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let Some(pool) = pool.upgrade() else { return };
            let mut conns = pool.conns.lock().expect("poisoned");
            for list in conns.values_mut() {
                list.retain(|c| {
                    let idle = c.active.load(Ordering::Acquire) == 0
                        && c.idle_since.lock().expect("poisoned").elapsed() > pool.idle_timeout;
                    // Dropping the last SendRequest lets h2 close the connection cleanly.
                    !idle && !c.closed.load(Ordering::Relaxed)
                });
            }
            conns.retain(|_, list| !list.is_empty());
        }
    }
}

async fn open_stream(
    conn: &PooledConn,
    request: &ConnectRequest,
    dst: SocketAddr,
) -> Result<H2Stream, HboneError> {
    let h2 = |source| HboneError::H2 { addr: dst, source };
    let mut send = conn.send.clone().ready().await.map_err(h2)?;
    let (response, stream) = send.send_request(request.to_request(), false).map_err(h2)?;
    let response = response.await.map_err(h2)?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}

/// TCP from inside the source pod's netns (so the source IP is the pod's), mTLS presenting
/// the source identity and expecting the destination's, then HTTP/2.
async fn dial(key: &PoolKey, pod: &PodContext) -> Result<PooledConn, HboneError> {
    let certs = &pod.proxy.certs;
    let own = certs.get(&key.src_identity).await?;
    let tcp = connect_from_pod(pod, key.dst)
        .await
        .map_err(|source| HboneError::Connect { addr: key.dst, source })?;
    let (send, connection) =
        hbone::connect(tcp, &own, certs.bundle()?, &key.dst_identity).await.map_err(|e| match e {
            hbone::HandshakeError::H2(source) => HboneError::H2 { addr: key.dst, source },
            hbone::HandshakeError::Config(e) => HboneError::Config(e),
            other => HboneError::Tls {
                addr: key.dst,
                expected: key.dst_identity.clone(),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
    let closed = Arc::new(AtomicBool::new(false));
    let (dst, closed_flag) = (key.dst, closed.clone());
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%dst, "HBONE connection ended: {e}");
        }
        closed_flag.store(true, Ordering::Relaxed);
    });
    debug!(src = %key.src_identity, dst = %key.dst_identity, addr = %key.dst, "HBONE connection opened");
    Ok(PooledConn {
        send,
        active: Arc::new(AtomicUsize::new(0)),
        closed,
        idle_since: Mutex::new(Instant::now()),
    })
}

/// Gives the stream slot back when the stream ends.
struct StreamGuard(Arc<PooledConn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("poisoned") = Instant::now();
        }
    }
}

/// A CONNECT stream that holds its pool slot while alive.
pub struct PooledStream {
    inner: H2Stream,
    _guard: StreamGuard,
}

impl PooledStream {
    pub fn stream_mut(&mut self) -> &mut H2Stream {
        &mut self.inner
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Server side: one TCP connection accepted on a pod's 15008 listener. Terminates mTLS with
/// the pod's own certificate, then serves CONNECT streams until the peer goes away.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    handshake: HandshakeSlot,
) {
    let certs = &pod.proxy.certs;
    let identity = pod.workload.identity(&pod.proxy.trust_domain);
    let own = match certs.get(&identity).await {
        Ok(own) => own,
        Err(e) => {
            warn!(pod = pod.pod, %peer, "HBONE connection refused: {e}");
            return;
        }
    };
    let bundle = match certs.bundle() {
        Ok(b) => b,
        Err(e) => {
            warn!(pod = pod.pod, %peer, "HBONE connection refused: {e}");
            return;
        }
    };
    let (src_identity, mut connection) = match hbone::accept(stream, &own, bundle).await {
        Ok(accepted) => accepted,
        Err(e) => {
            info!(target: "access", direction = "inbound", protocol = "HBONE", pod = pod.pod, src = %peer, error = %e, "connection refused");
            return;
        }
    };
    drop(handshake);
    let mut draining = pod.proxy.draining.subscribe();
    let mut going_away = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            _ = draining.wait_for(|d| *d), if !going_away => {
                // Streams already open carry on; the peer opens new ones on a new connection.
                connection.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        let Some(next) = next else { break };
        let Ok((request, respond)) = next else { break };
        let (pod, src_identity) = (pod.clone(), src_identity.clone());
        tokio::spawn(async move { serve_stream(request, respond, peer, src_identity, &pod).await });
    }
}

async fn serve_stream(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    src_identity: SpiffeId,
    pod: &PodContext,
) {
    let started = Instant::now();
    let proxy = &pod.proxy;
    let connect = match ConnectRequest::from_request(&request) {
        Ok(c) => c,
        Err(e) => {
            refuse(&mut respond, pod, peer, &src_identity, None, e.status(), &e.to_string());
            return;
        }
    };
    let target = connect.target;
    let index = proxy.index();
    let source = index.by_ip(peer.ip()).map(|w| Peer::of(w, &proxy.trust_domain));
    let me = pod.current();
    let mut labels = ConnectionLabels {
        reporter: Reporter::Destination,
        source: source.unwrap_or_else(|| Peer::from_identity(&src_identity)),
        destination: Peer::of(&me, &proxy.trust_domain),
        destination_service: target.ip().to_string(),
        security: Security::MutualTls,
        response_flags: "-",
    };
    if !pod.workload.ips.contains(&target.ip().to_canonical()) {
        let reason = format!("CONNECT to {target}, which is not this pod's IP");
        refuse(&mut respond, pod, peer, &src_identity, None, StatusCode::BAD_REQUEST, &reason);
        return;
    }
    // The TCP peer of this HBONE connection is the source pod's IP: its ztunnel dialed from
    // inside the source pod's netns.
    let policies = proxy.policies();
    let index = proxy.index();
    let decision =
        crate::enforce::decide(&policies, &index, Some(&src_identity), peer.ip(), &me, target.port(), false);
    if let Err(reason) = decision {
        proxy.stats.denied_by_policy.fetch_add(1, Ordering::Relaxed);
        labels.response_flags = "DENIED";
        refuse(&mut respond, pod, peer, &src_identity, Some(&labels), StatusCode::UNAUTHORIZED, &reason);
        return;
    }
    let mut upstream = match connect_from_pod(pod, target).await {
        Ok(s) => s,
        Err(e) => {
            labels.response_flags = "UF";
            let reason = format!("connecting to {target}: {e}");
            refuse(
                &mut respond,
                pod,
                peer,
                &src_identity,
                Some(&labels),
                StatusCode::SERVICE_UNAVAILABLE,
                &reason,
            );
            return;
        }
    };
    let ok = Response::builder().status(StatusCode::OK).body(()).expect("static response");
    let Ok(send) = respond.send_response(ok, false) else { return };
    proxy.stats.hbone_streams_served.fetch_add(1, Ordering::Relaxed);
    proxy.metrics.opened(&labels);
    let mut downstream = H2Stream::new(send, request.into_body());
    // Counts as the bytes move, so a connection that ends in an error, or is closed by
    // policy, still reports them.
    let moved = Activity::new();
    downstream.watch_activity(moved.clone());
    let (_tracked, closed) =
        proxy.tracker.track(Some(src_identity.clone()), peer.ip(), target.ip(), target.port(), false);
    // (client → application, application → client), as `splice` counts.
    let relay = async {
        let (to_client, from_client) = downstream.relay_with_tcp(&mut upstream).await?;
        Ok((from_client, to_client))
    };
    // On a policy close, dropping the stream resets it: the client's ztunnel closes its side.
    let (from_client, to_client, error) = match crate::proxy::until_closed(relay, Some(closed)).await {
        Ok((a, b)) => (a, b, String::new()),
        Err(e) => {
            let (to_client, from_client) = moved.bytes();
            (from_client, to_client, e)
        }
    };
    proxy.metrics.closed(&labels, to_client, from_client);
    info!(
        target: "access",
        direction = "inbound",
        protocol = "HBONE",
        pod = pod.pod,
        src = %connect.forwarded_for.unwrap_or(peer),
        src_identity = %src_identity,
        dst = %target,
        dst_identity = %pod.workload.identity(&proxy.trust_domain),
        bytes_sent = to_client,
        bytes_received = from_client,
        duration_ms = started.elapsed().as_millis() as u64,
        error,
        "connection complete"
    );
}

/// Answers a CONNECT with an error status, logs it, and counts it.
fn refuse(
    respond: &mut h2::server::SendResponse<Bytes>,
    pod: &PodContext,
    peer: SocketAddr,
    src_identity: &SpiffeId,
    labels: Option<&ConnectionLabels>,
    status: StatusCode,
    reason: &str,
) {
    if let Some(labels) = labels {
        pod.proxy.metrics.failed(labels);
    }
    info!(target: "access", direction = "inbound", protocol = "HBONE", pod = pod.pod, src = %peer,
          src_identity = %src_identity, response = status.as_u16(), error = reason, "connection refused");
    let response = Response::builder().status(status).body(()).expect("static response");
    let _ = respond.send_response(response, true);
}

/// The HBONE port on a destination pod.
pub fn hbone_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, hbone::PORT)
}
