//! One HTTP request through the waypoint, top to bottom: L7 policy, route selection, fault
//! injection, redirect / direct response, the destination and its subset, mirrors, then the
//! upstream attempts (retries bounded by the route timeout), and the response's header
//! operations. Every request ends in one access-log line, one metrics sample and (sampled) one
//! span, written when its response has ended ([`crate::record`]).

use std::{
    borrow::Cow,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header, uri,
    uri::{Authority, PathAndQuery},
};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Body;
use tracing::{debug, warn};
use warren_core::{
    identity::SpiffeId,
    l7::RouteDestination,
    model::{Service, Workload},
};

use crate::{
    authz::{self, RequestAttributes},
    body::{self, Received, RequestBody, RequestSize, StreamedBody},
    deadline,
    grpc::{grpc_local_reply, grpc_status, grpc_timeout, is_grpc},
    hashing::{self, HashInput},
    headers::{WrittenValues, add_forwarding, apply, strip_hop_by_hop},
    idle::Busy,
    metrics::{Interned, RequestLabels, ServiceLabels, Side},
    record::{self, RequestRecord, ResponseCounter},
    retry::{self, Attempt, RetryPolicy},
    routing::{RequestFacts, rewrite_path},
    state::{Snapshot, WaypointState},
    trace::TraceContext,
    upgrade,
    upstream::{BoxError, Cluster, Protocol, Target, UpstreamError},
};

/// A response's body: written here (`Left`), or streamed from the upstream (`Right`). An enum
/// rather than a box: one allocation less per request.
pub type ResponseBody = Either<Full<Bytes>, crate::upstream::UpstreamBody>;

/// The CONNECT stream a request arrived on.
pub struct Downstream {
    pub service: Arc<Service>,
    /// The service's metric labels, its FQDN among them (built once per stream).
    pub service_labels: Interned<ServiceLabels>,
    /// The source's metric labels when the client is not a known workload: the HBONE peer's.
    pub peer_side: Interned<Side>,
    /// The service port the client dialed (the CONNECT authority's port).
    pub port: u16,
    pub peer_identity: SpiffeId,
    /// The original client (`forwarded: for=`), else the HBONE peer.
    pub client: SocketAddr,
    /// `client` as text, written once per stream for the access log.
    pub client_text: Box<str>,
    /// `client`'s address as a header value (`x-forwarded-for`), made once per stream.
    pub client_ip: HeaderValue,
    pub protocol: Protocol,
    /// Where a request goes that no route covers: the service itself (made once per stream).
    pub default_destination: RouteDestination,
}

/// What the access log and metrics say about a request, filled in on the way.
struct Outcome {
    flags: Vec<&'static str>,
    /// The route that matched (its description).
    route: Option<Arc<str>>,
    upstream: Option<Arc<Workload>>,
    /// The upstream cluster's name (Envoy's `outbound|port|subset|host`).
    upstream_cluster: Option<Arc<str>>,
    attempts: u32,
    detail: String,
    request_size: RequestSize,
    /// Whether the request is a gRPC call (told once, from its content type).
    grpc: bool,
    /// The gRPC status a fault abort names, for a gRPC call's answer.
    abort_grpc_status: Option<u8>,
}

impl Outcome {
    fn route(&self) -> &str {
        self.route.as_deref().unwrap_or("")
    }
}

fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// A client's request body, from hyper's HTTP/1.1 server or the waypoint's own HTTP/2 one.
pub trait ClientBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static> ClientBody for B {}

pub async fn handle<B: ClientBody>(
    state: Arc<WaypointState>,
    down: Arc<Downstream>,
    req: Request<B>,
    busy: Busy,
) -> Result<Response<ResponseCounter>, std::convert::Infallible> {
    let started = Instant::now();
    let snapshot = state.snapshot();
    let source = snapshot.index.by_ip(down.client.ip()).cloned();
    let trace = TraceContext::from_headers(req.headers(), state.config.tracing_sampling);
    let mut unanswered = Unanswered(Some(Exchange {
        started,
        span_start: std::time::SystemTime::now(),
        method: req.method().clone(),
        // Shared with the request (a count, not a copy), for the log line and the span.
        path: req.uri().path_and_query().cloned(),
        outcome: Outcome {
            flags: Vec::new(),
            route: None,
            upstream: None,
            upstream_cluster: None,
            attempts: 0,
            detail: String::new(),
            request_size: RequestSize::Known(0),
            grpc: is_grpc(req.headers()),
            abort_grpc_status: None,
        },
        state,
        snapshot,
        down,
        source,
        trace,
    }));
    let pending = unanswered.0.as_mut().expect("just made");
    let mut response = process(
        &pending.state,
        &pending.snapshot,
        &pending.down,
        pending.source.as_deref(),
        req,
        &pending.trace,
        &mut pending.outcome,
    )
    .await;
    let exchange = unanswered.0.take().expect("answered once");
    // An error the waypoint answers itself (an answer written here with a response flag other
    // than an injected delay's; a directResponse or a redirect has none) is a gRPC error to a
    // gRPC client, as Envoy's local replies are.
    let grpc = exchange.outcome.grpc;
    if grpc && matches!(response.body(), Either::Left(_)) && exchange.outcome.flags.iter().any(|f| *f != "DI")
    {
        response = grpc_local_reply(response, exchange.outcome.abort_grpc_status);
    }
    let status = response.status().as_u16();
    // A trailers-only answer's; a streamed one's comes in its trailers.
    let grpc_status = if grpc { grpc_status(response.headers()) } else { None };
    let record = exchange.into_record(status, grpc_status);
    Ok(response.map(|body| ResponseCounter::new(body, record, busy)))
}

/// A request on its way, with what its record will say.
struct Exchange {
    state: Arc<WaypointState>,
    snapshot: Arc<Snapshot>,
    down: Arc<Downstream>,
    /// The client, when it is a known workload.
    source: Option<Arc<Workload>>,
    started: Instant,
    span_start: std::time::SystemTime,
    method: Method,
    path: Option<PathAndQuery>,
    trace: TraceContext,
    outcome: Outcome,
}

impl Exchange {
    fn into_record(self, status: u16, grpc_status: Option<u8>) -> Box<RequestRecord> {
        let Exchange { state, snapshot, down, source, started, span_start, method, path, trace, outcome } =
            self;
        let side_of = |w: &Workload| {
            snapshot.metric_side(w, || state.metrics.side(Side::of(w, &state.config.trust_domain)))
        };
        let labels = RequestLabels {
            source: source.as_deref().map_or_else(|| down.peer_side.clone(), side_of),
            destination: outcome.upstream.as_deref().map_or_else(|| state.metrics.unknown_side(), side_of),
            service: down.service_labels.clone(),
            request_protocol: if outcome.grpc { "grpc" } else { "http" },
            response_code: status,
            grpc_response_status: grpc_status,
            // Written when the response ends, which may add a flag.
            response_flags: Cow::Borrowed("-"),
        };
        Box::new(RequestRecord {
            state,
            down,
            started,
            span_start,
            method,
            path,
            trace,
            labels,
            flags: outcome.flags,
            route: outcome.route,
            upstream_cluster: outcome.upstream_cluster,
            upstream: outcome.upstream,
            attempts: outcome.attempts,
            detail: outcome.detail,
            request: outcome.request_size,
        })
    }
}

/// A request not yet answered. If the client goes away first (it resets its HTTP/2 stream,
/// or closes its HTTP/1.1 connection), the request's future is dropped where it waits — its
/// upstream attempt with it — and this records it then, as Envoy does: response code 0, flag
/// `DC`. Otherwise such a request would be in no log line and no metric.
struct Unanswered(Option<Exchange>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(mut exchange) = self.0.take() else { return };
        let out = &mut exchange.outcome;
        out.flags.push("DC");
        out.detail = record::join(&out.detail, "the client went away before the response began");
        exchange.into_record(0, None).finish(0);
    }
}

async fn process<B: ClientBody>(
    state: &WaypointState,
    snapshot: &Snapshot,
    down: &Downstream,
    source: Option<&Workload>,
    req: Request<B>,
    trace: &TraceContext,
    out: &mut Outcome,
) -> Response<ResponseBody> {
    let (mut parts, body) = req.into_parts();
    let upgrade = upgrade::requested(down.protocol, &parts.headers, &mut parts.extensions);
    let (path, query) = (parts.uri.path(), parts.uri.query());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| down.service_labels.hostname.clone());

    // 1. L7 authorization.
    let attributes = RequestAttributes {
        source_identity: Some(&down.peer_identity),
        source_ip: down.client.ip(),
        method: parts.method.as_str(),
        path,
        host: &authority,
        port: down.port,
        headers: &parts.headers,
    };
    let me = authz::Waypoint { namespace: &state.config.namespace, name: &state.config.name };
    let verdict = authz::authorize(&snapshot.config.routing.authorizations, &me, &down.service, &attributes);
    if !verdict.allowed() {
        out.flags.push("RBAC");
        out.detail = verdict.to_string();
        return text_response(StatusCode::FORBIDDEN, "RBAC: access denied");
    }

    // 2. Route selection.
    let host = &down.service_labels.hostname;
    let facts = RequestFacts {
        method: parts.method.as_str(),
        path,
        query,
        scheme: "http",
        authority: &authority,
        headers: &parts.headers,
        port: down.port,
        source,
    };
    let selected = snapshot.routes.select(host, &facts);
    let (route, matched) = match selected {
        Some((route, matched)) => (Some(route), matched),
        None if snapshot.routes.has_routes(host) => {
            out.flags.push("NR");
            out.detail = format!("no route of the VirtualServices for {host} matched");
            return text_response(StatusCode::NOT_FOUND, "no route matched\n");
        }
        None => (None, None),
    };
    if let Some(r) = &route {
        out.route = Some(r.description.clone());
    }
    let http_route = route.as_ref().map(|r| &r.route);

    // 3. Fault injection: delay, then abort.
    if let Some(fault) = http_route.and_then(|r| r.fault.as_ref()) {
        if let Some(delay) = &fault.delay
            && roll(delay.percentage)
        {
            out.flags.push("DI");
            tokio::time::sleep(Duration::from_millis(delay.fixed_delay_ms)).await;
        }
        if let Some(abort) = &fault.abort
            && roll(abort.percentage)
        {
            out.flags.push("FI");
            out.abort_grpc_status = abort.grpc_status;
            let status = StatusCode::from_u16(abort.http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return text_response(status, "fault filter abort");
        }
    }

    // 4. Answers the waypoint gives itself.
    if let Some(direct) = http_route.and_then(|r| r.direct_response.as_ref()) {
        let status = StatusCode::from_u16(direct.status).unwrap_or(StatusCode::OK);
        return text_response(status, direct.body.clone().unwrap_or_default());
    }
    if let Some(redirect) = http_route.and_then(|r| r.redirect.as_ref()) {
        let prefix = matched.and_then(|m| m.uri.as_ref()).and_then(|m| m.prefix());
        let target_path = match (&redirect.uri, &redirect.uri_prefix, prefix) {
            // Istio's `redirect.uri` replaces the whole path.
            (Some(uri), _, _) => uri.clone(),
            // HTTPRoute's ReplacePrefixMatch keeps what follows the matched prefix.
            (None, Some(new_prefix), Some(p)) if path.starts_with(p) => {
                format!("{}/{}", new_prefix.trim_end_matches('/'), path[p.len()..].trim_start_matches('/'))
                    .replace("//", "/")
            }
            _ => path.to_string(),
        };
        let host_only = authority.split(':').next().unwrap_or(&authority).to_string();
        let new_authority = match (&redirect.authority, redirect.port) {
            (Some(a), Some(p)) => format!("{a}:{p}"),
            (Some(a), None) => a.clone(),
            (None, Some(p)) => format!("{host_only}:{p}"),
            (None, None) => authority.clone(),
        };
        let scheme = redirect.scheme.as_deref().unwrap_or("http");
        let location = format!("{scheme}://{new_authority}{target_path}");
        let status = StatusCode::from_u16(redirect.redirect_code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
        let mut response = text_response(status, Bytes::new());
        if let Ok(v) = HeaderValue::from_str(&location) {
            response.headers_mut().insert(header::LOCATION, v);
        }
        return response;
    }

    // 5. The destination: service, subset, endpoints.
    let destination: &RouteDestination = match route.map(|r| &**r) {
        Some(r) => match r.pick(fastrand::f64()) {
            Some(d) => d,
            None => {
                out.flags.push("NR");
                out.detail = format!("{} has no destination", r.description);
                return text_response(StatusCode::SERVICE_UNAVAILABLE, "no route destination\n");
            }
        },
        None => &down.default_destination,
    };
    let d = &destination.destination;
    let Some(dest_service) = snapshot.services_by_host.get(&d.host).cloned() else {
        out.flags.push("NR");
        out.detail = format!("{} routes to {}, which is not a known service", out.route(), d.host);
        warn!(route = out.route(), host = d.host, "route to an unknown host: answering 503 NR");
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "no route: unknown destination host\n");
    };
    // The service is known, so no endpoint list means a subset no DestinationRule defines.
    let Some(endpoints) = snapshot.endpoints(&d.host, d.subset.as_deref()) else {
        let name = d.subset.as_deref().unwrap_or_default();
        out.flags.push("NR");
        out.detail =
            format!("{} names subset {name:?} of {}, which no DestinationRule defines", out.route(), d.host);
        warn!(
            route = out.route(),
            host = d.host,
            subset = name,
            "route to an undefined subset: answering 503 NR"
        );
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "no route: undefined subset\n");
    };
    let rule = snapshot.destination_rules.get(&d.host);
    let port = d.port.unwrap_or(down.port);
    let cluster = state.clusters.get(&d.host, d.subset.as_deref(), port);
    out.upstream_cluster = Some(cluster.name.clone());
    if endpoints.is_empty() {
        out.flags.push("UH");
        out.detail = format!("{} has no endpoints ({})", cluster.name, out.route());
        warn!(cluster = &*cluster.name, route = out.route(), "no healthy upstream: answering 503 UH");
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
    }
    let target_port = dest_service.target_port(port).unwrap_or(port);
    let policy = rule.map(|r| r.policy_for(d.subset.as_deref(), port)).unwrap_or_default();

    // 6. The request upstream: path rewrite, authority, headers; the body buffered so that
    // retries and mirrors can send it again.
    let path_and_query =
        match (route.and_then(|r| rewrite_path(r, matched, path)), parts.uri.path_and_query()) {
            // Not rewritten: the request's own, shared rather than copied and parsed again.
            (None, Some(original)) => original.clone(),
            (None, None) => PathAndQuery::from_static("/"),
            (Some(new_path), _) => {
                let text = match query {
                    Some(q) => format!("{new_path}?{q}"),
                    None => new_path,
                };
                PathAndQuery::try_from(text).unwrap_or_else(|_| PathAndQuery::from_static("/"))
            }
        };
    let upstream_authority =
        http_route.and_then(|r| r.rewrite.as_ref()).and_then(|r| r.authority.clone()).unwrap_or(authority);
    // The routing decisions are made: the headers move into the upstream request.
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if let Some(upgrade) = &upgrade {
        upgrade.restore(&mut headers);
    }
    if let Some(r) = http_route {
        apply(&r.headers.request, &mut headers);
    }
    apply(&destination.headers.request, &mut headers);
    let mut values = WrittenValues::new();
    add_forwarding(&mut headers, &down.client_ip, &mut values);
    trace.inject(&mut headers, &mut values);
    let body = match body::receive(body, state.config.request_buffer_bytes).await {
        Ok(Received::Whole(bytes)) => {
            out.request_size = RequestSize::Known(bytes.len() as u64);
            RequestSource::Whole(bytes)
        }
        Ok(Received::Streamed(streamed)) => {
            out.request_size = streamed.size();
            RequestSource::Streamed(streamed)
        }
        Err(e) => {
            out.flags.push("DC");
            out.detail = format!("the client's request body broke off: {e}");
            return text_response(StatusCode::BAD_REQUEST, "request body broken\n");
        }
    };
    let upstream_request = UpstreamRequest {
        method: parts.method.clone(),
        path_and_query,
        host: values.value(&[upstream_authority.as_bytes()]),
        uri_authority: uri_authority(down.protocol, &upstream_authority),
        authority: upstream_authority,
        headers,
        body,
        protocol: down.protocol,
    };

    // 7. Mirrors: copies sent on the side, responses discarded.
    for mirror in http_route.map(|r| r.mirrors.as_slice()).unwrap_or_default() {
        if roll(mirror.percentage) {
            spawn_mirror(state, snapshot, mirror, &upstream_request, down, port);
        }
    }

    // 8. Attempts.
    let pool = policy.connection_pool.as_ref();
    let in_flight = match cluster.admit(pool) {
        Ok(g) => g,
        Err(e) => {
            out.flags.push(e.flag());
            out.detail = e.to_string();
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: overflow",
            );
        }
    };
    let route_timeout = http_route.and_then(|r| r.timeout_ms).map(Duration::from_millis);
    // A gRPC call's own deadline bounds it as well, capped by the route's `timeout`: Istio
    // sets Envoy's `max_grpc_timeout` to the route's timeout (none: no cap).
    let timeout = match out.grpc.then(|| grpc_timeout(&upstream_request.headers)).flatten() {
        Some(deadline) => Some(route_timeout.map_or(deadline, |route| route.min(deadline))),
        None => route_timeout,
    };
    let made_cookie = hashing::make_cookie(policy.load_balancer.as_ref(), &upstream_request.headers);
    // A service that no route covers gets Istio's default policy, as its default route would.
    let retries = route.as_ref().map_or(&*retry::ISTIO_DEFAULT, |r| &r.retries);
    let attempt = Attempts {
        state,
        cluster: &cluster,
        endpoints: &endpoints,
        policy: &policy,
        request: &upstream_request,
        down,
        target_port,
        retries,
        grpc: out.grpc,
        made_cookie: made_cookie.as_ref(),
    };
    // The timeout counts from the end of the client's request, as Envoy's does: a whole body
    // is here, a streamed one may still be arriving (an upload, a client-streaming call).
    // (The clock is read, and a streamed body watched, only for a route that has one.)
    let routed_at = timeout.map(|_| tokio::time::Instant::now());
    let request_end = timeout.and_then(|_| upstream_request.body.end());
    let run = deadline::within_after(timeout, request_end, attempt.run(out));
    let result = run.await.unwrap_or(Err(UpstreamError::Timeout));
    match result {
        Ok(mut response) => {
            response.body_mut().hold(in_flight);
            // And it bounds the response to its end.
            if let (Some(limit), Some(routed_at)) = (timeout, routed_at) {
                let timer = match upstream_request.body.ended_at(routed_at) {
                    Some(ended_at) => deadline::Timer::until(ended_at + limit),
                    None => deadline::Timer::after(Some(limit), upstream_request.body.end()),
                };
                response.body_mut().end_by(timer);
            }
            if let Some(upgrade) = upgrade {
                let relay = upgrade::Relay {
                    client: down.client_text.clone(),
                    service: down.service_labels.hostname.clone(),
                    upstream: out.upstream.as_ref().map(|w| w.display_name()).unwrap_or_default(),
                };
                upgrade.relay_if_switched(&mut response, state, relay);
            }
            if let Some(r) = http_route {
                apply(&r.headers.response, response.headers_mut());
            }
            apply(&destination.headers.response, response.headers_mut());
            if let Some(cookie) = made_cookie {
                response.headers_mut().append(header::SET_COOKIE, cookie.set_cookie);
            }
            response.map(Either::Right)
        }
        Err(e) => {
            if !out.flags.contains(&e.flag()) {
                out.flags.push(e.flag());
            }
            out.detail = e.to_string();
            if let RequestSource::Streamed(streamed) = &upstream_request.body
                && let Some(reason) = streamed.failure()
            {
                // The client broke off its own request: not the upstream's fault.
                out.flags.push("DC");
                out.detail = format!("the client's request body broke off: {reason} ({})", out.detail);
            }
            let status = match e {
                UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let body = match e {
                UpstreamError::Timeout => "upstream request timeout".to_string(),
                other => format!(
                    "upstream connect error or disconnect/reset before headers. reset reason: {other}"
                ),
            };
            text_response(status, body)
        }
    }
}

/// A request ready to send (again): everything the attempts and mirrors need.
struct UpstreamRequest {
    method: Method,
    path_and_query: PathAndQuery,
    authority: String,
    /// `authority` as HTTP/1.1's `Host` header (made once, not per attempt).
    host: Option<HeaderValue>,
    /// `authority` as HTTP/2's `:authority` (parsed once, not per attempt).
    uri_authority: Option<Authority>,
    headers: HeaderMap,
    body: RequestSource,
    protocol: Protocol,
}

/// A request's body as its attempts and mirrors get it.
enum RequestSource {
    Whole(Bytes),
    Streamed(StreamedBody),
}

impl RequestSource {
    fn body(&self) -> RequestBody {
        match self {
            RequestSource::Whole(bytes) => RequestBody::whole(bytes.clone()),
            RequestSource::Streamed(streamed) => RequestBody::Streamed(streamed.reader()),
        }
    }

    /// Completes when the client's body has ended; none for a whole body (all here when the
    /// request was routed).
    fn end(&self) -> Option<deadline::Start> {
        match self {
            RequestSource::Whole(_) => None,
            RequestSource::Streamed(streamed) => Some(streamed.ended()),
        }
    }

    /// When the client's body ended (`routed_at` for a whole one), if it has.
    fn ended_at(&self, routed_at: tokio::time::Instant) -> Option<tokio::time::Instant> {
        match self {
            RequestSource::Whole(_) => Some(routed_at),
            RequestSource::Streamed(streamed) => streamed.ended_at(),
        }
    }

    /// Whether another attempt can send the body from its start.
    fn replayable(&self) -> bool {
        match self {
            RequestSource::Whole(_) => true,
            RequestSource::Streamed(streamed) => streamed.replayable(),
        }
    }
}

/// HTTP/2's `:authority` for `authority`; HTTP/1.1 sends a `Host` header instead.
fn uri_authority(protocol: Protocol, authority: &str) -> Option<Authority> {
    (protocol == Protocol::Http2).then(|| Authority::try_from(authority).ok()).flatten()
}

impl UpstreamRequest {
    fn build(&self) -> Request<RequestBody> {
        self.build_for(self.uri_authority.clone(), self.host.clone(), self.body.body())
    }

    /// The request as sent to `authority` (`host`: the same as an HTTP/1.1 header).
    fn build_for(
        &self,
        authority: Option<Authority>,
        host: Option<HeaderValue>,
        body: RequestBody,
    ) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.headers_mut() = self.headers.clone();
        match self.protocol {
            Protocol::Http1 => {
                *req.version_mut() = Version::HTTP_11;
                *req.uri_mut() = Uri::from(self.path_and_query.clone());
                if let Some(host) = host {
                    req.headers_mut().insert(header::HOST, host);
                }
            }
            Protocol::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                let mut uri = uri::Parts::default();
                uri.scheme = Some(uri::Scheme::HTTP);
                uri.authority = authority;
                uri.path_and_query = Some(self.path_and_query.clone());
                // Without an authority (a rewrite to one that does not parse) the path goes alone.
                *req.uri_mut() =
                    Uri::from_parts(uri).unwrap_or_else(|_| Uri::from(self.path_and_query.clone()));
                req.headers_mut().remove(header::HOST);
            }
        }
        req
    }
}

struct Attempts<'a> {
    state: &'a WaypointState,
    cluster: &'a Arc<Cluster>,
    endpoints: &'a [Arc<Workload>],
    policy: &'a warren_core::l7::TrafficPolicy,
    request: &'a UpstreamRequest,
    down: &'a Downstream,
    target_port: u16,
    retries: &'a RetryPolicy,
    grpc: bool,
    /// A sticky-session cookie made for this request, which had none.
    made_cookie: Option<&'a hashing::MadeCookie>,
}

impl Attempts<'_> {
    /// The first try and up to `retries.attempts` more, each with its own timeout, on another
    /// endpoint when there is one.
    async fn run(&self, out: &mut Outcome) -> Result<Response<crate::upstream::UpstreamBody>, UpstreamError> {
        let pool = self.policy.connection_pool.as_ref();
        let outlier = self.policy.outlier_detection.as_ref();
        let per_try = self.retries.per_try_timeout;
        let hash = HashInput {
            headers: &self.request.headers,
            source_ip: self.down.client.ip(),
            query: self.request.path_and_query.query(),
            made_cookie: self.made_cookie.map(|c| c.value.as_str()),
        };
        let mut tried: Vec<String> = Vec::new();
        let mut _retry_guard = None;
        loop {
            let Some(endpoint) =
                self.cluster.pick(self.endpoints, self.policy.load_balancer.as_ref(), outlier, &hash, &tried)
            else {
                out.flags.push("UH");
                return Err(UpstreamError::Connect("no healthy upstream (all endpoints ejected)".into()));
            };
            out.attempts += 1;
            out.upstream = Some(endpoint.clone());
            let ip = endpoint.ip_like(self.down.client.ip()).expect("endpoints have addresses");
            let target = Target {
                endpoint: &endpoint,
                addr: SocketAddr::new(ip, self.target_port),
                trust_domain: &self.state.config.trust_domain,
                protocol: self.request.protocol,
                forwarded_for: self.down.client,
                traceparent: self
                    .request
                    .headers
                    .get(&warren_core::hbone::TRACEPARENT)
                    .and_then(|v| v.to_str().ok()),
            };
            let send = self.state.clusters.send(self.cluster, &target, pool, self.request.build());
            // From the end of the client's request too (a retry's body has ended already).
            let request_end = per_try.and_then(|_| self.request.body.end());
            let send = deadline::within_after(per_try, request_end, send);
            let result = send.await.unwrap_or(Err(UpstreamError::Timeout));
            let attempt = match &result {
                Ok(response) => Attempt::Response {
                    status: response.status().as_u16(),
                    // Only a gRPC call's answer is read for one (no header lookup otherwise).
                    grpc_status: if self.grpc { grpc_status(response.headers()) } else { None },
                },
                Err(e) => Attempt::Failed(e),
            };
            let status = match attempt {
                Attempt::Response { status, .. } => Ok(status),
                Attempt::Failed(e) => Err(e),
            };
            self.cluster.record(&endpoint.uid, status, outlier, self.endpoints.len());
            let retriable = self.retries.retriable(&attempt);
            // A streamed body past the retry buffer cannot be sent again.
            let budget_left = out.attempts <= self.retries.attempts && self.request.body.replayable();
            if !retriable || !budget_left {
                if retriable && out.attempts > 1 {
                    out.flags.push("URX");
                }
                return result;
            }
            let Some(guard) = self.cluster.admit_retry(pool) else {
                return result;
            };
            _retry_guard = Some(guard);
            // Remembered only for a retry (most requests take one attempt and allocate none).
            tried.push(endpoint.uid.clone());
            // Envoy's backoff: 25 ms base, doubling, jittered.
            let base = 25u64 << (out.attempts - 1).min(5);
            tokio::time::sleep(Duration::from_millis(fastrand::u64(base / 2..=base))).await;
        }
    }
}

fn roll(percentage: f64) -> bool {
    percentage >= 100.0 || fastrand::f64() * 100.0 < percentage
}

/// Sends a copy to the mirror's destination, authority suffixed `-shadow` as Envoy does; the
/// main request never waits for it.
fn spawn_mirror(
    state: &WaypointState,
    snapshot: &Snapshot,
    mirror: &warren_core::l7::Mirror,
    request: &UpstreamRequest,
    down: &Downstream,
    port: u16,
) {
    let d = &mirror.destination;
    let Some(service) = snapshot.services_by_host.get(&d.host).cloned() else {
        warn!(host = d.host, "mirror to an unknown host skipped");
        return;
    };
    // A subset no DestinationRule defines: nothing to send to (the controller reports it).
    let Some(endpoints) = snapshot.endpoints(&d.host, d.subset.as_deref()) else { return };
    let port = d.port.unwrap_or(port);
    let cluster = state.clusters.get(&d.host, d.subset.as_deref(), port);
    let hash =
        HashInput { headers: &request.headers, source_ip: down.client.ip(), query: None, made_cookie: None };
    let Some(endpoint) = cluster.pick(&endpoints, None, None, &hash, &[]) else {
        return;
    };
    let Some(ip) = endpoint.ip_like(down.client.ip()) else { return };
    let addr = SocketAddr::new(ip, service.target_port(port).unwrap_or(port));
    let host_only = request.authority.split(':').next().unwrap_or(&request.authority);
    let shadow = format!("{host_only}-shadow");
    let (whole, streamed) = match &request.body {
        RequestSource::Whole(bytes) => (bytes.clone(), None),
        RequestSource::Streamed(streamed) => (Bytes::new(), Some(streamed.mirror())),
    };
    let built = request.build_for(
        uri_authority(request.protocol, &shadow),
        HeaderValue::from_str(&shadow).ok(),
        RequestBody::whole(whole),
    );
    let state = state.self_arc();
    let (client, protocol, trust_domain) = (down.client, request.protocol, state.config.trust_domain.clone());
    tokio::spawn(async move {
        let target = Target {
            endpoint: &endpoint,
            addr,
            trust_domain: &trust_domain,
            protocol,
            forwarded_for: client,
            traceparent: None,
        };
        let copy = async {
            // A streamed body is copied once the client has sent all of it (the main request
            // never waits for the mirror); one longer than the retry buffer is not copied.
            let built = match streamed {
                None => built,
                Some(mirror) => match mirror.whole().await {
                    Some(body) => built.map(|_| RequestBody::whole(body)),
                    None => {
                        debug!(cluster = %cluster.key, "mirror skipped: the request body was not kept whole");
                        return None;
                    }
                },
            };
            Some(state.clusters.send(&cluster, &target, None, built).await)
        };
        match tokio::time::timeout(Duration::from_secs(30), copy).await {
            Ok(Some(Ok(response))) => {
                // Drain so the connection can be reused; the answer itself is discarded.
                let _ = response.into_body().collect().await;
            }
            Ok(Some(Err(e))) => warn!(cluster = %cluster.key, "mirror request failed: {e}"),
            Ok(None) => {}
            Err(_) => warn!(cluster = %cluster.key, "mirror request timed out"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of four arguments returns, without calling it.
    fn future_size<A, B, C, D, F: std::future::Future>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    fn upstream_request(protocol: Protocol, authority: &str) -> UpstreamRequest {
        UpstreamRequest {
            method: Method::POST,
            path_and_query: PathAndQuery::from_static("/pay?amount=3"),
            authority: authority.to_string(),
            host: HeaderValue::from_str(authority).ok(),
            uri_authority: uri_authority(protocol, authority),
            headers: HeaderMap::new(),
            body: RequestSource::Whole(Bytes::from_static(b"{}")),
            protocol,
        }
    }

    #[test]
    fn http2_requests_carry_the_authority_in_the_uri_and_http1_ones_in_host() {
        let h2 = upstream_request(Protocol::Http2, "payment.default:80").build();
        assert_eq!(h2.uri().to_string(), "http://payment.default:80/pay?amount=3");
        assert_eq!(h2.version(), Version::HTTP_2);
        assert!(h2.headers().get(header::HOST).is_none());

        let h1 = upstream_request(Protocol::Http1, "payment.default:80").build();
        assert_eq!(h1.uri().to_string(), "/pay?amount=3");
        assert_eq!(h1.headers()[header::HOST], "payment.default:80");

        // An authority that does not parse (a bad rewrite) still leaves the path.
        let bad = upstream_request(Protocol::Http2, "bad authority").build();
        assert_eq!(bad.uri().to_string(), "/pay?amount=3");
    }

    #[test]
    fn a_request_future_stays_small() {
        // Each request's future goes into a task of its own (HTTP/2) or a slot of hyper's
        // connection (HTTP/1.1): every byte of it is copied per request. It was 13 KB in a
        // release build before timeouts stopped duplicating what they wrap and the dial was
        // boxed; unoptimised builds lay futures out larger still.
        // Here (unoptimised) it measured 13,112 bytes before and 4,016 after.
        for (size, body) in [
            (future_size(handle::<hyper::body::Incoming>), "HTTP/1.1"),
            (future_size(handle::<crate::h2_server::RequestBody>), "HTTP/2"),
        ] {
            assert!(
                size <= 6_000,
                "forward::handle's future ({body}) is {size} bytes: box what made it grow"
            );
        }
    }
}
