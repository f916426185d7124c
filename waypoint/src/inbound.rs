//! HBONE into the waypoint: mTLS with the waypoint's own certificate, HTTP/2 CONNECT streams
//! whose authority is a service VIP:port this waypoint serves. Inside each stream the first
//! bytes tell HTTP/2 (prior knowledge), HTTP/1.1 and anything else apart; HTTP is served
//! request by request ([`crate::forward`]), anything else is passed through as TCP.

use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};
use warren_core::{
    accept::{AcceptErrors, HandshakeSlot},
    activity::Activity,
    hbone::{ConnectRequest, H2Stream},
    identity::SpiffeId,
};

use crate::{
    forward::{self, Downstream},
    h2_server,
    hashing::HashInput,
    idle::IdleWatch,
    record,
    state::{OpenStream, WaypointState},
    upstream::Protocol,
};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HTTP1_METHODS: [&[u8]; 9] =
    [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT"];

pub async fn serve(
    listener: TcpListener,
    state: Arc<WaypointState>,
    mut draining: tokio::sync::watch::Receiver<bool>,
) {
    let mut errors = AcceptErrors::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = draining.changed() => return,
        };
        match accepted {
            // Before a task exists: a source over its pending handshakes is closed at once.
            Ok((stream, peer)) => match state.handshakes.admit(peer.ip()) {
                Ok(handshake) => {
                    tokio::spawn(serve_connection(stream, peer, state.clone(), handshake, draining.clone()));
                }
                Err(report) => {
                    if let Some(line) = report {
                        warn!("HBONE port: {line}");
                    }
                }
            },
            Err(e) => errors.back_off(&e, |line| warn!("HBONE port: {line}")).await,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<WaypointState>,
    handshake: HandshakeSlot,
    draining: Draining,
) {
    let certs = &state.certs;
    let (own, bundle) = match (certs.get(&state.identity).await, certs.bundle()) {
        (Ok(own), Ok(bundle)) => (own, bundle),
        (Err(e), _) | (_, Err(e)) => {
            warn!(%peer, "HBONE connection refused: {e}");
            return;
        }
    };
    let (peer_identity, mut connection) = match warren_core::hbone::accept(stream, &own, bundle).await {
        Ok(accepted) => accepted,
        Err(e) => {
            info!(target: "access", %peer, error = %e, "connection refused");
            return;
        }
    };
    drop(handshake);
    let mut going_away = false;
    let drain = drain_started(&draining);
    tokio::pin!(drain);
    loop {
        let next = tokio::select! {
            biased;
            next = connection.accept() => next,
            () = &mut drain, if !going_away => {
                // Streams already open carry on; the ztunnel opens new ones elsewhere.
                connection.graceful_shutdown();
                going_away = true;
                continue;
            }
        };
        let Some(Ok((request, respond))) = next else { break };
        let (state, peer_identity, draining) = (state.clone(), peer_identity.clone(), draining.clone());
        tokio::spawn(
            async move { serve_stream(request, respond, peer, peer_identity, state, draining).await },
        );
    }
}

/// Told `true` when the waypoint starts draining (SIGTERM).
pub type Draining = tokio::sync::watch::Receiver<bool>;

/// Completes once draining has started; never, if the drain signal is gone.
pub async fn drain_started(draining: &Draining) {
    let mut draining = draining.clone();
    if draining.wait_for(|started| *started).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn serve_stream(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    peer_identity: SpiffeId,
    state: Arc<WaypointState>,
    draining: Draining,
) {
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, reason: &str| {
        info!(target: "access", src = %peer, src_identity = %peer_identity, response = status.as_u16(), error = reason, "CONNECT refused");
        let _ = respond.send_response(Response::builder().status(status).body(()).expect("static"), true);
    };
    let connect = match ConnectRequest::from_request(&request) {
        Ok(c) => c,
        Err(e) => return refuse(&mut respond, e.status(), &e.to_string()),
    };
    let snapshot = state.snapshot();
    let target = connect.target;
    let Some(service) = snapshot.served_service(target.ip(), &state.config.namespace, &state.config.name)
    else {
        let reason = format!(
            "{target} is not the address of a service or pod that uses waypoint {}/{}",
            state.config.namespace, state.config.name
        );
        return refuse(&mut respond, StatusCode::BAD_REQUEST, &reason);
    };
    // A pod's own service (a workload waypoint's) takes any port.
    if !service.ports.is_empty() && service.target_port(target.port()).is_none() {
        let reason = format!("service {} has no port {}", service.hostname(), target.port());
        return refuse(&mut respond, StatusCode::BAD_REQUEST, &reason);
    }
    let Ok(send) =
        respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("static"), false)
    else {
        return;
    };
    let _open = OpenStream::new(state.clone());
    let mut stream = H2Stream::new(send, request.into_body());
    let client = connect.forwarded_for.unwrap_or(peer);
    let sniff_timeout = Duration::from_millis(state.config.sniff_timeout_ms);
    let (kind, prefix) = sniff(&mut stream, sniff_timeout).await;
    stream.unread(prefix);
    let service_labels = state.metrics.service(&service);
    let peer_side = state.metrics.side(crate::metrics::Side::from_identity(&peer_identity));
    let down = |protocol| {
        Arc::new(Downstream {
            service: service.clone(),
            service_labels: service_labels.clone(),
            peer_side: peer_side.clone(),
            port: target.port(),
            peer_identity: peer_identity.clone(),
            client,
            client_text: client.to_string().into(),
            client_ip: http::HeaderValue::from_str(&client.ip().to_string())
                .expect("an address is a valid header value"),
            protocol,
            default_destination: warren_core::l7::RouteDestination {
                destination: warren_core::l7::Destination {
                    host: service_labels.hostname.clone(),
                    subset: None,
                    port: None,
                },
                weight: 100,
                headers: Default::default(),
            },
        })
    };
    let idle_timeout = state.config.idle_timeout();
    match kind {
        Sniffed::Http2 => {
            let watch = IdleWatch::new();
            let down = down(Protocol::Http2);
            // Each request is a task, and tokio writes a task's whole future into it when
            // spawned and again at each change of stage (finished, consumed): a boxed request
            // future makes those writes a pointer's rather than its kilobytes (and is itself
            // copied once, into its box: no wrapper around it, which would copy it again).
            let handle = |req| Box::pin(forward::handle(state.clone(), down.clone(), req, watch.busy()));
            let max_streams = state.config.http2_max_concurrent_streams;
            h2_server::serve(stream, max_streams, handle, &watch, idle_timeout, &draining, client).await;
        }
        Sniffed::Http1 => {
            let watch = IdleWatch::new();
            let svc = request_handler(state.clone(), down(Protocol::Http1), watch.clone());
            // With upgrades: a WebSocket takes the connection over ([`crate::upgrade`]).
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            serve_http1(conn, |c| c.graceful_shutdown(), &watch, idle_timeout, &draining, client).await;
        }
        Sniffed::Tcp => passthrough(stream, &state, &service, target, client, &peer_identity).await,
    }
}

/// The request handler of one downstream connection: each request is in flight for `watch`
/// until its response body has been sent.
fn request_handler(
    state: Arc<WaypointState>,
    down: Arc<Downstream>,
    watch: IdleWatch,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<record::ResponseCounter>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<http::Response<record::ResponseCounter>, std::convert::Infallible>>
             + Send,
> + Clone {
    service_fn(move |req| forward::handle(state.clone(), down.clone(), req, watch.busy()))
}

/// Serves an HTTP/1.1 downstream connection until it ends (or is upgraded), or shuts it down
/// gracefully (the request in flight finishes, then the connection closes) once it has had no
/// request in flight for `idle_timeout`, or when the waypoint starts draining.
async fn serve_http1<C>(
    conn: C,
    graceful_shutdown: impl FnOnce(std::pin::Pin<&mut C>),
    watch: &IdleWatch,
    idle_timeout: Option<Duration>,
    draining: &Draining,
    client: SocketAddr,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    let idle = async {
        match idle_timeout {
            Some(limit) => watch.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = idle => {
            debug!(%client, "HTTP/1.1 downstream idle for {idle_timeout:?}: closing (--idle-timeout-secs)");
            graceful_shutdown(conn.as_mut());
            conn.await
        }
        () = drain_started(draining) => {
            graceful_shutdown(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(%client, "HTTP/1.1 downstream ended: {e}");
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    Http1,
    Http2,
    Tcp,
}

/// Reads the client's first bytes (kept, to be replayed) until the protocol is clear.
async fn sniff<R: AsyncRead + Unpin>(stream: &mut R, timeout: Duration) -> (Sniffed, Bytes) {
    let mut buf = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(kind) = classify(&buf) {
            return (kind, buf.into());
        }
        let mut chunk = [0u8; 64];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            // EOF, an error or a silent client: not HTTP.
            _ => return (Sniffed::Tcp, buf.into()),
        }
    }
}

/// The protocol these first bytes show, or none while they could still be either.
fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.is_empty() {
        return None;
    }
    if buf.len() >= H2_PREFACE.len() && buf.starts_with(H2_PREFACE) {
        return Some(Sniffed::Http2);
    }
    let could_be_h2 = H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]);
    if let Some(space) = buf.iter().position(|b| *b == b' ') {
        if HTTP1_METHODS.contains(&&buf[..space]) {
            return Some(Sniffed::Http1);
        }
        return if could_be_h2 { None } else { Some(Sniffed::Tcp) };
    }
    let token_so_far = buf.len() < 8 && buf.iter().all(u8::is_ascii_uppercase);
    if token_so_far || could_be_h2 { None } else { Some(Sniffed::Tcp) }
}

/// Not HTTP: the bytes go to one of the service's endpoints, chosen by its load balancing.
async fn passthrough(
    mut io: H2Stream,
    state: &Arc<WaypointState>,
    service: &warren_core::model::Service,
    target: SocketAddr,
    client: SocketAddr,
    peer_identity: &SpiffeId,
) {
    let started = Instant::now();
    let snapshot = state.snapshot();
    let host = service.hostname();
    let cluster = state.clusters.get(&host, None, target.port());
    let endpoints = snapshot.index.endpoints(service);
    let policy =
        snapshot.destination_rules.get(&host).map(|r| r.policy_for(None, target.port())).unwrap_or_default();
    let headers = http::HeaderMap::new();
    let hash = HashInput { headers: &headers, source_ip: client.ip(), query: None, made_cookie: None };
    let Some(endpoint) = cluster.pick(&endpoints, policy.load_balancer.as_ref(), None, &hash, &[]) else {
        info!(target: "access", protocol = "TCP", src = %client, service = host, response_flags = "UH", "no endpoint for TCP passthrough");
        return;
    };
    let ip = endpoint.ip_like(client.ip()).expect("endpoints have addresses");
    let addr = SocketAddr::new(ip, service.target_port(target.port()).unwrap_or(target.port()));
    let activity = Activity::new();
    io.watch_activity(activity.clone());
    let relay = async {
        if endpoint.enrolled {
            let mut request = ConnectRequest::new(addr);
            request.forwarded_for = Some(client);
            match state
                .clusters
                .hbone
                .connect(ip, &endpoint.identity(&state.config.trust_domain), &request)
                .await
            {
                Ok(mut upstream) => io.relay_with_stream(&mut upstream).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            let timeout = state.clusters.hbone.connect_timeout;
            match warren_core::connect::within(addr, timeout, TcpStream::connect(addr)).await {
                Ok(mut upstream) => {
                    // (bytes from the client, bytes to the client), as the HBONE branch counts.
                    io.relay_with_tcp(&mut upstream)
                        .await
                        .map(|(to, from)| (from, to))
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    // No byte either way for the idle timeout: both sides are closed, as Envoy's `tcp_proxy`
    // does after its `idle_timeout`.
    let idle_timeout = state.config.idle_timeout();
    let result = tokio::select! {
        result = relay => result,
        () = async {
            match idle_timeout {
                Some(limit) => activity.idle_for(limit).await,
                None => std::future::pending().await,
            }
        } => Err(format!("no bytes for {}s: closed (--idle-timeout-secs)", state.config.idle_timeout_secs)),
    };
    let _ = io.shutdown().await;
    let (sent, received, error) = match result {
        Ok((from_client, to_client)) => (to_client, from_client, String::new()),
        // What had moved before the error or the idle timeout.
        Err(e) => {
            let (to_client, from_client) = activity.bytes();
            (to_client, from_client, e)
        }
    };
    info!(target: "access", protocol = "TCP", src = %client, src_identity = %peer_identity, service = host,
          upstream = endpoint.display_name(), bytes_sent = sent, bytes_received = received,
          duration_ms = started.elapsed().as_millis() as u64, error, "connection complete");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"POST /x"), Some(Sniffed::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"hello world"), Some(Sniffed::Tcp));
        assert_eq!(classify(b"FOO bar"), Some(Sniffed::Tcp));
    }

    #[tokio::test]
    async fn sniffed_bytes_are_returned_for_replay() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let (kind, prefix) = sniff(&mut server, Duration::from_secs(1)).await;
        assert_eq!(kind, Sniffed::Http1);
        assert!(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n".starts_with(&prefix), "the sniffed bytes are returned");
        assert!(prefix.len() >= 4);
        drop(client);
        let (kind, _) = sniff(&mut tokio::io::empty(), Duration::from_millis(50)).await;
        assert_eq!(kind, Sniffed::Tcp);
    }
}
