//! WebSocket through the waypoint (HTTP/1.1 `Upgrade: websocket`), which Istio's proxies allow
//! by default. The upgrade request is authorized, routed and sent like any other, with its
//! `connection: upgrade` and `upgrade` headers kept; when the upstream answers 101 the answer
//! goes to the client and both connections are handed over to a relay that copies bytes each
//! way until one side closes. Other upgrade tokens (`h2c`, ...) are dropped as hop-by-hop
//! headers, as Envoy does for upgrades it is not configured for, and the request goes on as
//! plain HTTP.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;
use warren_core::activity::{Activity, Direction};

use crate::{
    headers::lists,
    state::{OpenStream, WaypointState},
    upstream::Protocol,
};

/// The one upgrade protocol relayed.
const WEBSOCKET: &str = "websocket";

/// A client's WebSocket upgrade, held until the upstream has answered it.
pub struct Upgrade {
    protocol: HeaderValue,
    downstream: OnUpgrade,
}

/// The upgrade `headers` ask for — `connection` naming `upgrade`, and `upgrade: websocket` —
/// with the client connection's hand-over from `extensions`; none for HTTP/2 (whose WebSocket
/// is an extended CONNECT) or any other request.
pub fn requested(
    protocol: Protocol,
    headers: &HeaderMap,
    extensions: &mut http::Extensions,
) -> Option<Upgrade> {
    if protocol != Protocol::Http1 {
        return None;
    }
    let value = headers.get(header::UPGRADE)?;
    let websocket = lists(value.as_bytes(), WEBSOCKET);
    let connection_upgrade =
        headers.get_all(header::CONNECTION).iter().any(|v| lists(v.as_bytes(), "upgrade"));
    if !(websocket && connection_upgrade) {
        return None;
    }
    let downstream = extensions.remove::<OnUpgrade>()?;
    Some(Upgrade { protocol: value.clone(), downstream })
}

impl Upgrade {
    /// Puts back what the hop-by-hop strip took: the upgrade goes on to the upstream.
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
    }

    /// If `response` switches protocols, relays the two connections once both are handed over.
    /// `describe` names the relay in its access-log line.
    pub fn relay_if_switched<B>(self, response: &mut Response<B>, state: &WaypointState, describe: Relay) {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let Some(upstream) = response.extensions_mut().remove::<OnUpgrade>() else {
            return;
        };
        let open = OpenStream::new(state.self_arc());
        let idle_timeout = state.config.idle_timeout();
        tokio::spawn(async move {
            // Counted as an open stream: draining waits for it (up to its timeout).
            let _open = open;
            let started = Instant::now();
            let activity = Activity::new();
            let relayed = async {
                let (client, server) =
                    tokio::try_join!(self.downstream, upstream).map_err(|e| format!("hand-over: {e}"))?;
                let mut client = Watched { io: TokioIo::new(client), activity: activity.clone() };
                let mut server = TokioIo::new(server);
                tokio::io::copy_bidirectional(&mut client, &mut server).await.map_err(|e| e.to_string())
            };
            // No byte either way for the idle timeout: both sides are closed, as for a stream
            // passed through as TCP.
            let idle = async {
                match idle_timeout {
                    Some(limit) => activity.idle_for(limit).await,
                    None => std::future::pending().await,
                }
            };
            let error = tokio::select! {
                relayed = relayed => relayed.err().unwrap_or_default(),
                () = idle => format!("no bytes for {idle_timeout:?}: closed (--idle-timeout-secs)"),
            };
            // Into the client's stream is what it was sent; out of it, what it sent.
            let (sent, received) = activity.bytes();
            info!(target: "access", protocol = "websocket", src = &*describe.client, service = describe.service,
                  upstream = describe.upstream, bytes_sent = sent, bytes_received = received,
                  duration_ms = started.elapsed().as_millis() as u64, error, "upgraded connection complete");
        });
    }
}

/// The client's side of the relay, reporting the bytes that move on it.
struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity.moved(Direction::OutOfStream, read);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(written)) = polled {
            self.activity.moved(Direction::IntoStream, written);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Who an upgraded connection joins, for its access-log line.
pub struct Relay {
    pub client: Box<str>,
    pub service: String,
    pub upstream: String,
}
