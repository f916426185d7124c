//! One request: per-request overrides, the failure schedule, the JSON echo.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full, combinators::WithTrailers};
use serde::{Deserialize, Serialize};

use super::schedule::FailFraction;
use super::stream::{self, STREAM_METHOD_SUFFIX, StreamedAnswer};
use super::upgrade;

/// Request header that picks the response status (200..=599).
pub const STATUS_HEADER: &str = "x-echo-status";
/// Request header that picks a gRPC request's status (0..=16; not 0: a trailers-only answer).
pub const GRPC_STATUS_HEADER: &str = "x-echo-grpc-status";
/// Highest gRPC status code (UNAUTHENTICATED).
pub const MAX_GRPC_STATUS: u64 = 16;
/// Request header that delays this response, in milliseconds (at most [`MAX_DELAY_MS`]).
pub const DELAY_HEADER: &str = "x-echo-delay-ms";
/// Request header naming a URL (`http://ip:port/path`) this server calls before answering,
/// forwarding the trace headers, as an application in a call chain does.
pub const CALL_HEADER: &str = "x-echo-call";
/// Headers a well-behaved application forwards on its outgoing calls (W3C, B3, Envoy's id).
pub const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "b3",
];
/// Path that answers this server's request counts (not counted itself).
pub const STATS_PATH: &str = "/_echo/stats";
/// Longest delay a flag or a header may ask for: keeps a typo from parking a connection forever.
pub const MAX_DELAY_MS: u64 = 60_000;

/// The JSON body of every echo answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EchoBody {
    pub pod: String,
    pub namespace: String,
    pub version: String,
    /// `HTTP/1.1`, `HTTP/2` (or `HTTP/1.0`).
    pub protocol: String,
    pub method: String,
    /// Path with the query string, as received.
    pub path: String,
    /// The `:authority` (HTTP/2) or `Host` header (HTTP/1.1); null when the request had none.
    pub authority: Option<String>,
    /// Request headers by lower-case name: a string, or a list when the header was repeated.
    pub headers: BTreeMap<String, HeaderValues>,
    pub body_bytes: u64,
    /// The TCP peer as the server saw it (`ip:port`): through the mesh, who connected to us.
    pub peer: String,
    /// The outgoing call `x-echo-call` asked for: its status and body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<CallResult>,
}

/// What the downstream call of `x-echo-call` returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallResult {
    pub url: String,
    /// The status, or none when the call failed (then `error` says why).
    pub status: Option<u16>,
    pub body: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Request counts, served at [`STATS_PATH`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub requests: u64,
    /// By `:authority` / `Host` (mirrored copies arrive with a `-shadow` suffix).
    pub by_authority: BTreeMap<String, u64>,
    /// Requests waiting out their delay now, and the most that ever were at once: how many a
    /// proxy in front let through together.
    pub delayed_now: u64,
    pub delayed_max: u64,
}

/// A request waiting out its delay, counted in [`Stats`] until dropped (answered, or
/// abandoned by its client).
struct Delayed<'a>(&'a std::sync::Mutex<Stats>);

impl<'a> Delayed<'a> {
    fn start(stats: &'a std::sync::Mutex<Stats>) -> Self {
        let mut s = stats.lock().expect("poisoned");
        s.delayed_now += 1;
        s.delayed_max = s.delayed_max.max(s.delayed_now);
        Delayed(stats)
    }
}

impl Drop for Delayed<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("poisoned").delayed_now -= 1;
    }
}

/// One header's value(s): a plain string when it appeared once, which is the common case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    One(String),
    Many(Vec<String>),
}

/// Who this server is, stamped on every answer; already checked to be valid header values.
#[derive(Debug, Clone)]
pub struct Identity {
    pub pod: HeaderValue,
    pub namespace: HeaderValue,
    pub version: HeaderValue,
}

/// An answer's body: the bytes, then trailers when it answers a gRPC call (`grpc-status: 0`);
/// or a streaming call's messages as they are answered.
pub type ResponseBody = Either<WholeAnswer, StreamedAnswer>;
/// Without trailers a plain `Full`: it reports its end with its data, so an HTTP/2 answer ends
/// on its one DATA frame as a well-behaved server's does (`WithTrailers` never reports its end
/// early, and hyper then sends an empty DATA frame to end the stream, often in a TCP segment
/// of its own — a cost every proxy on the path paid per request).
pub type WholeAnswer = Either<Full<Bytes>, WithTrailedData>;
pub type WithTrailedData =
    WithTrailers<Full<Bytes>, std::future::Ready<Option<Result<HeaderMap, Infallible>>>>;

/// State shared by every connection of one server.
#[derive(Debug)]
pub struct Handler {
    pub identity: Identity,
    pub fail_fraction: FailFraction,
    pub fail_status: StatusCode,
    /// What a failed gRPC call answers instead of `fail_status`.
    pub fail_grpc_status: u8,
    pub delay: Duration,
    /// Requests counted for the failure schedule so far.
    pub counter: AtomicU64,
    pub stats: std::sync::Mutex<Stats>,
}

/// What the request asked for through `x-echo-*` headers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    pub status: Option<StatusCode>,
    pub grpc_status: Option<u8>,
    pub delay: Option<Duration>,
}

impl Overrides {
    /// Reads the `x-echo-*` headers; the error message names the bad header so a client sees
    /// at once what it got wrong.
    pub fn from_headers(headers: &HeaderMap) -> Result<Overrides, String> {
        let status = match single_number(headers, STATUS_HEADER)? {
            None => None,
            Some(code) => Some(parse_status(code).map_err(|e| format!("{STATUS_HEADER}: {e}"))?),
        };
        let delay = match single_number(headers, DELAY_HEADER)? {
            None => None,
            Some(ms) if ms <= MAX_DELAY_MS => Some(Duration::from_millis(ms)),
            Some(ms) => {
                return Err(format!("{DELAY_HEADER}: {ms} ms is more than the maximum {MAX_DELAY_MS}"));
            }
        };
        let grpc_status = match single_number(headers, GRPC_STATUS_HEADER)? {
            None => None,
            Some(code) if code <= MAX_GRPC_STATUS => Some(code as u8),
            Some(code) => {
                return Err(format!(
                    "{GRPC_STATUS_HEADER}: {code} is not a gRPC status (0..={MAX_GRPC_STATUS})"
                ));
            }
        };
        Ok(Overrides { status, grpc_status, delay })
    }
}

/// The value of a header that must appear at most once and hold a decimal integer.
fn single_number(headers: &HeaderMap, name: &str) -> Result<Option<u64>, String> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(format!("{name}: must appear at most once"));
    }
    let text = value.to_str().map_err(|_| format!("{name}: not a decimal integer"))?;
    // `u64::from_str` accepts a leading '+'; a header value is clearer without one.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{name}: {text:?} is not a decimal integer"));
    }
    text.parse().map(Some).map_err(|_| format!("{name}: {text:?} is too large"))
}

/// A status an echo may answer with: 1xx is excluded because an interim response cannot end a
/// request, and codes above 599 are not HTTP.
pub fn parse_status(code: u64) -> Result<StatusCode, String> {
    u16::try_from(code)
        .ok()
        .filter(|c| (200..=599).contains(c))
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| format!("status {code} is not in 200..=599"))
}

impl Handler {
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        peer: SocketAddr,
    ) -> Result<Response<ResponseBody>, Infallible>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: std::fmt::Display + Send,
    {
        // Probes must not shift the failure schedule, or tests could not count failures.
        if req.method() == Method::GET && req.uri().path() == "/healthz" {
            return Ok(self.text(StatusCode::OK, "ok\n"));
        }
        if req.method() == Method::GET && req.uri().path() == STATS_PATH {
            let stats = self.stats.lock().expect("poisoned").clone();
            let json = serde_json::to_vec(&stats).expect("stats serialize");
            return Ok(self.respond(StatusCode::OK, "application/json", Bytes::from(json)));
        }
        let overrides = match Overrides::from_headers(req.headers()) {
            Ok(overrides) => overrides,
            Err(message) => return Ok(self.text(StatusCode::BAD_REQUEST, format!("{message}\n"))),
        };
        let failed = self.fail_fraction.fails(self.counter.fetch_add(1, Ordering::Relaxed));
        let mut req = req;
        if let Some(protocol) =
            upgrade::requested(req.headers()).filter(|_| req.version() == Version::HTTP_11)
        {
            self.stats.lock().expect("poisoned").requests += 1;
            upgrade::echo_after_switch(&mut req);
            let mut response = self.respond(StatusCode::SWITCHING_PROTOCOLS, "text/plain", Bytes::new());
            response.headers_mut().remove(CONTENT_TYPE);
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("upgrade"));
            response.headers_mut().insert(http::header::UPGRADE, protocol);
            return Ok(response);
        }

        let (parts, body) = req.into_parts();
        let authority =
            parts.uri.authority().map(|a| a.to_string()).or_else(|| parts.headers.get(HOST).map(lossy));
        {
            let mut stats = self.stats.lock().expect("poisoned");
            stats.requests += 1;
            *stats.by_authority.entry(authority.clone().unwrap_or_default()).or_insert(0) += 1;
        }
        if is_grpc(&parts.headers) && parts.uri.path().ends_with(STREAM_METHOD_SUFFIX) {
            let code = overrides.grpc_status.or(failed.then_some(self.fail_grpc_status)).unwrap_or(0);
            if code != 0 {
                return Ok(self.grpc_failure(code));
            }
            let mut response = self.respond(StatusCode::OK, "application/grpc", Bytes::new());
            let hold = overrides.delay.unwrap_or(self.delay);
            *response.body_mut() = Either::Right(stream::answer(body, hold));
            return Ok(response);
        }
        let body_bytes = match drain(body).await {
            Ok(n) => n,
            Err(e) => {
                return Ok(self.text(StatusCode::BAD_REQUEST, format!("reading the request body: {e}\n")));
            }
        };

        let delay = overrides.delay.unwrap_or(self.delay);
        if !delay.is_zero() {
            let _delayed = Delayed::start(&self.stats);
            tokio::time::sleep(delay).await;
        }
        let status = overrides.status.or(failed.then_some(self.fail_status)).unwrap_or(StatusCode::OK);
        let call = match parts.headers.get(CALL_HEADER).map(lossy) {
            Some(url) => Some(call(&url, &parts.headers).await),
            None => None,
        };

        let echo = EchoBody {
            pod: lossy(&self.identity.pod),
            namespace: lossy(&self.identity.namespace),
            version: lossy(&self.identity.version),
            protocol: protocol_name(parts.version).to_string(),
            method: parts.method.to_string(),
            path: parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_string(), |p| p.to_string()),
            authority,
            headers: headers_json(&parts.headers),
            body_bytes,
            peer: peer.to_string(),
            call,
        };
        if is_grpc(&parts.headers) {
            let code = overrides.grpc_status.or(failed.then_some(self.fail_grpc_status)).unwrap_or(0);
            return Ok(self.grpc(code, &echo));
        }
        // 204 and 304 must not carry a body; the identity headers still tell who answered.
        let body = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Bytes::new()
        } else {
            let mut json = serde_json::to_vec(&echo).expect("the echo body always serializes");
            json.push(b'\n');
            Bytes::from(json)
        };
        Ok(self.respond(status, "application/json", body))
    }

    fn text(&self, status: StatusCode, text: impl Into<String>) -> Response<ResponseBody> {
        self.respond(status, "text/plain; charset=utf-8", Bytes::from(text.into()))
    }

    fn respond(&self, status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ResponseBody> {
        self.respond_with_trailers(status, content_type, body, None)
    }

    /// A gRPC answer, always HTTP 200: status 0 sends the echo as one length-prefixed message
    /// and `grpc-status: 0` in trailers; any other is a trailers-only answer (the status in
    /// the headers, no body), as a gRPC server fails a call.
    fn grpc(&self, code: u8, echo: &EchoBody) -> Response<ResponseBody> {
        if code != 0 {
            return self.grpc_failure(code);
        }
        let json = serde_json::to_vec(echo).expect("the echo body always serializes");
        let mut message = Vec::with_capacity(5 + json.len());
        message.push(0); // not compressed
        message.extend_from_slice(&(json.len() as u32).to_be_bytes());
        message.extend_from_slice(&json);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(0u16));
        self.respond_with_trailers(StatusCode::OK, "application/grpc", Bytes::from(message), Some(trailers))
    }

    /// A trailers-only failure: HTTP 200, the status in the headers, no body.
    fn grpc_failure(&self, code: u8) -> Response<ResponseBody> {
        let mut response = self.respond(StatusCode::OK, "application/grpc", Bytes::new());
        response.headers_mut().insert("grpc-status", HeaderValue::from(u16::from(code)));
        response
            .headers_mut()
            .insert("grpc-message", HeaderValue::from_static("warren-echo failed the call as asked"));
        response
    }

    fn respond_with_trailers(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Response<ResponseBody> {
        let body = match trailers {
            None => Either::Left(Full::new(body)),
            Some(trailers) => {
                Either::Right(Full::new(body).with_trailers(std::future::ready(Some(Ok(trailers)))))
            }
        };
        let mut response = Response::new(Either::Left(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert("x-echo-pod", self.identity.pod.clone());
        headers.insert("x-echo-namespace", self.identity.namespace.clone());
        headers.insert("x-echo-version", self.identity.version.clone());
        response
    }
}

/// A gRPC call: `content-type: application/grpc` or `application/grpc+FORMAT`.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct.strip_prefix("application/grpc").is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
    })
}

/// GET `url` (HTTP/1.1, `http://ip:port/path`), forwarding the trace headers of `incoming`.
async fn call(url: &str, incoming: &HeaderMap) -> CallResult {
    let failed =
        |error: String| CallResult { url: url.to_string(), status: None, body: String::new(), error };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return failed("not a URL".into());
    };
    let (Some(host), Some("http")) = (uri.host(), uri.scheme_str()) else {
        return failed("only http://ip:port/path URLs".into());
    };
    let Ok(ip) = host.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>() else {
        return failed("the host must be an IP address".into());
    };
    let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = uri.path_and_query().map_or("/", |p| p.as_str()).parse().unwrap_or_default();
    if let Ok(v) = HeaderValue::from_str(&addr.to_string()) {
        request.headers_mut().insert(HOST, v);
    }
    for name in TRACE_HEADERS {
        for value in incoming.get_all(name) {
            request.headers_mut().append(name, value.clone());
        }
    }
    let exchange = async {
        let mut connection =
            crate::load::client::Connection::open(addr, false).await.map_err(|e| e.to_string())?;
        connection.send(request).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(response)) => CallResult {
            url: url.to_string(),
            status: Some(response.status().as_u16()),
            body: String::from_utf8_lossy(response.body()).into_owned(),
            error: String::new(),
        },
        Ok(Err(e)) => failed(e),
        Err(_) => failed("timed out after 10 s".into()),
    }
}

/// Reads the whole body frame by frame, counting bytes without buffering them.
async fn drain<B>(body: B) -> Result<u64, B::Error>
where
    B: hyper::body::Body,
{
    let mut body = std::pin::pin!(body);
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += bytes::Buf::remaining(&data) as u64;
        }
    }
    Ok(total)
}

pub fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn headers_json(headers: &HeaderMap) -> BTreeMap<String, HeaderValues> {
    let mut out = BTreeMap::new();
    for name in headers.keys() {
        let mut values: Vec<String> = headers.get_all(name).iter().map(lossy).collect();
        let entry =
            if values.len() == 1 { HeaderValues::One(values.remove(0)) } else { HeaderValues::Many(values) };
        out.insert(name.as_str().to_string(), entry);
    }
    out
}

/// Header values may hold any byte; the echo shows non-UTF-8 ones with replacement characters.
fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use hyper::body::Body as _;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    #[test]
    fn no_override_headers() {
        assert_eq!(Overrides::from_headers(&headers(&[("accept", "*/*")])), Ok(Overrides::default()));
    }

    #[test]
    fn good_overrides() {
        let o = Overrides::from_headers(&headers(&[(STATUS_HEADER, "418"), (DELAY_HEADER, "250")])).unwrap();
        assert_eq!(o.status, Some(StatusCode::IM_A_TEAPOT));
        assert_eq!(o.delay, Some(Duration::from_millis(250)));
        let o = Overrides::from_headers(&headers(&[(DELAY_HEADER, "60000")])).unwrap();
        assert_eq!(o.delay, Some(Duration::from_secs(60)));
    }

    #[test]
    fn bad_overrides_name_the_header() {
        let cases: &[(&str, &str)] = &[
            (STATUS_HEADER, "abc"),
            (STATUS_HEADER, "99"),
            (STATUS_HEADER, "600"),
            (STATUS_HEADER, "+200"),
            (STATUS_HEADER, ""),
            (STATUS_HEADER, "99999999999999999999999"),
            (DELAY_HEADER, "-1"),
            (DELAY_HEADER, "1.5"),
            (DELAY_HEADER, "60001"),
        ];
        for (name, value) in cases {
            let err = Overrides::from_headers(&headers(&[(name, value)])).unwrap_err();
            assert!(err.starts_with(name), "{name}: {value:?} gave {err:?}");
        }
        let twice = headers(&[(STATUS_HEADER, "200"), (STATUS_HEADER, "500")]);
        assert!(Overrides::from_headers(&twice).unwrap_err().starts_with(STATUS_HEADER));
    }

    #[test]
    fn repeated_headers_become_lists() {
        let json = headers_json(&headers(&[("a", "1"), ("b", "2"), ("a", "3")]));
        assert_eq!(json["a"], HeaderValues::Many(vec!["1".into(), "3".into()]));
        assert_eq!(json["b"], HeaderValues::One("2".into()));
        assert_eq!(serde_json::to_string(&json).unwrap(), r#"{"a":["1","3"],"b":"2"}"#);
    }

    fn handler() -> Handler {
        Handler {
            identity: Identity {
                pod: HeaderValue::from_static("echo-0"),
                namespace: HeaderValue::from_static("default"),
                version: HeaderValue::from_static("v1"),
            },
            fail_fraction: crate::echo::schedule::FailFraction::ZERO,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            fail_grpc_status: 14,
            delay: Duration::ZERO,
            counter: AtomicU64::new(0),
            stats: Default::default(),
        }
    }

    /// hyper ends an HTTP/2 stream on the last DATA frame only if the body says it has ended
    /// once that frame is taken; otherwise it sends an empty DATA frame after it.
    #[tokio::test]
    async fn an_answer_ends_with_its_data_and_a_grpc_answer_after_its_trailers() {
        let request = || Request::get("/x").body(Full::new(Bytes::new())).unwrap();
        let peer: SocketAddr = "10.0.0.1:1234".parse().unwrap();
        let mut body = handler().handle(request(), peer).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        assert!(body.is_end_stream(), "a plain answer has ended once its data is taken");

        let grpc = Request::post("/echo.Echo/Call")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut body = handler().handle(grpc, peer).await.unwrap().into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(!body.is_end_stream(), "the trailers are still to come");
        let trailers = body.frame().await.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(trailers["grpc-status"], "0");
    }
}
