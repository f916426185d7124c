//! The waypoint's HTTP/2 server for its clients' connections (inside their CONNECT streams),
//! on `h2` directly rather than through hyper's server, for two things hyper's does not let it
//! do:
//!
//! - A request body's frames are taken out of h2 while the request waits on its upstream (a
//!   connection still being dialled, an upstream with no window left): h2 closes a connection
//!   holding too many small frames unread (GOAWAY `ENHANCE_YOUR_CALM`,
//!   `too_many_data_frames`), which hyper's server let a gRPC client streaming small messages
//!   reach within a few thousand of them — and lose every call on its connection. See
//!   [`RequestBody`] and [`warren_core::frame_backlog`].
//! - A response chunk goes out once the client's window has room for it, not after a byte of
//!   window reserved ahead of it (hyper's way, which sent the first byte of many responses as
//!   a DATA frame of its own whenever a client's window ran out mid-burst).
//!
//! Otherwise it serves as hyper's server did: its settings (1 MiB windows, 16 KiB frames,
//! 16 KiB of headers), `date` added to responses, connection-specific headers taken off them,
//! and a request whose client resets its stream is dropped, which cancels it upstream.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use h2::{
    FlowControl, Reason, RecvStream, SendStream,
    server::{Connection, SendResponse},
};
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};
use warren_core::frame_backlog::Backlog;

use crate::{
    h2_client::{content_length, poll_received_frame, send_within_window},
    idle::IdleWatch,
    inbound::{Draining, drain_started},
};

/// hyper's server defaults, which this server replaced.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How many small DATA frames the connection may hold unread, in h2's accounting (a frame
/// below 256 bytes costs 256 minus its length). h2 reads every frame that has arrived before
/// anyone can take one, and a client's frames arrive in bursts of up to its window: h2's
/// default (half the connection window, ~2,300 frames of 25 bytes) was spent by one 64 KiB
/// read of small gRPC messages (measured: the connection closed 1 ms into the call). This
/// admits a whole connection window of frames from 25 bytes up (a message with 20 bytes of
/// payload), while a flood of tinier frames is still cut off.
const DATA_FRAME_BUDGET: usize = 10 * CONNECTION_WINDOW as usize;

/// Serves one client connection until it ends, or shuts it down gracefully (GOAWAY: requests
/// in flight finish, the client takes new ones elsewhere) once it has had no request in flight
/// for `idle_timeout`, or when the waypoint starts draining.
pub async fn serve<T, H, F, B>(
    io: T,
    max_concurrent_streams: u32,
    handle: H,
    watch: &IdleWatch,
    idle_timeout: Option<Duration>,
    draining: &Draining,
    client: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request<RequestBody>) -> F,
    F: Future<Output = Result<Response<B>, std::convert::Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .data_frame_budget(DATA_FRAME_BUDGET)
        .max_concurrent_streams(max_concurrent_streams)
        .handshake::<_, Bytes>(io);
    let mut connection: Connection<T, Bytes> = match handshake.await {
        Ok(c) => c,
        Err(e) => {
            debug!(%client, "HTTP/2 downstream handshake failed: {e}");
            return;
        }
    };
    let idle = async {
        match idle_timeout {
            Some(limit) => watch.idle_for(limit).await,
            None => std::future::pending().await,
        }
    };
    let drain = drain_started(draining);
    tokio::pin!(idle, drain);
    let mut closing = false;
    loop {
        let next = tokio::select! {
            biased;
            next = connection.accept() => next,
            () = &mut idle, if !closing => {
                debug!(%client, "HTTP/2 downstream idle for {idle_timeout:?}: closing (--idle-timeout-secs)");
                connection.graceful_shutdown();
                closing = true;
                continue;
            }
            () = &mut drain, if !closing => {
                connection.graceful_shutdown();
                closing = true;
                continue;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                let (parts, recv) = request.into_parts();
                let declared = content_length(&parts.headers);
                let response = handle(Request::from_parts(parts, RequestBody::new(recv, declared)));
                // Boxed: tokio writes a task's whole future into the task when spawned and at
                // each change of stage; a box makes that a pointer, not the size of a response
                // in flight (callgrind: ~1.4k instructions per HTTP/2 request saved).
                tokio::spawn(Box::pin(respond_with(response, respond)));
            }
            Some(Err(e)) => {
                // The waypoint's own h2 closing the connection over the client's frames (a
                // protocol error, a flood) is worth an operator's notice; a client's going
                // away is not.
                if e.is_go_away() && e.is_library() {
                    warn!(%client, "closed the client's HTTP/2 connection: {e}");
                } else {
                    debug!(%client, "HTTP/2 downstream ended: {e}");
                }
                return;
            }
            None => return,
        }
    }
}

/// Awaits the response (dropped if the client resets the stream first), then sends it.
async fn respond_with<F, B>(response: F, mut respond: SendResponse<Bytes>)
where
    F: Future<Output = Result<Response<B>, std::convert::Infallible>>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // Biased: the response is polled first, the reset only while it is pending.
    let response = tokio::select! {
        biased;
        Ok(response) = response => response,
        reset = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            debug!("client reset its stream before the response: {reset:?}");
            return;
        }
    };
    let (mut head, body) = response.into_parts();
    strip_connection_headers(&mut head.headers);
    head.headers.entry(header::DATE).or_insert_with(date_now);
    let end_now = body.is_end_stream();
    if !end_now && let Some(len) = body.size_hint().exact() {
        head.headers.entry(header::CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(len));
    }
    let send = match respond.send_response(Response::from_parts(head, ()), end_now) {
        Ok(send) => send,
        Err(e) => {
            debug!("sending a response head failed: {e}");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !end_now {
        send_body(body, send).await;
    }
}

/// Sends `body` on `send`, each chunk as the client's window allows; stops (dropping the body)
/// if the client resets the stream.
async fn send_body<B>(body: B, mut send: SendStream<Bytes>)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    loop {
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            reset = std::future::poll_fn(|cx| send.poll_reset(cx)) => {
                debug!("client reset its stream during the response: {reset:?}");
                return;
            }
        };
        let frame = match frame {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                debug!("response body broke off: {e}");
                send.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let last = body.is_end_stream();
                if send_within_window(&mut send, data, last).await.is_err() || last {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// HTTP/1.1's connection-specific headers, which HTTP/2 forbids (RFC 9113 §8.2.2), and the
/// headers a `connection` header names.
fn strip_connection_headers(headers: &mut HeaderMap) {
    if let Some(connection) = headers.remove(header::CONNECTION)
        && let Ok(names) = connection.to_str()
    {
        for name in names.split(',') {
            headers.remove(name.trim());
        }
    }
    for name in [header::TRANSFER_ENCODING, header::UPGRADE, header::TE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The `date` header for now, formatted once a second.
fn date_now() -> HeaderValue {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            *cached = (second, HeaderValue::from_str(&text).expect("an HTTP date is a valid header value"));
        }
        cached.1.clone()
    })
}

/// A client's request body. One that has all arrived when its request does (no body, or a
/// unary call's one message) is read from h2 directly. Any other gets a task that moves each of
/// its frames out of h2 into a [`Backlog`] as it arrives, whether or not the request's handler
/// is reading — it may be waiting on its upstream, a fault's delay, a retry — so frames never
/// pile up in h2. Flow-control capacity is released only as the handler takes bytes, which
/// bounds the backlog to a stream window, as it would be in h2.
pub struct RequestBody {
    state: BodyState,
    declared: Option<u64>,
}

enum BodyState {
    Direct { recv: RecvStream, data_done: bool },
    Absorbed { shared: Arc<Mutex<Absorbed>>, flow: FlowControl, absorber: tokio::task::JoinHandle<()> },
    Done,
}

/// What the absorbing task has taken from h2 and not yet handed over.
#[derive(Default)]
struct Absorbed {
    backlog: Backlog,
    /// Set once the data has ended: the trailers (if any), or the error that ended it.
    end: Option<Result<Option<HeaderMap>, h2::Error>>,
    reader: Option<Waker>,
}

impl RequestBody {
    fn new(mut recv: RecvStream, declared: Option<u64>) -> Self {
        if recv.is_end_stream() {
            return Self { state: BodyState::Direct { recv, data_done: false }, declared };
        }
        let flow = recv.flow_control().clone();
        let shared = Arc::new(Mutex::new(Absorbed::default()));
        let absorber = tokio::spawn(absorb(recv, shared.clone()));
        Self { state: BodyState::Absorbed { shared, flow, absorber }, declared }
    }
}

/// Takes every frame of `recv` into `shared` as it arrives, then the trailers.
async fn absorb(mut recv: RecvStream, shared: Arc<Mutex<Absorbed>>) {
    loop {
        match std::future::poll_fn(|cx| recv.poll_data(cx)).await {
            Some(Ok(data)) => hand_over(&shared, |a| a.backlog.push(data)),
            Some(Err(e)) => return hand_over(&shared, |a| a.end = Some(Err(e))),
            None => {
                let trailers = std::future::poll_fn(|cx| recv.poll_trailers(cx)).await;
                return hand_over(&shared, |a| a.end = Some(trailers));
            }
        }
    }
}

/// Updates what the reader will find, then wakes it if it is waiting.
fn hand_over(shared: &Mutex<Absorbed>, update: impl FnOnce(&mut Absorbed)) {
    let reader = {
        let mut absorbed = shared.lock().expect("poisoned");
        update(&mut absorbed);
        absorbed.reader.take()
    };
    if let Some(reader) = reader {
        reader.wake();
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let BodyState::Absorbed { absorber, .. } = &self.state {
            absorber.abort();
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match &mut self.state {
            // All of it is in h2 already: no frame can pile up behind it.
            BodyState::Direct { recv, data_done } => {
                let frame = std::task::ready!(poll_received_frame(recv, data_done, cx));
                if !matches!(frame, Some(Ok(ref f)) if f.is_data()) {
                    self.state = BodyState::Done;
                }
                Poll::Ready(frame)
            }
            BodyState::Absorbed { shared, flow, .. } => {
                let mut absorbed = shared.lock().expect("poisoned");
                if let Some(data) = absorbed.backlog.pop() {
                    let _ = flow.release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                let Some(end) = absorbed.end.take() else {
                    absorbed.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                };
                drop(absorbed);
                self.state = BodyState::Done;
                Poll::Ready(match end {
                    Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                    Ok(None) => None,
                    Err(e) => Some(Err(e)),
                })
            }
            BodyState::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            BodyState::Direct { recv, .. } => recv.is_end_stream(),
            BodyState::Absorbed { .. } => false,
            BodyState::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;

    use super::*;

    /// Serves `handle` on one end of an in-memory pipe; returns a client on the other.
    async fn client_of<H, F>(handle: H, client: h2::client::Builder) -> h2::client::SendRequest<Bytes>
    where
        H: Fn(Request<RequestBody>) -> F + Send + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, std::convert::Infallible>> + Send + 'static,
    {
        let (near, far) = tokio::io::duplex(256 * 1024);
        tokio::spawn(async move {
            let watch = IdleWatch::new();
            let (_not_draining, draining) = tokio::sync::watch::channel(false);
            serve(far, 10_000, handle, &watch, None, &draining, "10.0.0.1:1".parse().unwrap()).await;
        });
        let (sender, connection) = client.handshake(near).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    /// A request body of 60,000 five-byte frames (an empty gRPC message each) whose handler
    /// reads nothing for half a second: the frames leave h2 as they arrive, so the
    /// connection is not closed over them, and the handler reads every byte.
    #[tokio::test]
    async fn tiny_frames_of_a_request_whose_handler_waits_are_taken_out_of_h2() {
        let handle = |req: Request<RequestBody>| async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
            Ok(Response::new(Full::new(Bytes::from(format!("{body:?}")))))
        };
        let mut sender = client_of(handle, h2::client::Builder::new()).await.ready().await.unwrap();
        let request = Request::post("http://payment/upload").body(()).unwrap();
        let (response, mut stream) = sender.send_request(request, false).unwrap();
        for batch in 0..60 {
            for _ in 0..1_000 {
                stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false).unwrap();
            }
            // Bursts of 1,000 frames, as a client writes them between its reads.
            if batch % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::task::yield_now().await;
        }
        stream.send_data(Bytes::new(), true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("answered within 10 s")
            .expect("the connection stayed up");
        let answer = response.into_body().data().await.unwrap().unwrap();
        assert_eq!(answer, "Ok(300000)");
    }

    /// 2,000 responses at once to a client with h2's default 64 KiB window: each response's
    /// first DATA frame carries what the window had room for, never a lone first byte.
    #[tokio::test]
    async fn responses_to_a_client_short_of_window_are_not_cut_after_their_first_byte() {
        let handle =
            |_req: Request<RequestBody>| async { Ok(Response::new(Full::new(Bytes::from(vec![b'x'; 100])))) };
        let mut client = h2::client::Builder::new();
        client.data_frame_budget(usize::MAX / 2);
        let sender = client_of(handle, client).await;
        let exchanges: Vec<_> = (0..2_000)
            .map(|_| {
                let sender = sender.clone();
                tokio::spawn(async move {
                    let mut sender = sender.ready().await.unwrap();
                    let (response, _) =
                        sender.send_request(Request::get("http://payment/").body(()).unwrap(), true).unwrap();
                    let mut body = response.await.unwrap().into_body();
                    let mut frames = Vec::new();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.unwrap();
                        let _ = body.flow_control().release_capacity(chunk.len());
                        frames.push(chunk.len());
                    }
                    frames
                })
            })
            .collect();
        let mut all = Vec::new();
        for exchange in exchanges {
            all.push(tokio::time::timeout(Duration::from_secs(30), exchange).await.unwrap().unwrap());
        }
        let cut = all.iter().filter(|frames| frames.first() == Some(&1) && frames.len() > 1).count();
        assert!(all.iter().all(|frames| frames.iter().sum::<usize>() == 100));
        assert_eq!(cut, 0, "{cut} of 2,000 responses began with a 1-byte DATA frame");
    }
}
