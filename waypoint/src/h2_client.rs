//! HTTP/2 to upstreams on the `h2` crate directly.
//!
//! hyper's HTTP/2 client passes every request through a channel to its connection task, which
//! spawns one more task per request to await the response and hand it back over a oneshot.
//! Here the request's own task opens the stream and awaits the response; the connection task
//! only drives the connection. Measured with callgrind at 50 HTTP/2 requests/s: ~137,600 →
//! ~129,800 user-space instructions and ~39 → ~36 allocations per request.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::body::RequestBody;

/// Flow-control windows and buffers: hyper's client defaults, which this client replaced —
/// larger than the protocol's 64 KiB so one stream can fill a fast link.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// How many small DATA frames a connection may hold unread, in h2's accounting: a frame below
/// 256 bytes costs 256 minus its length, about what h2 keeps per frame held. h2's default,
/// half the connection window, admits ~11,000 frames of 25 bytes: a stream of small gRPC
/// messages (one frame each) held for a client that reads late used that up within ~300 KB,
/// and h2 then closed the upstream connection, and every call on it (GOAWAY
/// ENHANCE_YOUR_CALM). This admits a whole stream window of frames from 25 bytes up (a
/// message with 20 bytes of payload), or a whole connection window from 64 bytes up: at most
/// ~20 MiB held for a connection, while a flood of tinier frames is still cut off.
const DATA_FRAME_BUDGET: usize = 4 * CONNECTION_WINDOW as usize;
/// Streams opened before the server's SETTINGS arrive (the minimum RFC 9113 recommends servers
/// allow, so a new connection's first burst is not refused).
pub const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// How long a new connection's pooling waits for the server's SETTINGS (a server that does
/// not answer a PING is pooled after this, its stream limit then learned as it comes).
const SETTINGS_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves once a new connection's server SETTINGS are in force (or the connection ended,
/// or [`SETTINGS_WAIT`] passed): from then on its stream limit is the server's, not the
/// assumed [`INITIAL_MAX_SEND_STREAMS`].
pub type SettingsKnown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A handle to one upstream HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct H2Sender {
    send: h2::client::SendRequest<Bytes>,
    /// Set when the connection task ends: the pool drops the connection then.
    closed: Arc<AtomicBool>,
    streams: Arc<Streams>,
}

/// The streams claimed on one connection ([`StreamClaim`]s alive), and since when none has
/// been: a connection's idle time counts from the end of its last request, as Envoy counts it,
/// not from that request's start.
struct Streams {
    claimed: AtomicUsize,
    idle_since: Mutex<tokio::time::Instant>,
}

/// One stream of a connection, claimed from its hand-out by the pool until the response body
/// ends (or the request fails): what tells the pool that a connection has room.
pub struct StreamClaim(Arc<Streams>);

impl Drop for StreamClaim {
    fn drop(&mut self) {
        if self.0.claimed.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("poisoned") = tokio::time::Instant::now();
        }
    }
}

/// Opens HTTP/2 on `io` and spawns the task that drives the connection; returns its handle
/// and when its server's SETTINGS are known (see [`SettingsKnown`]).
pub async fn handshake<T>(io: T, addr: SocketAddr) -> Result<(H2Sender, SettingsKnown), h2::Error>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .data_frame_budget(DATA_FRAME_BUDGET)
        .enable_push(false)
        .handshake(io)
        .await?;
    // A server's first frame is its SETTINGS, and h2 applies a peer's SETTINGS before it reads
    // the next frame: once a PING's answer is in, so is the server's stream limit.
    let ping_pong = connection.ping_pong();
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%addr, "upstream HTTP/2 connection ended: {e}");
        }
        flag.store(true, Ordering::Release);
    });
    let streams =
        Streams { claimed: AtomicUsize::new(0), idle_since: Mutex::new(tokio::time::Instant::now()) };
    let settings_known = Box::pin(async move {
        if let Some(mut ping_pong) = ping_pong {
            let _ = tokio::time::timeout(SETTINGS_WAIT, ping_pong.ping(h2::Ping::opaque())).await;
        }
    });
    Ok((H2Sender { send, closed, streams: Arc::new(streams) }, settings_known))
}

impl H2Sender {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Whether a request here would get a stream at once: fewer claimed than the server's
    /// SETTINGS_MAX_CONCURRENT_STREAMS (assumed 100 until its SETTINGS arrive) and than
    /// `limit` (a DestinationRule's `maxConcurrentStreams`).
    pub fn has_free_stream(&self, limit: Option<u32>) -> bool {
        let limit = limit.map_or(usize::MAX, |l| l as usize);
        self.streams.claimed.load(Ordering::Acquire) < self.send.current_max_send_streams().min(limit)
    }

    pub fn claim_stream(&self) -> StreamClaim {
        self.streams.claimed.fetch_add(1, Ordering::AcqRel);
        StreamClaim(self.streams.clone())
    }

    /// Since when no stream has been claimed on the connection; none while one is.
    pub fn idle_since(&self) -> Option<tokio::time::Instant> {
        let idle_since = *self.streams.idle_since.lock().expect("poisoned");
        (self.streams.claimed.load(Ordering::Acquire) == 0).then_some(idle_since)
    }

    /// Sends one request and waits for the response head; the body follows as [`H2Body`].
    /// Takes `&mut self`: the pool hands each request a clone of its own, used in place.
    pub async fn send(&mut self, request: Request<RequestBody>) -> Result<Response<H2Body>, H2SendError> {
        // Waits while the server's SETTINGS_MAX_CONCURRENT_STREAMS are all in use.
        match std::future::poll_fn(|cx| self.send.poll_ready(cx)).await {
            Ok(()) => {}
            Err(e) => {
                // A GOAWAY or a closed connection: no new streams here, ever.
                self.closed.store(true, Ordering::Release);
                return Err(H2SendError::NotSent(Box::new(request), e));
            }
        };
        let (mut head, body) = request.into_parts();
        let (response, pump) = match body {
            RequestBody::Whole(mut whole) => {
                // A `Full` body is one frame (or none), ready at once.
                let data = match whole.frame().await {
                    Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
                    Some(Err(never)) => match never {},
                    None => Bytes::new(),
                };
                set_content_length(&mut head.headers, &head.method, data.len());
                let end_of_stream = data.is_empty();
                let (response, mut stream) = self
                    .send
                    .send_request(Request::from_parts(head, ()), end_of_stream)
                    .map_err(H2SendError::classify)?;
                if !end_of_stream {
                    // The body is already in memory, so h2 may hold all of it and send as the
                    // server's window opens: no capacity to reserve first.
                    stream.send_data(data, true).map_err(H2SendError::classify)?;
                }
                (response, None)
            }
            streamed @ RequestBody::Streamed(_) => {
                let (response, stream) = self
                    .send
                    .send_request(Request::from_parts(head, ()), false)
                    .map_err(H2SendError::classify)?;
                // The body goes on while the response comes (a bidi-streaming call needs both).
                (response, Some(Pump(tokio::spawn(pump(stream, streamed)))))
            }
        };
        // Dropped with the attempt if it fails: the stream is reset, the client's body let go.
        let response = response.await.map_err(H2SendError::classify)?;
        let (head, recv) = response.into_parts();
        let remaining = content_length(&head.headers);
        Ok(Response::from_parts(head, H2Body { recv, data_done: false, remaining, _pump: pump }))
    }
}

/// The task sending a streamed request body; aborted when its response body is dropped (the
/// exchange is over, or abandoned for a retry), which resets what is left of the stream.
struct Pump(tokio::task::JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `body` on `stream` as the client sends it, no faster than the server's flow-control
/// window opens (so a fast client is held back by its own window, not buffered here).
async fn pump(mut stream: h2::SendStream<Bytes>, mut body: RequestBody) {
    loop {
        // Stops early if the server resets the stream: nothing more can go on it.
        let next = std::future::poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match next {
            None => return,
            Some(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(e))) => {
                debug!("request body ended early, resetting the upstream stream: {e}");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                if send_within_window(&mut stream, data, false).await.is_err() {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// Sends `data` as the stream's window allows, capacity reserved for the whole chunk before
/// any of it goes; the last piece carries END_STREAM when `end`.
pub(crate) async fn send_within_window(
    stream: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        // An empty frame only to end the stream: an empty chunk of a body is not sent.
        return if end { stream.send_data(data, true) } else { Ok(()) };
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            None => return Err(h2::Error::from(h2::Reason::STREAM_CLOSED)),
        };
        if granted > 0 {
            let piece = data.split_to(granted.min(data.len()));
            stream.send_data(piece, end && data.is_empty())?;
        }
    }
    Ok(())
}

/// Why an upstream HTTP/2 exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H2SendError {
    /// The connection takes no new streams (the server sent GOAWAY, or it closed) and the
    /// request, handed back, was never sent: it may go on another connection.
    #[error("the upstream HTTP/2 connection takes no new requests: {1}")]
    NotSent(Box<Request<RequestBody>>, h2::Error),
    /// The server refused the stream unprocessed (REFUSED_STREAM, or a GOAWAY that names an
    /// earlier last stream): safe to retry, under `retryOn: refused-stream`.
    #[error("the upstream refused the request unprocessed: {0}")]
    Refused(h2::Error),
    #[error("{0}")]
    Failed(h2::Error),
}

impl H2SendError {
    fn classify(e: h2::Error) -> Self {
        // A remote GOAWAY reaches a stream as an error only if its id is past the GOAWAY's last
        // processed stream (streams it covers end normally or by their own reset or EOF).
        if e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) {
            H2SendError::Refused(e)
        } else {
            H2SendError::Failed(e)
        }
    }
}

/// As HTTP/1.1 upstreams get it: the length of a body, and of an empty one where the method
/// defines a body (POST, PUT, PATCH and extensions), unless the client already sent one.
fn set_content_length(headers: &mut HeaderMap, method: &Method, len: usize) {
    let payload_method = !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT | Method::OPTIONS | Method::TRACE
    );
    if (len != 0 || payload_method) && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The next frame received on `recv`: its data (flow-control window released at once) until
/// the data ends (`data_done`), then its trailers.
pub(crate) fn poll_received_frame(
    recv: &mut h2::RecvStream,
    data_done: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
    if !*data_done {
        match ready!(recv.poll_data(cx)) {
            Some(Ok(data)) => {
                // Fails only once the stream is gone, which the next poll reports.
                let _ = recv.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => *data_done = true,
        }
    }
    Poll::Ready(match ready!(recv.poll_trailers(cx)) {
        Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
        Ok(None) => None,
        Err(e) => Some(Err(e)),
    })
}

/// An upstream HTTP/2 response body. Received data is handed on and its flow-control window
/// released at once: the downstream connection's own flow control is what holds back a slow
/// reader.
pub struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
    /// What `content-length` says is still to come, for the downstream `size_hint`.
    remaining: Option<u64>,
    /// Sending the request's body, if it streams.
    _pump: Option<Pump>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let frame = ready!(poll_received_frame(&mut this.recv, &mut this.data_done, cx));
        if let (Some(left), Some(Ok(frame))) = (&mut this.remaining, &frame)
            && let Some(data) = frame.data_ref()
        {
            *left = left.saturating_sub(data.len() as u64);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(left) => SizeHint::with_exact(left),
            None if self.recv.is_end_stream() => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(body: &'static str) -> Request<RequestBody> {
        Request::post("http://upstream.test/charge")
            .body(RequestBody::whole(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    /// An HTTP/2 server on the far end of an in-memory pipe, each accepted request given to
    /// `answer`, and a client connected to it.
    async fn connected(
        answer: impl Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) + Send + 'static,
        go_away_after_first: bool,
    ) -> H2Sender {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((request, respond))) = connection.accept().await {
                answer(request, respond);
                if go_away_after_first {
                    connection.graceful_shutdown();
                }
            }
        });
        handshake(client_io, "127.0.0.1:1".parse().unwrap()).await.unwrap().0
    }

    #[tokio::test]
    async fn a_connection_has_a_free_stream_while_fewer_are_claimed_than_the_server_allows() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut connection = h2::server::Builder::new()
                .max_concurrent_streams(2)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                respond.send_response(Response::new(()), true).unwrap();
            }
        });
        let (mut sender, settings_known) =
            handshake(client_io, "127.0.0.1:1".parse().unwrap()).await.unwrap();
        let claims: Vec<StreamClaim> = (0..3).map(|_| sender.claim_stream()).collect();
        assert!(
            sender.has_free_stream(None),
            "before the server's SETTINGS, {INITIAL_MAX_SEND_STREAMS} are assumed"
        );
        drop(claims);
        settings_known.await;
        let two: Vec<StreamClaim> = (0..2).map(|_| sender.claim_stream()).collect();
        assert!(
            !sender.has_free_stream(None),
            "once its SETTINGS are known, the server's limit of two holds"
        );
        drop(two);
        let claim = sender.claim_stream();
        sender.send(post("")).await.unwrap();
        drop(claim);
        let first = sender.claim_stream();
        assert!(sender.has_free_stream(None));
        let second = sender.clone().claim_stream();
        assert!(!sender.has_free_stream(None), "two claimed of the server's two");
        drop(first);
        assert!(sender.has_free_stream(None), "a claim ends with its response body");
        assert!(!sender.has_free_stream(Some(1)), "a lower limit of the rule's applies");
        drop(second);
    }

    #[tokio::test]
    async fn a_request_the_connection_cannot_take_comes_back_unsent() {
        let ok = |_request, mut respond: h2::server::SendResponse<Bytes>| {
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            stream.send_data(Bytes::from_static(b"paid"), true).unwrap();
        };
        let mut sender = connected(ok, true).await;
        let first = sender.send(post("first")).await.unwrap();
        assert_eq!(first.into_body().collect().await.unwrap().to_bytes(), "paid");
        // The server's GOAWAY follows its answer; from then on every request is handed back
        // whole, and the connection counts as closed (the pool drops it).
        let mut handed_back = None;
        for _ in 0..200 {
            match sender.send(post("second")).await {
                Err(H2SendError::NotSent(request, _)) => {
                    handed_back = Some(request);
                    break;
                }
                // Sent before the GOAWAY was read: the server still answers those.
                _ => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
        let request = handed_back.expect("a request after the GOAWAY must come back unsent");
        assert_eq!(request.uri(), "http://upstream.test/charge");
        assert_eq!(request.into_body().collect().await.unwrap().to_bytes(), "second");
        assert!(sender.is_closed());
    }

    #[tokio::test]
    async fn a_refused_stream_is_told_apart_from_other_resets() {
        let refuse = |_request, mut respond: h2::server::SendResponse<Bytes>| {
            respond.send_reset(h2::Reason::REFUSED_STREAM)
        };
        let mut sender = connected(refuse, false).await;
        assert!(matches!(sender.send(post("x")).await, Err(H2SendError::Refused(_))));
        let fail = |_request, mut respond: h2::server::SendResponse<Bytes>| {
            respond.send_reset(h2::Reason::INTERNAL_ERROR)
        };
        let mut sender = connected(fail, false).await;
        assert!(matches!(sender.send(post("x")).await, Err(H2SendError::Failed(_))));
        assert!(!sender.is_closed());
    }

    #[tokio::test]
    async fn a_streamed_body_goes_on_while_the_response_comes() {
        // A bidi-streaming server: each request frame is answered at once with the same bytes.
        let echo = |request: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>| {
            tokio::spawn(async move {
                let mut out = respond.send_response(Response::new(()), false).unwrap();
                let mut body = request.into_body();
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    out.send_data(data, false).unwrap();
                }
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                out.send_trailers(trailers).unwrap();
            });
        };
        let mut sender = connected(echo, false).await;
        let (feed, client_body) = crate::body::testing::fed();
        let streamed = crate::body::testing::streamed(client_body, 1024).await;
        let request = Request::post("http://upstream.test/echo.Echo/Stream")
            .body(RequestBody::Streamed(streamed.reader()))
            .unwrap();
        let response = tokio::time::timeout(std::time::Duration::from_secs(5), sender.send(request))
            .await
            .expect("the response head comes before the request ends")
            .unwrap();
        let mut body = response.into_body();
        for ping in ["one", "two", "three"] {
            feed.send(Ok(Frame::data(Bytes::from_static(ping.as_bytes())))).unwrap();
            let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("no answer to {ping} while the request streams"))
                .unwrap()
                .unwrap();
            assert_eq!(frame.into_data().unwrap(), ping);
        }
        drop(feed);
        let end = body.frame().await.unwrap().unwrap();
        assert_eq!(end.into_trailers().unwrap()["grpc-status"], "0");
        assert_eq!(streamed.size().bytes(), "onetwothree".len() as u64);
    }

    #[test]
    fn content_length_is_added_where_http1_would_send_one() {
        let with = |method: Method, len: usize| {
            let mut h = HeaderMap::new();
            set_content_length(&mut h, &method, len);
            h.get(header::CONTENT_LENGTH).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(with(Method::POST, 5).as_deref(), Some("5"));
        assert_eq!(with(Method::POST, 0).as_deref(), Some("0"));
        assert_eq!(with(Method::GET, 0), None);
        assert_eq!(with(Method::GET, 3).as_deref(), Some("3"));
        let mut sent = HeaderMap::new();
        sent.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        set_content_length(&mut sent, &Method::POST, 7);
        assert_eq!(sent.get_all(header::CONTENT_LENGTH).iter().count(), 1);
    }
}
