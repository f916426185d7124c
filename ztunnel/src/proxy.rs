//! The in-pod listeners' accept loops and the TCP relays behind them.
//!
//! Until HBONE lands, traffic is relayed as plain TCP: outbound to the original destination
//! (from a socket inside the source pod's netns, so the source IP stays the pod's), inbound
//! to the application inside the destination pod's netns.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tracing::{info, warn};
use warren_ebpf_types::ListenerKind;

use crate::{capture::Capture, netns};

/// What every connection of one pod needs.
pub struct PodContext {
    pub pod: String,
    pub netns: File,
    pub netns_cookie: u64,
    pub mark: u32,
    pub capture: Arc<Capture>,
    pub stats: Arc<Stats>,
}

/// Connection counters of this ztunnel, shown by the admin view.
#[derive(Default, Serialize)]
pub struct Stats {
    pub outbound_accepted: AtomicU64,
    /// Outbound connections with no recorded original destination (closed at once).
    pub outbound_without_original_dst: AtomicU64,
    pub inbound_plaintext_accepted: AtomicU64,
    pub hbone_accepted: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
}

pub fn spawn_accept_loops(
    pod: &Arc<PodContext>,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<(std::net::IpAddr, ListenerKind, std::net::TcpListener)>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut loops = Vec::new();
    for listener in outbound {
        let listener = TcpListener::from_std(listener)?;
        loops.push(tokio::spawn(accept_loop(
            listener,
            pod.clone(),
            Direction::Outbound,
        )));
    }
    for (_, kind, listener) in inbound {
        let listener = TcpListener::from_std(listener)?;
        let direction = match kind {
            ListenerKind::InboundPlaintext => Direction::InboundPlaintext,
            ListenerKind::Hbone => Direction::Hbone,
        };
        loops.push(tokio::spawn(accept_loop(listener, pod.clone(), direction)));
    }
    Ok(loops)
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    InboundPlaintext,
    Hbone,
}

async fn accept_loop(listener: TcpListener, pod: Arc<PodContext>, direction: Direction) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = pod.pod, ?direction, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let pod = pod.clone();
        tokio::spawn(async move {
            match direction {
                Direction::Outbound => outbound(stream, peer, &pod).await,
                Direction::InboundPlaintext => inbound_plaintext(stream, peer, &pod).await,
                Direction::Hbone => hbone(stream, peer, &pod).await,
            }
        });
    }
}

async fn outbound(stream: TcpStream, peer: SocketAddr, pod: &PodContext) {
    pod.stats.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let Some(original_dst) = pod.capture.take_original_dst(pod.netns_cookie, peer) else {
        pod.stats
            .outbound_without_original_dst
            .fetch_add(1, Ordering::Relaxed);
        warn!(pod = pod.pod, %peer, "outbound connection without a recorded original destination: closed");
        return;
    };
    relay(stream, original_dst, pod, "outbound", peer).await;
}

async fn inbound_plaintext(stream: TcpStream, peer: SocketAddr, pod: &PodContext) {
    pod.stats
        .inbound_plaintext_accepted
        .fetch_add(1, Ordering::Relaxed);
    // sk_lookup kept the packet's destination as the socket's local address.
    let Ok(original_dst) = stream.local_addr() else {
        return;
    };
    relay(stream, original_dst, pod, "inbound", peer).await;
}

async fn hbone(stream: TcpStream, peer: SocketAddr, pod: &PodContext) {
    pod.stats.hbone_accepted.fetch_add(1, Ordering::Relaxed);
    let local = stream.local_addr().ok();
    // The HBONE server (mTLS + HTTP/2 CONNECT) is not built yet: refuse rather than pretend.
    info!(
        target: "access",
        direction = "hbone",
        pod = pod.pod,
        src = %peer,
        dst = ?local,
        error = "HBONE server not implemented yet",
        "connection closed"
    );
    drop(stream);
}

/// Opens a socket inside the pod's netns, marked as ztunnel's, and connects it.
async fn connect_from_pod(pod: &PodContext, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns::run_in(&pod.netns, || {
        let domain = if dst.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        s.set_mark(pod.mark)?;
        s.set_nonblocking(true)?;
        io::Result::Ok(s)
    })??;
    TcpSocket::from_std_stream(socket.into()).connect(dst).await
}

async fn relay(
    mut downstream: TcpStream,
    dst: SocketAddr,
    pod: &PodContext,
    direction: &str,
    src: SocketAddr,
) {
    let started = Instant::now();
    let mut upstream = match connect_from_pod(pod, dst).await {
        Ok(s) => s,
        Err(e) => {
            pod.stats
                .upstream_connect_failures
                .fetch_add(1, Ordering::Relaxed);
            info!(target: "access", direction, pod = pod.pod, %src, %dst, error = %e, "connection failed");
            // Reset rather than close, so the client sees a failed connection as it would
            // without the mesh, not an empty response.
            let _ = socket2::SockRef::from(&downstream).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    let (sent, received, error) =
        match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
            Ok((to_upstream, to_downstream)) => (to_upstream, to_downstream, None),
            Err(e) => (0, 0, Some(e.to_string())),
        };
    info!(
        target: "access",
        direction,
        pod = pod.pod,
        %src,
        %dst,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.as_deref().unwrap_or(""),
        "connection complete"
    );
}
