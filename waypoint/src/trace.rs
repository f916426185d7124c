//! Trace context and spans. Each request through the waypoint is a span: its trace id comes
//! from the request's W3C `traceparent` or B3 headers (or is created), its parent is the
//! caller's span, and the upstream request carries both header styles with the waypoint's span
//! as the new parent — so one trace id runs through every hop whose application forwards the
//! headers. Sampled spans are exported in batches over OTLP/HTTP (JSON) to a collector.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::headers::WrittenValues;

// The trace headers as names (a `&str` name is parsed again on every lookup).
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_SINGLE: HeaderName = HeaderName::from_static("b3");

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: TraceId,
    /// The caller's span, if the request carried one.
    pub parent_span_id: Option<SpanId>,
    /// The waypoint's own span for this request.
    pub span_id: SpanId,
    pub sampled: bool,
}

/// A trace id: 32 lower-case hex digits.
pub type TraceId = HexId<32>;
/// A span id: 16 lower-case hex digits.
pub type SpanId = HexId<16>;

/// An id as `N` lower-case hex digits, not all zero, kept inline: ids are on every request's
/// path, and as `String`s each one was an allocation, and another when copied into a header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexId<const N: usize>([u8; N]);

impl<const N: usize> HexId<N> {
    /// A random id (never all zeros).
    pub fn random() -> Self {
        let value = if N > 16 { fastrand::u128(1..) } else { fastrand::u64(1..).into() };
        let mut digits = [b'0'; N];
        write_hex(&mut digits, value);
        HexId(digits)
    }

    /// `text` as an id if it is `N` hex digits and not all zeros (upper case is lowered).
    fn parse(text: &str) -> Option<Self> {
        let digits: [u8; N] = text.as_bytes().try_into().ok()?;
        let valid = digits.iter().all(u8::is_ascii_hexdigit) && digits.iter().any(|&d| d != b'0');
        valid.then(|| HexId(digits.map(|d| d.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl HexId<32> {
    /// A 128-bit trace id, or a 64-bit one (B3 allows both) zero-padded on the left.
    fn parse_trace(text: &str) -> Option<Self> {
        if text.len() != 16 {
            return Self::parse(text);
        }
        let low = HexId::<16>::parse(text)?;
        let mut digits = [b'0'; 32];
        digits[16..].copy_from_slice(&low.0);
        Some(HexId(digits))
    }
}

impl<const N: usize> std::ops::Deref for HexId<N> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const N: usize> std::fmt::Display for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> std::fmt::Debug for HexId<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const N: usize> PartialEq<&str> for HexId<N> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The low `out.len() / 2` bytes of `value` as lower-case hex digits filling `out` (without
/// the formatting machinery: ids are written on every request's path).
fn write_hex(out: &mut [u8], value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let last = out.len().min(32);
    for (i, digit) in out[..last].iter_mut().enumerate() {
        *digit = DIGITS[((value >> (4 * (last - 1 - i))) & 0xf) as usize];
    }
}

impl TraceContext {
    /// From `traceparent`, else B3 (multi-header or single `b3`), else a new trace sampled at
    /// `sampling_percent`. A caller's sampling decision is kept.
    pub fn from_headers(headers: &HeaderMap, sampling_percent: f64) -> Self {
        let get = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let new_span = SpanId::random();
        if let Some(tp) = get(TRACEPARENT) {
            let mut parts = tp.split('-');
            let (version, trace, parent, flags) = (parts.next(), parts.next(), parts.next(), parts.next());
            if let (Some(version), Some(trace), Some(parent), Some(flags)) = (version, trace, parent, flags)
                && version.len() == 2
                && let (Some(trace_id), Some(parent)) = (TraceId::parse(trace), SpanId::parse(parent))
            {
                let flags = u8::from_str_radix(flags, 16).unwrap_or(0);
                return TraceContext {
                    trace_id,
                    parent_span_id: Some(parent),
                    span_id: new_span,
                    sampled: flags & 1 == 1,
                };
            }
        }
        let b3_sampled = |v: &str| matches!(v, "1" | "true" | "d");
        if let Some(trace_id) = get(B3_TRACE_ID).and_then(TraceId::parse_trace) {
            return TraceContext {
                trace_id,
                parent_span_id: get(B3_SPAN_ID).and_then(SpanId::parse),
                span_id: new_span,
                sampled: get(B3_SAMPLED).map(b3_sampled).unwrap_or_else(|| roll(sampling_percent)),
            };
        }
        if let Some(b3) = get(B3_SINGLE) {
            let mut parts = b3.split('-');
            if let Some(trace_id) = parts.next().and_then(TraceId::parse_trace) {
                return TraceContext {
                    trace_id,
                    parent_span_id: parts.next().and_then(SpanId::parse),
                    span_id: new_span,
                    sampled: parts.next().map(b3_sampled).unwrap_or_else(|| roll(sampling_percent)),
                };
            }
        }
        TraceContext {
            trace_id: TraceId::random(),
            parent_span_id: None,
            span_id: new_span,
            sampled: roll(sampling_percent),
        }
    }

    /// Sets both header styles for the upstream request, the waypoint's span as the parent.
    pub fn inject(&self, headers: &mut HeaderMap, values: &mut WrittenValues) {
        let mut set = |name: HeaderName, parts: &[&[u8]]| {
            if let Some(v) = values.unique_value(parts) {
                headers.insert(name, v);
            }
        };
        let flags: &[u8] = if self.sampled { b"-01" } else { b"-00" };
        set(TRACEPARENT, &[b"00-", &self.trace_id.0, b"-", &self.span_id.0, flags]);
        set(B3_TRACE_ID, &[&self.trace_id.0]);
        set(B3_SPAN_ID, &[&self.span_id.0]);
        if let Some(parent) = &self.parent_span_id {
            set(B3_PARENT_SPAN_ID, &[&parent.0]);
        } else {
            headers.remove(B3_PARENT_SPAN_ID);
        }
        headers.insert(B3_SAMPLED, HeaderValue::from_static(if self.sampled { "1" } else { "0" }));
        // The single-header form would now disagree with the multi-header one.
        headers.remove(B3_SINGLE);
    }
}

fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub context: TraceContext,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    pub error: bool,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_string()
}

/// The OTLP/HTTP JSON body for a batch of spans (`ExportTraceServiceRequest`).
pub fn otlp_json(service_name: &str, spans: &[Span]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let attributes: Vec<Value> = s
                .attributes
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::Number(n) if n.is_i64() || n.is_u64() => json!({"intValue": n.to_string()}),
                        Value::String(text) => json!({"stringValue": text}),
                        other => json!({"stringValue": other.to_string()}),
                    };
                    json!({"key": k, "value": value})
                })
                .collect();
            let mut span = json!({
                "traceId": s.context.trace_id.as_str(),
                "spanId": s.context.span_id.as_str(),
                "name": s.name,
                // SPAN_KIND_SERVER: the waypoint serves the caller's request.
                "kind": 2,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": attributes,
                "status": {"code": if s.error { 2 } else { 1 }},
            });
            if let Some(parent) = &s.context.parent_span_id {
                span["parentSpanId"] = json!(parent.as_str());
            }
            span
        })
        .collect();
    json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service_name}}]},
        "scopeSpans": [{"scope": {"name": "warren-waypoint"}, "spans": spans}],
    }]})
}

/// Sends spans to the collector in the background, in batches (every second or 100 spans);
/// a full queue drops spans rather than slowing requests.
#[derive(Clone)]
pub struct Exporter {
    queue: mpsc::Sender<Span>,
}

impl Exporter {
    pub fn start(collector: SocketAddr, service_name: String) -> Self {
        let (queue, mut rx) = mpsc::channel::<Span>(4096);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let next = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await;
                match next {
                    Ok(Some(span)) => {
                        batch.push(span);
                        if batch.len() < 100 {
                            continue;
                        }
                    }
                    Ok(None) => return,
                    Err(_) if batch.is_empty() => continue,
                    Err(_) => {}
                }
                let body = otlp_json(&service_name, &batch);
                let count = batch.len();
                batch.clear();
                if let Err(e) = post(collector, body).await {
                    warn!(%collector, spans = count, "exporting spans failed: {e}");
                } else {
                    debug!(%collector, spans = count, "spans exported");
                }
            }
        });
        Exporter { queue }
    }

    pub fn export(&self, span: Span) {
        let _ = self.queue.try_send(span);
    }
}

async fn post(collector: SocketAddr, body: Value) -> Result<(), String> {
    let tcp = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(collector))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::post("/v1/traces")
        .header("host", collector.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = send.send_request(request).await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("the collector answered {}", response.status()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn ids_are_fixed_width_lower_case_hex() {
        let mut digits = [0u8; 4];
        write_hex(&mut digits, 0xab);
        assert_eq!(&digits, b"00ab");
        let mut digits = [0u8; 32];
        write_hex(&mut digits, u128::MAX);
        assert_eq!(digits, [b'f'; 32]);
        // Random ids are valid ids: the right width, hex, not all zeros.
        for _ in 0..100 {
            assert!(
                TraceId::parse(&TraceId::random()).is_some() && SpanId::parse(&SpanId::random()).is_some()
            );
        }
        assert_eq!(SpanId::parse("B7AD6B7169203331").unwrap(), "b7ad6b7169203331");
        for bad in ["0000000000000000", "b7ad6b716920333", "b7ad6b716920333g", "b7ad6b71692033310"] {
            assert!(SpanId::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn w3c_context_is_continued_with_a_child_span() {
        let incoming = headers(&[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]);
        let ctx = TraceContext::from_headers(&incoming, 0.0);
        assert_eq!(ctx.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(ctx.parent_span_id.as_deref(), Some("b7ad6b7169203331"));
        assert!(ctx.sampled);
        assert_ne!(ctx.span_id, "b7ad6b7169203331");
        let mut out = HeaderMap::new();
        ctx.inject(&mut out, &mut WrittenValues::new());
        assert_eq!(out["traceparent"], format!("00-0af7651916cd43dd8448eb211c80319c-{}-01", ctx.span_id));
        assert_eq!(out["x-b3-traceid"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(out["x-b3-parentspanid"], "b7ad6b7169203331");
        assert_eq!(out["x-b3-sampled"], "1");
        for unique in ["traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid"] {
            assert!(out[unique].is_sensitive(), "{unique} is sent as a literal, not added to HPACK's table");
        }
    }

    #[test]
    fn b3_contexts_are_read_and_new_ones_created() {
        let b3 = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        let ctx = TraceContext::from_headers(&b3, 100.0);
        assert_eq!(ctx.trace_id, "0000000000000000463ac35c9f6413ad");
        assert_eq!(ctx.parent_span_id.as_deref(), Some("a2fb4a1d1a96d312"));
        assert!(!ctx.sampled, "the caller's decision is kept");
        let single = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        assert_eq!(TraceContext::from_headers(&single, 0.0).trace_id, "80f198ee56343ba864fe8b2a57d3eff7");
        let fresh = TraceContext::from_headers(&HeaderMap::new(), 100.0);
        assert!(TraceId::parse(&fresh.trace_id).is_some() && fresh.parent_span_id.is_none() && fresh.sampled);
        assert!(!TraceContext::from_headers(&HeaderMap::new(), 0.0).sampled);
        // A malformed traceparent is ignored, not trusted.
        let bad = headers(&[("traceparent", "00-zz-yy-01")]);
        assert!(TraceContext::from_headers(&bad, 0.0).parent_span_id.is_none());
    }

    #[test]
    fn spans_are_otlp_json() {
        let ctx = TraceContext::from_headers(
            &headers(&[("x-b3-traceid", "463ac35c9f6413ad463ac35c9f6413ad")]),
            100.0,
        );
        let span = Span {
            context: ctx.clone(),
            name: "payment.shop.svc.cluster.local:80/*".into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            end: SystemTime::UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![("http.status_code", json!(200)), ("http.method", json!("GET"))],
            error: false,
        };
        let body = otlp_json("waypoint.shop", &[span]);
        let s = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "463ac35c9f6413ad463ac35c9f6413ad");
        assert_eq!(s["startTimeUnixNano"], "1000000000");
        assert_eq!(s["attributes"][0]["value"]["intValue"], "200");
        assert_eq!(
            body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "waypoint.shop"
        );
    }
}
