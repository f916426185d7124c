//! What a request leaves behind — its metrics sample, its access-log line and its span — written
//! when its response has ended (or was dropped), as Envoy writes them: the duration runs to the
//! response's last byte, the sizes are the bodies' whole, a gRPC status in trailers is known,
//! and a response that broke off says why in its flags. Till then the request counts as in
//! flight on its downstream connection (`--idle-timeout-secs`).

use std::{
    borrow::Cow,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, uri::PathAndQuery};
use hyper::body::{Body, Frame, SizeHint};
use serde_json::json;
use tracing::info;
use warren_core::model::Workload;

use crate::{
    body::RequestSize,
    forward::{Downstream, ResponseBody},
    grpc::grpc_status,
    idle::Busy,
    metrics::RequestLabels,
    state::WaypointState,
    trace::{Span, TraceContext},
    upstream::{BoxError, ResponseTimeout},
};

/// Everything the request's record needs once its response has ended (boxed: hyper moves the
/// response body around, and a pointer moves cheaply).
pub struct RequestRecord {
    pub state: Arc<WaypointState>,
    pub down: Arc<Downstream>,
    pub started: Instant,
    pub span_start: SystemTime,
    pub method: Method,
    /// Shared with the request (a count, not a copy).
    pub path: Option<PathAndQuery>,
    pub trace: TraceContext,
    /// The metric labels but for the flags, which are written at the end.
    pub labels: RequestLabels,
    pub flags: Vec<&'static str>,
    pub route: Option<Arc<str>>,
    pub upstream_cluster: Option<Arc<str>>,
    pub upstream: Option<Arc<Workload>>,
    pub attempts: u32,
    pub detail: String,
    pub request: RequestSize,
}

/// The response body as the client gets it: counted, watched for its end, and recorded then.
pub struct ResponseCounter {
    inner: ResponseBody,
    record: Option<Box<RequestRecord>>,
    bytes: u64,
    /// Whether the body was read to its end, or broke off (said in the record).
    ended: bool,
    _busy: Busy,
}

impl ResponseCounter {
    pub fn new(inner: ResponseBody, record: Box<RequestRecord>, busy: Busy) -> Self {
        Self { inner, record: Some(record), bytes: 0, ended: false, _busy: busy }
    }
}

impl Body for ResponseCounter {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(record) = &mut self.record
                    && record.labels.request_protocol == "grpc"
                    && record.labels.grpc_response_status.is_none()
                {
                    record.labels.grpc_response_status = grpc_status(trailers);
                }
            }
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(e))) => {
                self.ended = true;
                if let Some(record) = &mut self.record {
                    // The route's timeout, or the upstream's body broke off.
                    record.flags.push(if e.is::<ResponseTimeout>() { "UT" } else { "UR" });
                    record.detail = join(&record.detail, &format!("the response broke off: {e}"));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseCounter {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else { return };
        // The client went away before the end (hyper may stop at a last frame that says it is
        // the end, without reading past it; it reads no body at all for a HEAD request or an
        // answer that has none).
        let bodiless =
            record.method == Method::HEAD || matches!(record.labels.response_code, 101 | 204 | 304);
        if !(self.ended || self.inner.is_end_stream() || bodiless) {
            record.flags.push("DC");
            record.detail = join(&record.detail, "the client went away before the response ended");
        }
        record.finish(self.bytes);
    }
}

/// `detail`, and `more` after it.
pub fn join(detail: &str, more: &str) -> String {
    if detail.is_empty() { more.to_string() } else { format!("{detail}; {more}") }
}

impl RequestRecord {
    /// The metrics sample, the span and the access-log line, with `response_bytes` sent.
    pub fn finish(self, response_bytes: u64) {
        let RequestRecord { state, down, mut labels, .. } = self;
        let elapsed = self.started.elapsed();
        labels.response_flags = match self.flags[..] {
            [] => "-".into(),
            [one] => one.into(),
            ref many => Cow::Owned(many.join(",")),
        };
        let flags = labels.response_flags.clone();
        let status = labels.response_code;
        let grpc_status = labels.grpc_response_status;
        let path = self.path.as_ref().map_or("/", |p| p.as_str());
        let request_bytes = self.request.bytes();
        if let (true, Some(exporter)) = (self.trace.sampled, &state.exporter) {
            let mut attributes = vec![
                ("http.method", json!(self.method.as_str())),
                ("http.url", json!(path)),
                ("http.status_code", json!(status)),
                ("response_flags", json!(flags)),
                ("upstream_cluster", json!(self.upstream_cluster.as_deref().unwrap_or(""))),
                ("istio.namespace", json!(down.service.namespace)),
                ("peer.identity", json!(down.peer_side.principal)),
            ];
            if let Some(code) = grpc_status {
                attributes.push(("grpc.status_code", json!(code)));
            }
            exporter.export(Span {
                context: self.trace,
                // Istio's span name: the service authority and a wildcard path.
                name: format!("{}:{}/*", down.service_labels.hostname, down.port),
                start: self.span_start,
                end: SystemTime::now(),
                attributes,
                error: status >= 500 || grpc_status.is_some_and(|c| c != 0),
            });
        }
        info!(
            target: "access",
            method = self.method.as_str(),
            path,
            protocol = down.protocol.as_str(),
            status,
            // Only for a gRPC call (an absent field costs nothing to write).
            grpc_status = grpc_status.map(u64::from),
            response_flags = &*flags,
            duration_ms = elapsed.as_millis() as u64,
            bytes_received = request_bytes,
            bytes_sent = response_bytes,
            src = &*down.client_text,
            src_identity = down.peer_side.principal,
            service = down.service_labels.hostname,
            route = self.route.as_deref().unwrap_or(""),
            upstream_cluster = self.upstream_cluster.as_deref().unwrap_or(""),
            upstream = %OrNothing(self.upstream.as_deref()),
            attempts = self.attempts,
            detail = self.detail,
            "request"
        );
        state.metrics.record(labels, elapsed.as_secs_f64() * 1000.0, request_bytes, response_bytes);
    }
}

/// The value shown if there is one, else nothing (a log field that may be empty).
struct OrNothing<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrNothing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{Either, Full};

    use super::*;
    use crate::idle::IdleWatch;

    #[tokio::test(start_paused = true)]
    async fn the_response_body_keeps_its_request_in_flight_until_it_is_dropped() {
        const LIMIT: Duration = Duration::from_secs(60);
        let watch = IdleWatch::new();
        let body = ResponseCounter {
            inner: Either::Left(Full::new(Bytes::from_static(b"body"))),
            record: None,
            bytes: 0,
            ended: false,
            _busy: watch.busy(),
        };
        tokio::time::advance(2 * LIMIT).await;
        let idle = tokio::time::timeout(LIMIT / 2, watch.idle_for(LIMIT)).await;
        assert!(idle.is_err(), "idle while a response body was still being sent");
        drop(body);
        let started = tokio::time::Instant::now();
        watch.idle_for(LIMIT).await;
        assert_eq!(started.elapsed(), LIMIT);
    }
}
