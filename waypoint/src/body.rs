//! Request bodies on their way upstream.
//!
//! A body that is all here when the request is routed — none at all, one that declares a small
//! length, or one whose frames were already read when its headers were — goes upstream as one
//! buffer that a retry or a mirror sends again. Any other body streams: its frames go upstream
//! as they arrive (a gRPC client- or bidi-streaming call, an upload of unknown length), while
//! a copy of up to `--request-buffer-bytes` is kept so that a retry can replay it, as Envoy's
//! retry buffer does. Past that the body can no longer be sent again: no retry, and mirrors
//! skip the request.
//!
//! Attempts are made one after another, but an abandoned one may still be reading (an HTTP/1.1
//! connection finishing its write): every reader reads the same sequence of frames, whichever
//! of them pulls a frame from the client first.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, SizeHint};

use crate::upstream::BoxError;

/// A body that declares at most this length is read whole before the request goes on: it is
/// on its way, and one buffer is the cheapest thing to send and to send again.
const WHOLE_IF_DECLARED_UP_TO: u64 = 64 * 1024;

/// A request's body as the waypoint received it.
pub enum Received {
    /// All of it, read before routing went on.
    Whole(Bytes),
    /// Still arriving (or with trailers): sent upstream as it comes.
    Streamed(StreamedBody),
}

/// Reads what of `body` is here: all of it when it declares a length up to
/// [`WHOLE_IF_DECLARED_UP_TO`] or has already arrived, else the frames already read, and the
/// rest streams. `buffer_limit` bounds what is kept for retries.
pub async fn receive<B>(body: B, buffer_limit: usize) -> Result<Received, BoxError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(Received::Whole(Bytes::new()));
    }
    let declared = body.size_hint().exact();
    if declared.is_some_and(|n| n <= WHOLE_IF_DECLARED_UP_TO.min(buffer_limit as u64)) {
        let collected = body.collect().await.map_err(Into::into)?;
        if let Some(trailers) = collected.trailers().cloned() {
            let data = collected.to_bytes();
            let tee = Tee::new(buffer_limit, None, vec![data], Some(End::Complete(Some(trailers))));
            return Ok(Received::Streamed(StreamedBody::new(tee)));
        }
        return Ok(Received::Whole(collected.to_bytes()));
    }
    let mut body = body;
    let mut arrived: Vec<Bytes> = Vec::new();
    let mut arrived_bytes = 0usize;
    // What is ready now, without waiting: a gRPC call's one message usually came with its
    // headers.
    let next = std::future::poll_fn(|cx| {
        loop {
            let polled = match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => return Poll::Ready(Ok(Next::More)),
                Poll::Ready(polled) => polled,
            };
            match polled {
                None => return Poll::Ready(Ok(Next::End(None))),
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        arrived_bytes += data.len();
                        arrived.push(data);
                        if arrived_bytes > buffer_limit {
                            return Poll::Ready(Ok(Next::More));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            return Poll::Ready(Ok(Next::End(Some(trailers))));
                        }
                    }
                },
            }
        }
    })
    .await?;
    let tee = match next {
        Next::End(None) => return Ok(Received::Whole(concat(arrived.iter(), arrived_bytes))),
        Next::End(Some(trailers)) => {
            Tee::new(buffer_limit, None, arrived, Some(End::Complete(Some(trailers))))
        }
        Next::More => {
            Tee::new(buffer_limit, Some(UnsyncBoxBody::new(body.map_err(Into::into))), arrived, None)
        }
    };
    Ok(Received::Streamed(StreamedBody::new(tee)))
}

enum Next {
    /// The body ended (with these trailers, if any).
    End(Option<HeaderMap>),
    /// More is to come.
    More,
}

/// `chunks` (`len` bytes in all) as one buffer, copied only if there are several.
fn concat<'a>(mut chunks: impl ExactSizeIterator<Item = &'a Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.next().expect("one").clone();
    }
    let mut all = BytesMut::with_capacity(len);
    for chunk in chunks {
        all.extend_from_slice(chunk);
    }
    all.freeze()
}

/// The body as one upstream attempt sends it.
pub enum RequestBody {
    Whole(Full<Bytes>),
    Streamed(TeeReader),
}

impl RequestBody {
    pub fn whole(data: Bytes) -> Self {
        RequestBody::Whole(Full::new(data))
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestBody::Whole(_) => f.write_str("RequestBody::Whole"),
            RequestBody::Streamed(reader) => write!(f, "RequestBody::Streamed(at frame {})", reader.next),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Whole(full) => Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            RequestBody::Streamed(reader) => Pin::new(reader).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Whole(full) => full.is_end_stream(),
            RequestBody::Streamed(reader) => reader.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Whole(full) => full.size_hint(),
            // The client's `content-length`, when it sent one, goes upstream as a header.
            RequestBody::Streamed(_) => SizeHint::default(),
        }
    }
}

/// The client's body, read once and shared by the attempts (and mirrors) that send it.
pub struct Tee {
    state: Mutex<TeeState>,
    /// Woken when the body has ended, failed or been abandoned (a mirror waits for it).
    finished: tokio::sync::Notify,
    limit: usize,
}

struct TeeState {
    /// The client's body while it is being read; dropped at its end, or when no one is left to
    /// read it.
    source: Option<UnsyncBoxBody<Bytes, BoxError>>,
    /// Data frames read and kept, from frame `first_kept` on: all of them while they total at
    /// most `limit` bytes and a retry or a mirror may want them; and those read before routing
    /// (the first attempt needs them), whatever their size.
    kept: VecDeque<Bytes>,
    first_kept: usize,
    kept_bytes: usize,
    /// Whether frames read are still kept: not once they outgrew the limit, nor once the only
    /// reader left is the one sending them (no retry can come, no mirror waits).
    keeping: bool,
    /// Data frames read from the client (the index of the next one), and their bytes.
    frames: usize,
    bytes: u64,
    end: Option<End>,
    /// When `end` came: where a route's timeouts start counting.
    ended_at: Option<tokio::time::Instant>,
    /// Readers and the request's own handle: when none is left, the rest is not read.
    holders: usize,
    /// Mirrors waiting for the whole body.
    mirrors: usize,
    /// Readers waiting for the client's next frame. The client's body wakes only the last to
    /// poll it, which wakes these once it has the frame.
    waiting: Vec<Waker>,
}

enum End {
    /// With the trailers, if the client sent any.
    Complete(Option<HeaderMap>),
    Failed(String),
    /// Every reader and the request were gone before the client finished.
    Abandoned,
}

impl Tee {
    fn new(
        limit: usize,
        source: Option<UnsyncBoxBody<Bytes, BoxError>>,
        arrived: Vec<Bytes>,
        end: Option<End>,
    ) -> Self {
        let kept_bytes: usize = arrived.iter().map(Bytes::len).sum();
        let state = TeeState {
            source,
            frames: arrived.len(),
            bytes: kept_bytes as u64,
            kept: arrived.into(),
            first_kept: 0,
            kept_bytes,
            // Past the limit already: sent once, never again.
            keeping: kept_bytes <= limit,
            ended_at: end.as_ref().map(|_| tokio::time::Instant::now()),
            end,
            holders: 0,
            mirrors: 0,
            waiting: Vec::new(),
        };
        Tee { state: Mutex::new(state), finished: tokio::sync::Notify::new(), limit }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TeeState> {
        self.state.lock().expect("poisoned")
    }
}

impl TeeState {
    fn record(&mut self, data: &Bytes, limit: usize) {
        self.frames += 1;
        self.bytes += data.len() as u64;
        if !self.keeping {
            return;
        }
        if self.kept_bytes + data.len() <= limit {
            self.kept_bytes += data.len();
            self.kept.push_back(data.clone());
        } else {
            self.stop_keeping();
        }
    }

    /// Past the limit: what is kept goes (a retry begun earlier fails on it), nothing more is.
    fn stop_keeping(&mut self) {
        self.keeping = false;
        self.kept = VecDeque::new();
        self.first_kept = self.frames;
        self.kept_bytes = 0;
    }

    /// Whether every frame read so far is kept: the body can be sent from its start.
    fn whole_kept(&self) -> bool {
        self.keeping && self.first_kept == 0 && self.kept.len() == self.frames
    }

    /// Frames up to `sent` are needed by no one: they go, and nothing more is kept.
    fn keep_only_after(&mut self, sent: usize) {
        let done = sent.saturating_sub(self.first_kept).min(self.kept.len());
        for data in self.kept.drain(..done) {
            self.kept_bytes -= data.len();
        }
        self.first_kept += done;
        self.keeping = false;
    }

    /// The end of the client's body: the source goes, and every waiting reader and mirror is
    /// told.
    fn finish(&mut self, end: End, finished: &tokio::sync::Notify) {
        self.end = Some(end);
        self.ended_at = Some(tokio::time::Instant::now());
        self.source = None;
        self.wake_waiting();
        finished.notify_waiters();
    }

    fn wake_waiting(&mut self) {
        for waker in self.waiting.drain(..) {
            waker.wake();
        }
    }
}

/// The request's own handle on its streamed body: makes a reader per attempt, tells whether
/// the body can still be sent again, and counts what arrived.
pub struct StreamedBody(Arc<Tee>);

impl StreamedBody {
    fn new(tee: Tee) -> Self {
        tee.lock().holders += 1;
        StreamedBody(Arc::new(tee))
    }

    /// A reader from the first byte.
    pub fn reader(&self) -> TeeReader {
        self.0.lock().holders += 1;
        TeeReader { tee: self.0.clone(), next: 0, trailers_sent: false }
    }

    /// Whether a new attempt could send the body from its start: it has not outgrown the buffer
    /// nor broken off.
    pub fn replayable(&self) -> bool {
        let state = self.0.lock();
        state.whole_kept() && !matches!(state.end, Some(End::Failed(_)))
    }

    /// Why the client's body broke off, if it did.
    pub fn failure(&self) -> Option<String> {
        match &self.0.lock().end {
            Some(End::Failed(reason)) => Some(reason.clone()),
            _ => None,
        }
    }

    /// When the client's body ended (or broke off), if it has.
    pub fn ended_at(&self) -> Option<tokio::time::Instant> {
        self.0.lock().ended_at
    }

    /// Completes when the client's body has ended, broken off or been abandoned.
    pub fn ended(&self) -> crate::deadline::Start {
        let tee = self.0.clone();
        Box::pin(async move {
            loop {
                let finished = tee.finished.notified();
                let mut finished = std::pin::pin!(finished);
                finished.as_mut().enable();
                if tee.lock().end.is_some() {
                    return;
                }
                finished.await;
            }
        })
    }

    /// A mirror's claim on the whole body (which it does not read itself).
    pub fn mirror(&self) -> MirrorCopy {
        self.0.lock().mirrors += 1;
        MirrorCopy(self.0.clone())
    }

    /// The body's size so far: the request size the metrics record.
    pub fn size(&self) -> RequestSize {
        RequestSize::Streamed(self.0.clone())
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        release(&self.0);
    }
}

/// One holder fewer; the last one gone before the body ended abandons it. Readers still
/// waiting are woken either way, in case the one gone was the one the client's body would wake.
fn release(tee: &Tee) {
    let mut state = tee.lock();
    state.holders -= 1;
    if state.holders == 0 && state.end.is_none() {
        state.finish(End::Abandoned, &tee.finished);
    } else {
        state.wake_waiting();
    }
}

/// A mirror's copy of a streamed body, made once the client has sent all of it. While one
/// waits, every frame is kept (within the limit).
pub struct MirrorCopy(Arc<Tee>);

impl MirrorCopy {
    /// The whole body: none if it was longer than the buffer, broke off, or was abandoned.
    pub async fn whole(&self) -> Option<Bytes> {
        let tee = &*self.0;
        loop {
            let finished = tee.finished.notified();
            let mut finished = std::pin::pin!(finished);
            finished.as_mut().enable();
            {
                let state = tee.lock();
                match &state.end {
                    Some(End::Complete(_)) if state.whole_kept() => {
                        return Some(concat(state.kept.iter(), state.kept_bytes));
                    }
                    Some(_) => return None,
                    None if !state.whole_kept() => return None,
                    None => {}
                }
            }
            finished.await;
        }
    }
}

impl Drop for MirrorCopy {
    fn drop(&mut self) {
        self.0.lock().mirrors -= 1;
    }
}

/// How big a request's body was, for `istio_request_bytes`: known at the response head, or
/// counted as it streams (read at the response's end).
pub enum RequestSize {
    Known(u64),
    Streamed(Arc<Tee>),
}

impl RequestSize {
    pub fn bytes(&self) -> u64 {
        match self {
            RequestSize::Known(n) => *n,
            RequestSize::Streamed(tee) => tee.lock().bytes,
        }
    }
}

/// One attempt's copy of a streamed body: the frames kept so far, then the client's as they
/// arrive.
pub struct TeeReader {
    tee: Arc<Tee>,
    /// The index of the next data frame to send.
    next: usize,
    trailers_sent: bool,
}

impl Body for TeeReader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let tee = &*this.tee;
        let mut state = tee.lock();
        if state.holders == 1 && state.mirrors == 0 && (state.keeping || !state.kept.is_empty()) {
            // The request is answered and this is its one attempt left: nobody will read what
            // it has sent again, so nothing more is kept (a long stream holds no copy).
            state.keep_only_after(this.next);
        }
        loop {
            if this.next < state.frames {
                // A frame already read (by an earlier attempt, or before routing).
                let kept = this.next.checked_sub(state.first_kept).and_then(|i| state.kept.get(i));
                let Some(data) = kept.cloned() else {
                    return Poll::Ready(Some(Err(
                        "the request body outgrew the waypoint's --request-buffer-bytes and cannot be sent again"
                            .into(),
                    )));
                };
                this.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match &state.end {
                Some(End::Complete(trailers)) => {
                    let trailers = trailers.as_ref().filter(|_| !this.trailers_sent);
                    this.trailers_sent = true;
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t.clone()))));
                }
                Some(End::Failed(reason)) => {
                    return Poll::Ready(Some(Err(
                        format!("the client's request body broke off: {reason}").into()
                    )));
                }
                Some(End::Abandoned) => {
                    return Poll::Ready(Some(Err("the request body was abandoned".into())));
                }
                None => {}
            }
            let source = state.source.as_mut().expect("a body not ended has its source");
            match Pin::new(source).poll_frame(cx) {
                Poll::Pending => {
                    if !state.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                        state.waiting.push(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => state.finish(End::Complete(None), &tee.finished),
                Poll::Ready(Some(Err(e))) => state.finish(End::Failed(e.to_string()), &tee.finished),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        state.record(&data, tee.limit);
                        state.wake_waiting();
                        this.next += 1;
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => {
                        // Trailers end the body; other frame kinds are not HTTP's and are dropped.
                        if let Ok(trailers) = frame.into_trailers() {
                            state.finish(End::Complete(Some(trailers)), &tee.finished);
                        }
                    }
                },
            }
            // The body ended or failed: answered from the end, as any reader that comes late.
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.tee.lock();
        self.next == state.frames
            && match &state.end {
                Some(End::Complete(trailers)) => trailers.is_none() || self.trailers_sent,
                _ => false,
            }
    }
}

impl Drop for TeeReader {
    fn drop(&mut self) {
        release(&self.tee);
    }
}

/// A client's body fed frame by frame by a test.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use tokio::sync::mpsc;

    pub(crate) struct Fed(mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    pub(crate) type Feed = mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>;

    pub(crate) fn fed() -> (Feed, Fed) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Fed(rx))
    }

    pub(crate) async fn streamed(body: Fed, limit: usize) -> StreamedBody {
        match receive(body, limit).await.unwrap() {
            Received::Streamed(s) => s,
            Received::Whole(b) => panic!("streamed expected, got a whole body of {b:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{testing::*, *};

    fn data(text: &'static str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(text.as_bytes())))
    }

    /// The next data frame, as text.
    async fn next_data(reader: &mut TeeReader) -> String {
        let frame = reader.frame().await.expect("a frame").expect("no error");
        String::from_utf8(frame.into_data().expect("data").to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_body_already_here_is_whole() {
        let (feed, body) = fed();
        feed.send(data("he")).unwrap();
        feed.send(data("llo")).unwrap();
        drop(feed);
        match receive(body, 1024).await.unwrap() {
            Received::Whole(b) => assert_eq!(b, "hello"),
            Received::Streamed(_) => panic!("the body had ended"),
        }
    }

    #[tokio::test]
    async fn a_body_still_arriving_streams_and_a_retry_replays_it() {
        let (feed, body) = fed();
        feed.send(data("first")).unwrap();
        let streamed = streamed(body, 1024).await;
        let mut attempt = streamed.reader();
        assert_eq!(next_data(&mut attempt).await, "first");
        // The next frame is not here yet: the reader waits for the client.
        let waiting = tokio::spawn(async move {
            let second = next_data(&mut attempt).await;
            (second, attempt)
        });
        tokio::task::yield_now().await;
        feed.send(data("second")).unwrap();
        let (second, mut attempt) = waiting.await.unwrap();
        assert_eq!(second, "second");

        // A retry starts from the first byte while the first attempt is still reading.
        assert!(streamed.replayable());
        let mut retry = streamed.reader();
        assert_eq!(next_data(&mut retry).await, "first");
        assert_eq!(next_data(&mut retry).await, "second");
        feed.send(data("third")).unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", "1S".parse().unwrap());
        feed.send(Ok(Frame::trailers(trailers))).unwrap();
        drop(feed);
        assert_eq!(next_data(&mut retry).await, "third");
        let end = retry.frame().await.unwrap().unwrap();
        assert_eq!(end.into_trailers().unwrap()["grpc-timeout"], "1S");
        assert!(retry.frame().await.is_none());
        assert!(retry.is_end_stream());
        // The abandoned attempt still reads the same frames, which the retry pulled.
        assert_eq!(next_data(&mut attempt).await, "third");
        assert!(attempt.frame().await.unwrap().unwrap().is_trailers());
        assert_eq!(streamed.size().bytes(), "firstsecondthird".len() as u64);
        assert_eq!(streamed.mirror().whole().await.unwrap(), "firstsecondthird");
    }

    #[tokio::test]
    async fn a_reader_woken_for_another_is_not_left_waiting() {
        let (feed, body) = fed();
        feed.send(data("a")).unwrap();
        let streamed = streamed(body, 1024).await;
        let (mut first, mut second) = (streamed.reader(), streamed.reader());
        assert_eq!(next_data(&mut first).await, "a");
        assert_eq!(next_data(&mut second).await, "a");
        // Both wait; the client's body wakes only the last to poll it.
        let first = tokio::spawn(async move { next_data(&mut first).await });
        tokio::task::yield_now().await;
        let second = tokio::spawn(async move { next_data(&mut second).await });
        tokio::task::yield_now().await;
        feed.send(data("b")).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            (first.await.unwrap(), second.await.unwrap())
        })
        .await
        .expect("both readers get the frame");
        assert_eq!(got, ("b".to_string(), "b".to_string()));
    }

    #[tokio::test]
    async fn past_the_buffer_the_body_streams_on_but_cannot_be_sent_again() {
        let (feed, body) = fed();
        feed.send(data("0123")).unwrap();
        let streamed = streamed(body, 6).await;
        let mut attempt = streamed.reader();
        assert_eq!(next_data(&mut attempt).await, "0123");
        feed.send(data("4567")).unwrap();
        assert_eq!(next_data(&mut attempt).await, "4567", "the attempt gets all of it");
        assert!(!streamed.replayable());
        let mut retry = streamed.reader();
        assert!(retry.frame().await.unwrap().is_err(), "a retry cannot start over");
        let mirror = streamed.mirror();
        drop(feed);
        assert!(attempt.frame().await.is_none());
        assert_eq!(mirror.whole().await, None, "a mirror gets no partial copy");
        assert_eq!(streamed.size().bytes(), 8);
    }

    #[tokio::test]
    async fn what_arrived_before_routing_is_sent_whatever_the_limit() {
        let (feed, body) = fed();
        for chunk in ["0123", "4567", "89"] {
            feed.send(data(chunk)).unwrap();
        }
        let streamed = streamed(body, 6).await;
        assert!(!streamed.replayable(), "past the limit already");
        let mut attempt = streamed.reader();
        for chunk in ["0123", "4567", "89"] {
            assert_eq!(next_data(&mut attempt).await, chunk);
        }
        feed.send(data("more")).unwrap();
        drop(feed);
        assert_eq!(next_data(&mut attempt).await, "more");
        assert!(attempt.frame().await.is_none());
        // Retries ask `replayable` first; a reader made anyway fails rather than send a gap.
        let mut again = streamed.reader();
        let mut failed = false;
        while let Some(frame) = again.frame().await {
            if frame.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "the body can be sent only once");
    }

    #[tokio::test]
    async fn a_body_no_one_reads_any_more_is_abandoned() {
        let (feed, body) = fed();
        feed.send(data("x")).unwrap();
        let streamed = streamed(body, 1024).await;
        let mirror = streamed.mirror();
        let waiting = tokio::spawn(async move { mirror.whole().await });
        let reader = streamed.reader();
        drop(streamed);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a reader still holds the body");
        drop(reader);
        assert_eq!(waiting.await.unwrap(), None);
        assert!(feed.is_closed(), "the client's body is let go");
    }

    #[tokio::test]
    async fn the_last_attempt_of_an_answered_request_keeps_no_copy() {
        let (feed, body) = fed();
        feed.send(data("one")).unwrap();
        let streamed = streamed(body, 1024).await;
        let mut attempt = streamed.reader();
        let size = streamed.size();
        assert_eq!(next_data(&mut attempt).await, "one");
        feed.send(data("two")).unwrap();
        assert_eq!(next_data(&mut attempt).await, "two");
        assert_eq!(attempt.tee.lock().kept.len(), 2, "kept while a retry may come");
        // The request has its answer: its own handle goes, the attempt streams on alone.
        drop(streamed);
        feed.send(data("three")).unwrap();
        assert_eq!(next_data(&mut attempt).await, "three");
        let state = attempt.tee.lock();
        assert!(state.kept.is_empty() && state.kept_bytes == 0, "nothing is kept for nobody");
        drop(state);
        assert_eq!(size.bytes(), 11, "but every byte is counted");
    }

    #[tokio::test]
    async fn a_mirror_waiting_keeps_the_body_whole() {
        let (feed, body) = fed();
        feed.send(data("one")).unwrap();
        let streamed = streamed(body, 1024).await;
        let mut attempt = streamed.reader();
        let mirror = streamed.mirror();
        drop(streamed);
        assert_eq!(next_data(&mut attempt).await, "one");
        feed.send(data("two")).unwrap();
        assert_eq!(next_data(&mut attempt).await, "two");
        drop(feed);
        assert!(attempt.frame().await.is_none());
        assert_eq!(mirror.whole().await.unwrap(), "onetwo");
    }

    #[tokio::test]
    async fn a_client_that_breaks_off_fails_every_reader() {
        let (feed, body) = fed();
        feed.send(data("x")).unwrap();
        let streamed = streamed(body, 1024).await;
        let mut attempt = streamed.reader();
        assert_eq!(next_data(&mut attempt).await, "x");
        feed.send(Err("connection reset".into())).unwrap();
        assert!(attempt.frame().await.unwrap().is_err());
        assert!(!streamed.replayable());
        assert!(streamed.failure().unwrap().contains("connection reset"));
    }

    #[tokio::test]
    async fn trailers_keep_a_body_streamed_so_they_reach_the_upstream() {
        let (feed, body) = fed();
        feed.send(data("m")).unwrap();
        feed.send(Ok(Frame::trailers(HeaderMap::new()))).unwrap();
        let streamed = streamed(body, 1024).await;
        let mut reader = streamed.reader();
        assert_eq!(next_data(&mut reader).await, "m");
        assert!(reader.frame().await.unwrap().unwrap().is_trailers());
        assert!(reader.frame().await.is_none());
    }
}
