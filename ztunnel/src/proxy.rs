//! The in-pod listeners' accept loops and what happens to each connection.
//!
//! - Outbound (15001): the original destination decides. A meshed (enrolled) workload is
//!   reached over HBONE, from the source pod's netns with the source pod's identity; anything
//!   else is relayed as plain TCP from the source pod's netns.
//! - Inbound plaintext (15006): delivered to the application inside the pod.
//! - HBONE (15008): mTLS + HTTP/2 CONNECT, see `hbone`.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use http::StatusCode;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{info, warn};
use warren_core::{
    accept::{AcceptErrors, Handshakes},
    activity::{self, Activity},
    hbone::{ConnectRequest, baggage, new_traceparent},
    model::{Workload, WorkloadIndex},
    policy::Policies,
};
use warren_ebpf_types::ListenerKind;

use crate::{
    capture::Capture,
    certs::CertManager,
    enforce::{self, Tracker},
    hbone::{self, HboneError, Pool, PoolKey},
    metrics::{ConnectionLabels, Metrics, Peer, Reporter, Security},
    netns,
    route::{self, RoundRobin, Route},
};

/// What every connection on this node shares.
pub struct Proxy {
    pub capture: Arc<Capture>,
    pub certs: Arc<CertManager>,
    pub pool: Arc<Pool>,
    pub index: RwLock<Arc<WorkloadIndex>>,
    pub policies: RwLock<Arc<Policies>>,
    pub tracker: Tracker,
    pub metrics: Metrics,
    pub round_robin: RoundRobin,
    pub stats: Stats,
    pub mark: u32,
    pub trust_domain: String,
    /// How long a TCP connect may take (`--connect-timeout-ms`).
    pub connect_timeout: std::time::Duration,
    /// Turns true when this ztunnel drains: its HBONE server connections then tell their
    /// peers (GOAWAY) to open new streams elsewhere — on a new connection, which reaches the
    /// ztunnel that took over — while the streams they carry run on.
    pub draining: watch::Sender<bool>,
    /// HBONE connections still in their handshakes, per source: one source is held to
    /// [`warren_core::accept::MAX_HANDSHAKES_PER_SOURCE`].
    pub handshakes: Arc<Handshakes>,
}

impl Proxy {
    pub fn index(&self) -> Arc<WorkloadIndex> {
        self.index.read().expect("poisoned").clone()
    }

    pub fn policies(&self) -> Arc<Policies> {
        self.policies.read().expect("poisoned").clone()
    }
}

/// One enrolled pod, as its connections see it.
pub struct PodContext {
    /// `namespace/name`, for logs.
    pub pod: String,
    pub workload: Workload,
    pub netns: File,
    pub netns_cookie: u64,
    pub proxy: Arc<Proxy>,
}

impl PodContext {
    /// The pod as the config says now: labels can change after enrollment, and policy and
    /// metrics must see the current ones.
    pub fn current(&self) -> Arc<Workload> {
        self.proxy
            .index()
            .by_uid(&self.workload.uid)
            .cloned()
            .unwrap_or_else(|| Arc::new(self.workload.clone()))
    }
}

/// Connection counters of this ztunnel, shown by the admin view.
#[derive(Default, Serialize)]
pub struct Stats {
    pub outbound_accepted: AtomicU64,
    /// Outbound connections with no recorded original destination (closed at once).
    pub outbound_without_original_dst: AtomicU64,
    pub outbound_hbone: AtomicU64,
    pub outbound_passthrough: AtomicU64,
    pub inbound_plaintext_accepted: AtomicU64,
    pub hbone_accepted: AtomicU64,
    pub hbone_streams_served: AtomicU64,
    pub denied_by_policy: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
}

/// Starts one task per listener. Each runs until `stop` turns true: then it takes what is left
/// in its accept queue and closes the listener.
pub fn spawn_accept_loops(
    pod: &Arc<PodContext>,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<(std::net::IpAddr, ListenerKind, std::net::TcpListener)>,
    stop: &watch::Receiver<bool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut loops = Vec::new();
    for listener in outbound {
        let listener = TcpListener::from_std(listener)?;
        loops.push(tokio::spawn(accept_loop(listener, pod.clone(), Direction::Outbound, stop.clone())));
    }
    for (_, kind, listener) in inbound {
        let listener = TcpListener::from_std(listener)?;
        let direction = match kind {
            ListenerKind::InboundPlaintext => Direction::InboundPlaintext,
            ListenerKind::Hbone => Direction::Hbone,
        };
        loops.push(tokio::spawn(accept_loop(listener, pod.clone(), direction, stop.clone())));
    }
    Ok(loops)
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    InboundPlaintext,
    Hbone,
}

async fn accept_loop(
    listener: TcpListener,
    pod: Arc<PodContext>,
    direction: Direction,
    mut stop: watch::Receiver<bool>,
) {
    let mut errors = AcceptErrors::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // A dropped sender (the pod forgotten) stops the loop too.
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match accepted {
            Ok((stream, peer)) => handle(stream, peer, &pod, direction),
            Err(e) => errors.back_off(&e, |line| warn!(pod = pod.pod, ?direction, "{line}")).await,
        }
    }
    // Closing a listener resets the connections still in its accept queue (unless the pod's
    // netns has tcp_migrate_req and a sibling listener shares the port, during a hand-over).
    // Those clients were already told they are connected: serve them. Plain accept(2) on the
    // kernel's queue, not tokio's readiness, which may not have caught up yet.
    let Ok(listener) = listener.into_std() else {
        return;
    };
    while let Ok((stream, peer)) = listener.accept() {
        let stream = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
        match stream {
            Ok(stream) => handle(stream, peer, &pod, direction),
            Err(e) => warn!(pod = pod.pod, ?direction, "taking a queued connection failed: {e}"),
        }
    }
}

/// Serves one accepted connection in a task of its own.
fn handle(stream: TcpStream, peer: SocketAddr, pod: &Arc<PodContext>, direction: Direction) {
    // A relay forwards what it reads at once: Nagle would hold a small write (an HTTP/2
    // frame, a response tail) back until the previous one is acknowledged — up to a 40 ms
    // delayed ACK.
    let _ = stream.set_nodelay(true);
    let pod = pod.clone();
    match direction {
        Direction::Outbound => {
            tokio::spawn(async move { outbound(stream, peer, &pod).await });
        }
        Direction::InboundPlaintext => {
            tokio::spawn(async move { inbound_plaintext(stream, peer, &pod).await });
        }
        Direction::Hbone => {
            // Before a task exists: a source over its pending handshakes is closed at once.
            let handshake = match pod.proxy.handshakes.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(report) => {
                    if let Some(line) = report {
                        warn!(pod = pod.pod, "HBONE port: {line}");
                    }
                    return;
                }
            };
            pod.proxy.stats.hbone_accepted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(hbone::serve_connection(stream, peer, pod, handshake));
        }
    }
}

async fn outbound(stream: TcpStream, peer: SocketAddr, pod: &PodContext) {
    let stats = &pod.proxy.stats;
    stats.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let Some(original_dst) = pod.proxy.capture.take_original_dst(pod.netns_cookie, peer) else {
        stats.outbound_without_original_dst.fetch_add(1, Ordering::Relaxed);
        warn!(pod = pod.pod, %peer, "outbound connection without a recorded original destination: closed");
        return;
    };
    match route::resolve(&pod.proxy.index(), original_dst, &pod.proxy.round_robin) {
        Route::Hbone { authority, hbone_ip, peer: dst_workload, service } => {
            stats.outbound_hbone.fetch_add(1, Ordering::Relaxed);
            let target =
                HboneTarget { authority, hbone_ip, workload: &dst_workload, service: service.as_deref() };
            outbound_hbone(stream, peer, target, pod).await
        }
        Route::Passthrough { dst, service } => {
            stats.outbound_passthrough.fetch_add(1, Ordering::Relaxed);
            let labels = ConnectionLabels {
                reporter: Reporter::Source,
                source: Peer::of(&pod.current(), &pod.proxy.trust_domain),
                destination: Peer::unknown(),
                destination_service: service.map_or_else(|| dst.ip().to_string(), |s| s.hostname()),
                security: Security::Unknown,
                response_flags: "-",
            };
            // The client's own address is loopback inside its pod: log the pod's.
            let src = SocketAddr::new(pod.workload.ip_like(dst.ip()).unwrap_or(peer.ip()), peer.port());
            relay_until(stream, dst, pod, "outbound", src, None, Some(labels)).await
        }
        Route::Refused { reason: error, .. } => {
            stats.upstream_connect_failures.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction = "outbound", pod = pod.pod, src = %peer, dst = %original_dst,
                  error = %error, "connection failed");
            reset(&stream);
        }
    }
}

/// Where an HBONE connection goes.
struct HboneTarget<'a> {
    /// The CONNECT authority: the endpoint's ip:targetPort, or the VIP:port for a waypoint.
    authority: SocketAddr,
    /// Whose 15008 to dial.
    hbone_ip: std::net::IpAddr,
    workload: &'a Workload,
    service: Option<&'a warren_core::model::Service>,
}

async fn outbound_hbone(
    mut downstream: TcpStream,
    peer: SocketAddr,
    target: HboneTarget<'_>,
    pod: &PodContext,
) {
    let started = Instant::now();
    let td = &pod.proxy.trust_domain;
    let (dst, dst_workload) = (target.authority, target.workload);
    let src_ip = pod.workload.ip_like(target.hbone_ip).unwrap_or(peer.ip());
    let key = PoolKey {
        src_identity: pod.workload.identity(td),
        dst_identity: dst_workload.identity(td),
        dst: hbone::hbone_addr(target.hbone_ip),
        src_ip,
    };
    let me = pod.current();
    let version = me.labels.get("version").map(String::as_str).unwrap_or("latest");
    let app = me.labels.get("app").map(String::as_str).unwrap_or(&me.name);
    let request = ConnectRequest {
        target: dst,
        forwarded_for: Some(SocketAddr::new(src_ip, peer.port())),
        baggage: Some(baggage(&me.namespace, &me.name, app, version)),
        traceparent: Some(new_traceparent()),
    };
    let mut labels = ConnectionLabels {
        reporter: Reporter::Source,
        source: Peer::of(&me, td),
        destination: Peer::of(dst_workload, td),
        destination_service: target.service.map_or_else(|| dst.ip().to_string(), |s| s.hostname()),
        security: Security::MutualTls,
        response_flags: "-",
    };
    let metrics = &pod.proxy.metrics;
    let mut upstream = match pod.proxy.pool.connect(&key, &request, pod).await {
        Ok(s) => s,
        Err(e) => {
            labels.response_flags = if matches!(e, HboneError::Status(s) if s == StatusCode::UNAUTHORIZED) {
                "DENIED"
            } else {
                "UF"
            };
            metrics.failed(&labels);
            pod.proxy.stats.upstream_connect_failures.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction = "outbound", protocol = "HBONE", pod = pod.pod, src = %request.forwarded_for.unwrap_or(peer),
                  src_identity = %key.src_identity, dst = %dst, dst_identity = %key.dst_identity, error = %e, "connection failed");
            reset(&downstream);
            return;
        }
    };
    metrics.opened(&labels);
    // Counts as the bytes move, so a connection that ends in an error still reports them.
    let moved = Activity::new();
    upstream.stream_mut().watch_activity(moved.clone());
    let (sent, received, error) = match upstream.stream_mut().relay_with_tcp(&mut downstream).await {
        Ok((a, b)) => (a, b, String::new()),
        Err(e) => {
            let (into_stream, out_of_stream) = moved.bytes();
            (into_stream, out_of_stream, e.to_string())
        }
    };
    metrics.closed(&labels, received, sent);
    info!(
        target: "access",
        direction = "outbound",
        protocol = "HBONE",
        pod = pod.pod,
        src = %request.forwarded_for.unwrap_or(peer),
        src_identity = %key.src_identity,
        dst = %dst,
        dst_identity = %key.dst_identity,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        error,
        "connection complete"
    );
}

async fn inbound_plaintext(stream: TcpStream, peer: SocketAddr, pod: &PodContext) {
    let proxy = &pod.proxy;
    proxy.stats.inbound_plaintext_accepted.fetch_add(1, Ordering::Relaxed);
    // sk_lookup kept the packet's destination as the socket's local address.
    let Ok(original_dst) = stream.local_addr() else {
        return;
    };
    let original_dst = SocketAddr::new(original_dst.ip().to_canonical(), original_dst.port());
    let policies = proxy.policies();
    let me = pod.current();
    let decision =
        enforce::decide(&policies, &proxy.index(), None, peer.ip(), &me, original_dst.port(), true);
    let source = proxy.index().by_ip(peer.ip()).map(|w| Peer::of(w, &proxy.trust_domain));
    let mut labels = ConnectionLabels {
        reporter: Reporter::Destination,
        source: source.unwrap_or_else(Peer::unknown),
        destination: Peer::of(&me, &proxy.trust_domain),
        destination_service: original_dst.ip().to_string(),
        security: Security::None,
        response_flags: "-",
    };
    if let Err(reason) = decision {
        labels.response_flags = "DENIED";
        proxy.metrics.failed(&labels);
        proxy.stats.denied_by_policy.fetch_add(1, Ordering::Relaxed);
        info!(target: "access", direction = "inbound", protocol = "TCP", pod = pod.pod,
              src = %peer, dst = %original_dst, error = %reason, "connection refused");
        reset(&stream);
        return;
    }
    let (_tracked, closed) =
        proxy.tracker.track(None, peer.ip(), original_dst.ip(), original_dst.port(), true);
    relay_until(stream, original_dst, pod, "inbound", peer, Some(closed), Some(labels)).await;
}

/// Opens a socket inside the pod's netns, marked as ztunnel's, and connects it within the
/// connect timeout.
pub async fn connect_from_pod(pod: &PodContext, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns::run_in(&pod.netns, || {
        let domain = if dst.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        s.set_mark(pod.proxy.mark)?;
        s.set_tcp_nodelay(true)?;
        s.set_nonblocking(true)?;
        io::Result::Ok(s)
    })??;
    let connect = TcpSocket::from_std_stream(socket.into()).connect(dst);
    warren_core::connect::within(dst, pod.proxy.connect_timeout, connect).await
}

/// Resets rather than closes, so a client sees a failed connection as it would without the
/// mesh, not an empty response.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Relays until either side closes, or until `closed` fires (a policy now denies it).
async fn relay_until(
    mut downstream: TcpStream,
    dst: SocketAddr,
    pod: &PodContext,
    direction: &str,
    src: SocketAddr,
    closed: Option<tokio::sync::oneshot::Receiver<String>>,
    mut labels: Option<ConnectionLabels>,
) {
    let started = Instant::now();
    let metrics = &pod.proxy.metrics;
    let mut upstream = match connect_from_pod(pod, dst).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(l) = labels.as_mut() {
                l.response_flags = "UF";
                metrics.failed(l);
            }
            pod.proxy.stats.upstream_connect_failures.fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction, protocol = "TCP", pod = pod.pod, %src, %dst, error = %e, "connection failed");
            reset(&downstream);
            return;
        }
    };
    if let Some(l) = &labels {
        metrics.opened(l);
    }
    // Counted as they are read, so a connection that ends in an error or is closed by policy
    // still reports what had moved.
    let moved = Activity::new();
    let (mut counted_downstream, mut counted_upstream) = (
        Counted { inner: &mut downstream, activity: &moved, direction: activity::Direction::IntoStream },
        Counted { inner: &mut upstream, activity: &moved, direction: activity::Direction::OutOfStream },
    );
    let relay = crate::proxy::splice(&mut counted_downstream, &mut counted_upstream);
    let (sent, received, error) = match until_closed(relay, closed).await {
        Ok((to_upstream, to_downstream)) => (to_upstream, to_downstream, String::new()),
        Err(e) => {
            reset(&downstream);
            // Into the "stream" is read from downstream (sent upstream), out of it the reverse.
            let (to_upstream, to_downstream) = moved.bytes();
            (to_upstream, to_downstream, e)
        }
    };
    if let Some(l) = &labels {
        // Istio's sent bytes are the response direction (upstream to client).
        metrics.closed(l, received, sent);
    }
    info!(
        target: "access",
        direction,
        protocol = "TCP",
        pod = pod.pod,
        %src,
        %dst,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        error,
        "connection complete"
    );
}

/// Runs a relay until it ends or `closed` fires; the error says which.
pub async fn until_closed<F>(
    relay: F,
    closed: Option<tokio::sync::oneshot::Receiver<String>>,
) -> Result<(u64, u64), String>
where
    F: std::future::Future<Output = io::Result<(u64, u64)>>,
{
    let closed = async move {
        match closed {
            // A dropped sender means the tracker let go: never a reason to close.
            Some(rx) => match rx.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = relay => result.map_err(|e| e.to_string()),
        reason = closed => Err(format!("closed by policy: {reason}")),
    }
}

/// Buffer per direction for relaying. tokio's 8 KiB default caps a single stream well below
/// what the link and TLS can do; ~64 KiB lets one stream fill a TLS record train, and the
/// exact size makes each HBONE DATA frame four full TLS records.
const RELAY_BUFFER: usize = warren_core::hbone::DATA_CHUNK;

/// A socket whose reads are reported to `activity` as `direction`, for [`splice`]'s counts
/// to survive an error.
struct Counted<'a, S> {
    inner: &'a mut S,
    activity: &'a Activity,
    direction: activity::Direction,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity.moved(self.direction, read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides are done; returns (bytes a→b, bytes b→a).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER).await
}
