//! Upstream clusters: one per (service host, subset, port), as Envoy has them. A cluster picks
//! endpoints (load balancing, outlier ejection), enforces its DestinationRule connection pool
//! (overflow: 503 `UO`), and keeps HTTP connections to its endpoints, each carried over an
//! HBONE stream (or plain TCP to an endpoint outside the mesh).

use std::{
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Either;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;
use warren_core::{
    FastMap,
    hbone::ConnectRequest,
    l7::{ConnectionPool, LoadBalancer, OutlierDetection, SimpleLb},
    model::Workload,
};

use crate::{
    body::RequestBody,
    deadline::{self, Timer},
    dialing::{Dials, Opening, Turn},
    h2_client::{self, H2Body, H2SendError, H2Sender, SettingsKnown, StreamClaim},
    hashing::{HashInput, hash_value},
    hbone::HboneClient,
};

/// A body error from either protocol's upstream client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream attempt failed, with Envoy's response flag.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream connect failure: {0}")]
    Connect(String),
    #[error("upstream reset: {0}")]
    Reset(String),
    /// The upstream declined the request without processing it (HTTP/2 REFUSED_STREAM).
    #[error("upstream refused the stream: {0}")]
    Refused(String),
    #[error("upstream request timeout")]
    Timeout,
    #[error("upstream overflow: the DestinationRule's connection pool is full")]
    Overflow,
}

impl UpstreamError {
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "UF",
            UpstreamError::Reset(_) | UpstreamError::Refused(_) => "UR",
            UpstreamError::Timeout => "UT",
            UpstreamError::Overflow => "UO",
        }
    }
}

/// Where a pooled connection goes, and in which protocol.
pub type DialKey = (SocketAddr, Protocol);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    /// As the access log names it (the variant's name).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "Http1",
            Protocol::Http2 => "Http2",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub host: String,
    pub subset: Option<String>,
    pub port: u16,
}

impl std::fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Envoy's cluster name: outbound|port|subset|host.
        write!(f, "outbound|{}|{}|{}", self.port, self.subset.as_deref().unwrap_or(""), self.host)
    }
}

/// What the cluster knows of its endpoints, by UID.
#[derive(Default)]
struct EndpointStates {
    by_uid: FastMap<String, EndpointState>,
    /// When the last ejection now in force ends: till then some endpoint may be ejected; after
    /// it none is, and a request skips looking at every endpoint's state.
    ejections_end: Option<Instant>,
}

impl EndpointStates {
    fn ejecting(&self, now: Instant) -> bool {
        self.ejections_end.is_some_and(|end| end > now)
    }
}

#[derive(Default)]
struct EndpointState {
    active: usize,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

enum Sender {
    Http1(http1::SendRequest<RequestBody>),
    Http2(H2Sender),
}

struct PooledConn {
    sender: Sender,
    /// Requests sent on the connection, this one included once it is sent.
    requests: u32,
    /// A handle to an HTTP/2 connection that stays in the pool (counted when handed out).
    shared: bool,
    /// The HTTP/2 stream a request on this handle holds; none in the pool's own entry.
    stream: Option<StreamClaim>,
    /// Counts the connection against `maxConnections` while any handle to it lives.
    slot: Arc<ConnectionSlot>,
    /// When it last went back to the pool (HTTP/1.1; an HTTP/2 one's sender knows when its
    /// last stream ended); tokio's clock, which tests can advance.
    last_used: tokio::time::Instant,
    /// `connectionPool.http.idleTimeout` when it was pooled; none: never closed for idling.
    idle_timeout: Option<Duration>,
}

impl PooledConn {
    /// A handle to this HTTP/2 connection for one more request, holding a stream of it
    /// (counted against `maxRequestsPerConnection`); none for HTTP/1.1.
    fn share(&mut self) -> Option<PooledConn> {
        let Sender::Http2(s) = &self.sender else { return None };
        self.requests += 1;
        Some(PooledConn {
            sender: Sender::Http2(s.clone()),
            requests: self.requests,
            shared: true,
            stream: Some(s.claim_stream()),
            slot: self.slot.clone(),
            last_used: self.last_used,
            idle_timeout: self.idle_timeout,
        })
    }

    fn has_free_stream(&self, limit: Option<u32>) -> bool {
        matches!(&self.sender, Sender::Http2(s) if s.has_free_stream(limit))
    }
}

/// Istio's `connectionPool.http.idleTimeout` when a rule sets none.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

fn idle_timeout(pool: Option<&ConnectionPool>) -> Option<Duration> {
    match pool.and_then(|p| p.idle_timeout_ms) {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
    }
}

impl PooledConn {
    fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// Counts an open upstream connection against `tcp.maxConnections` until it is dropped.
struct ConnectionSlot(Arc<Cluster>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_waiters();
    }
}

pub struct Cluster {
    pub key: ClusterKey,
    /// `key` as Envoy names clusters (written once, for every request's log line).
    pub name: Arc<str>,
    rr: AtomicUsize,
    endpoints: Mutex<EndpointStates>,
    in_flight: AtomicUsize,
    retries_in_flight: AtomicUsize,
    connections: AtomicUsize,
    pending: AtomicUsize,
    /// Pooled connections hold their cluster (through their slot), so a cluster the map has
    /// let go of must empty its pool itself and take no connection back.
    idle: Mutex<FastMap<(SocketAddr, Protocol), Vec<PooledConn>>>,
    /// Set, under the `idle` lock, once the cluster's service is gone from the config.
    forgotten: AtomicBool,
    released: tokio::sync::Notify,
    /// HTTP/2 connections being opened, which requests wait for rather than each opening one.
    dials: Dials<PooledConn>,
}

impl Cluster {
    fn new(key: ClusterKey) -> Self {
        Self {
            name: key.to_string().into(),
            key,
            rr: AtomicUsize::new(0),
            endpoints: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            retries_in_flight: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            idle: Mutex::new(FastMap::default()),
            forgotten: AtomicBool::new(false),
            released: tokio::sync::Notify::new(),
            dials: Dials::default(),
        }
    }

    /// Puts a connection (back) in the pool, unless the cluster has been forgotten: then it
    /// closes once its last request is done.
    fn pool(&self, key: (SocketAddr, Protocol), conn: PooledConn) {
        let mut idle = self.idle.lock().expect("poisoned");
        if !self.forgotten.load(Ordering::Acquire) {
            idle.entry(key).or_default().push(conn);
        }
    }

    /// Empties the pool for good (its service is gone): the connections close once no
    /// request uses them.
    fn forget(&self) {
        let mut idle = self.idle.lock().expect("poisoned");
        self.forgotten.store(true, Ordering::Release);
        idle.clear();
    }

    /// Closes pooled connections unused for their idle timeout: an HTTP/1.1 one counted from
    /// its return to the pool, an HTTP/2 one from the end of its last stream.
    fn close_idle(&self, now: tokio::time::Instant) {
        self.idle.lock().expect("poisoned").retain(|_, list| {
            list.retain(|c| {
                let unused_since = match &c.sender {
                    Sender::Http1(_) => Some(c.last_used),
                    Sender::Http2(s) => s.idle_since(),
                };
                let expired = unused_since
                    .zip(c.idle_timeout)
                    .is_some_and(|(since, limit)| now.saturating_duration_since(since) >= limit);
                !(expired && Arc::strong_count(&c.slot) == 1)
            });
            !list.is_empty()
        });
    }

    fn retire_idle(&self, still_there: &impl Fn(IpAddr) -> bool) {
        self.idle.lock().expect("poisoned").retain(|(addr, _), list| {
            list.retain(|c| !c.is_closed() && still_there(addr.ip()));
            !list.is_empty()
        });
    }

    /// Admits one request against `http.http2MaxRequests`; the guard releases it.
    pub fn admit(self: &Arc<Self>, pool: Option<&ConnectionPool>) -> Result<InFlight, UpstreamError> {
        let max = pool.and_then(|p| p.http2_max_requests).map_or(usize::MAX, |m| m as usize);
        self.in_flight
            .try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| UpstreamError::Overflow)?;
        Ok(InFlight(self.clone()))
    }

    /// Admits one retry against `http.maxRetries` (none when the budget is spent).
    pub fn admit_retry(self: &Arc<Self>, pool: Option<&ConnectionPool>) -> Option<RetryGuard> {
        let max = pool.and_then(|p| p.max_retries).map_or(usize::MAX, |m| m as usize);
        self.retries_in_flight
            .try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| RetryGuard(self.clone()))
    }

    /// Picks an endpoint: outlier-ejected ones left out (unless too few are healthy), and
    /// `avoid` (the previous tries) when another is available, as Istio's retry host predicate.
    pub fn pick(
        &self,
        endpoints: &[Arc<Workload>],
        lb: Option<&LoadBalancer>,
        outlier: Option<&OutlierDetection>,
        hash: &HashInput<'_>,
        avoid: &[String],
    ) -> Option<Arc<Workload>> {
        let now = Instant::now();
        let state = self.endpoints.lock().expect("poisoned");
        // The common case: nothing ejected and no earlier try to avoid. The endpoints as they
        // are, without a look at each one's state.
        if !state.ejecting(now) && (avoid.is_empty() || endpoints.len() < 2) {
            return self.choose(endpoints.len(), |i| &endpoints[i], lb, hash, &state);
        }
        let healthy: Vec<&Arc<Workload>> = endpoints
            .iter()
            .filter(|e| {
                state.by_uid.get(&e.uid).and_then(|s| s.ejected_until).is_none_or(|until| until <= now)
            })
            .collect();
        let min_health = outlier.map_or(0, |o| o.min_health_percent) as usize;
        let mut candidates: Vec<&Arc<Workload>> =
            if !endpoints.is_empty() && healthy.len() * 100 < min_health * endpoints.len() {
                // Too few healthy endpoints: ejection is suspended (Envoy's panic mode).
                endpoints.iter().collect()
            } else {
                healthy
            };
        if candidates.len() > 1 && !avoid.is_empty() {
            let fresh: Vec<_> = candidates.iter().copied().filter(|e| !avoid.contains(&e.uid)).collect();
            if !fresh.is_empty() {
                candidates = fresh;
            }
        }
        self.choose(candidates.len(), |i| candidates[i], lb, hash, &state)
    }

    /// One of `n` candidates (`at(i)`) by the load balancer.
    fn choose<'e>(
        &self,
        n: usize,
        at: impl Fn(usize) -> &'e Arc<Workload>,
        lb: Option<&LoadBalancer>,
        hash: &HashInput<'_>,
        state: &EndpointStates,
    ) -> Option<Arc<Workload>> {
        if n == 0 {
            return None;
        }
        let active = |e: &Workload| state.by_uid.get(&e.uid).map_or(0, |s| s.active);
        let chosen = match lb {
            None | Some(LoadBalancer::Simple(SimpleLb::RoundRobin)) => {
                at(self.rr.fetch_add(1, Ordering::Relaxed) % n)
            }
            Some(LoadBalancer::Simple(SimpleLb::Random)) => at(fastrand::usize(..n)),
            Some(LoadBalancer::Simple(SimpleLb::LeastRequest)) => {
                // Envoy's power of two choices.
                let a = at(fastrand::usize(..n));
                let b = at(fastrand::usize(..n));
                if active(b) < active(a) { b } else { a }
            }
            Some(LoadBalancer::ConsistentHash(key)) => match hash_value(key, hash) {
                // Rendezvous hashing: the endpoint with the highest hash of (value, endpoint)
                // wins, so only the keys of a removed endpoint move.
                Some(value) => (0..n)
                    .map(&at)
                    .max_by_key(|e| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        value.hash(&mut h);
                        e.uid.hash(&mut h);
                        h.finish()
                    })
                    .expect("not empty"),
                // No key in the request: any endpoint, as Envoy picks one at random.
                None => at(fastrand::usize(..n)),
            },
        };
        Some(chosen.clone())
    }

    /// Records an attempt's outcome for outlier detection; ejects the endpoint when its
    /// consecutive errors reach a threshold and the ejection budget allows.
    pub fn record(
        &self,
        endpoint: &str,
        outcome: Result<u16, &UpstreamError>,
        outlier: Option<&OutlierDetection>,
        cluster_size: usize,
    ) {
        let Some(outlier) = outlier else { return };
        let now = Instant::now();
        let mut state = self.endpoints.lock().expect("poisoned");
        let ejected = if state.ejecting(now) {
            state.by_uid.values().filter(|s| s.ejected_until.is_some_and(|u| u > now)).count()
        } else {
            0
        };
        let EndpointStates { by_uid, ejections_end } = &mut *state;
        let entry = state_of(by_uid, endpoint);
        let (server_error, gateway_error) = match outcome {
            Ok(status) => (status >= 500, matches!(status, 502..=504)),
            Err(UpstreamError::Overflow) => return,
            Err(_) => (true, true),
        };
        if server_error {
            entry.consecutive_5xx += 1;
        } else {
            entry.consecutive_5xx = 0;
        }
        if gateway_error {
            entry.consecutive_gateway += 1;
        } else {
            entry.consecutive_gateway = 0;
        }
        let trips = outlier.consecutive_5xx_errors.is_some_and(|t| t > 0 && entry.consecutive_5xx >= t)
            || outlier.consecutive_gateway_errors.is_some_and(|t| t > 0 && entry.consecutive_gateway >= t);
        // At least one endpoint may always be ejected, as in Envoy.
        let budget = (cluster_size * outlier.max_ejection_percent as usize / 100).max(1);
        if trips && ejected < budget {
            entry.ejections += 1;
            let duration = Duration::from_millis(outlier.base_ejection_time_ms) * entry.ejections;
            entry.ejected_until = Some(now + duration);
            *ejections_end = (*ejections_end).max(Some(now + duration));
            entry.consecutive_5xx = 0;
            entry.consecutive_gateway = 0;
            tracing::warn!(cluster = %self.key, endpoint, ejection_ms = duration.as_millis() as u64, times = entry.ejections, "outlier ejected");
        }
    }

    /// Endpoints ejected right now, for `/config_dump`.
    pub fn ejected(&self) -> Vec<String> {
        let now = Instant::now();
        let state = self.endpoints.lock().expect("poisoned");
        let mut out: Vec<String> = state
            .by_uid
            .iter()
            .filter(|(_, s)| s.ejected_until.is_some_and(|u| u > now))
            .map(|(k, _)| k.clone())
            .collect();
        out.sort();
        out
    }

    fn mark_active(&self, endpoint: &str, delta: isize) {
        let mut state = self.endpoints.lock().expect("poisoned");
        let entry = state_of(&mut state.by_uid, endpoint);
        entry.active = entry.active.saturating_add_signed(delta);
    }
}

/// An endpoint's state, made on first use: its uid is copied into the map only then, not on
/// every request's two updates.
fn state_of<'a>(states: &'a mut FastMap<String, EndpointState>, endpoint: &str) -> &'a mut EndpointState {
    if !states.contains_key(endpoint) {
        states.insert(endpoint.to_string(), EndpointState::default());
    }
    states.get_mut(endpoint).expect("inserted above")
}

/// The route's `timeout` passed while the response body was still coming.
#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout: the route's timeout passed before the response ended")]
pub struct ResponseTimeout;

/// Holds a request's slot against `http2MaxRequests` until the response body is done.
pub struct InFlight(Arc<Cluster>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct RetryGuard(Arc<Cluster>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request against its endpoint (least-request balancing) while it lasts.
struct ActiveRequest {
    cluster: Arc<Cluster>,
    endpoint: String,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.cluster.mark_active(&self.endpoint, -1);
        // A pending request may now find an HTTP/1.1 connection free.
        self.cluster.released.notify_waiters();
    }
}

/// The upstream response body, holding the request's slots until it ends.
pub struct UpstreamBody {
    inner: ReceivedBody,
    /// When the route's `timeout` passes: the body must have ended by then.
    deadline: Timer,
    /// Dropped in this order: the HTTP/2 stream is free before `ActiveRequest` wakes the
    /// requests waiting for one.
    _guards: (Option<InFlight>, Option<StreamClaim>, ActiveRequest),
}

/// The response body as the protocol's client hands it over.
type ReceivedBody = Either<Incoming, H2Body>;

impl UpstreamBody {
    /// Keeps the request's `http2MaxRequests` slot until the body ends.
    pub fn hold(&mut self, in_flight: InFlight) {
        self._guards.0 = Some(in_flight);
    }

    /// Fails the body if it has not ended when `timer` passes (the route's `timeout`, which
    /// Envoy counts to the end of the response): the client's stream is reset.
    pub fn end_by(&mut self, timer: Timer) {
        self.deadline = timer;
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() && self.deadline.poll_expired(cx) {
            return Poll::Ready(Some(Err(Box::new(ResponseTimeout))));
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

/// Where an attempt goes: the endpoint, the port on it, and how to reach it.
pub struct Target<'a> {
    pub endpoint: &'a Arc<Workload>,
    pub addr: SocketAddr,
    pub trust_domain: &'a str,
    pub protocol: Protocol,
    pub forwarded_for: SocketAddr,
    pub traceparent: Option<&'a str>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub struct Clusters {
    /// By host, then (subset, port): looked up with borrowed names, without building a key.
    map: Mutex<FastMap<String, Vec<Arc<Cluster>>>>,
    pub hbone: HboneClient,
}

impl Clusters {
    pub fn new(hbone: HboneClient) -> Self {
        Self { map: Mutex::new(FastMap::default()), hbone }
    }

    /// The cluster of (`host`, `subset`, `port`), made on first use.
    pub fn get(&self, host: &str, subset: Option<&str>, port: u16) -> Arc<Cluster> {
        let mut map = self.map.lock().expect("poisoned");
        let same = |c: &&Arc<Cluster>| c.key.port == port && c.key.subset.as_deref() == subset;
        if let Some(cluster) = map.get(host).and_then(|list| list.iter().find(same)) {
            return cluster.clone();
        }
        let key = ClusterKey { host: host.to_string(), subset: subset.map(str::to_string), port };
        let cluster = Arc::new(Cluster::new(key));
        map.entry(host.to_string()).or_default().push(cluster.clone());
        cluster
    }

    /// Forgets the clusters the config no longer has — a deleted service's, a subset its
    /// DestinationRule no longer defines — as a new config arrives: churn would otherwise grow
    /// the map for good. Their pooled connections close; a request still holding one
    /// finishes with it, and a cluster that comes back starts afresh.
    pub fn forget_gone(&self, still_there: impl Fn(&ClusterKey) -> bool) {
        self.map.lock().expect("poisoned").retain(|_, clusters| {
            clusters.retain(|c| {
                let keep = still_there(&c.key);
                if !keep {
                    c.forget();
                }
                keep
            });
            !clusters.is_empty()
        });
    }

    pub fn all(&self) -> Vec<Arc<Cluster>> {
        self.map.lock().expect("poisoned").values().flatten().cloned().collect()
    }

    /// Drops pooled connections that are closed or go to an address no workload has any more
    /// (a deleted pod's), as a new config arrives: endpoint churn then leaves no connections,
    /// nor their slots under `maxConnections`, behind.
    pub fn retire_idle(&self, still_there: impl Fn(IpAddr) -> bool) {
        for cluster in self.all() {
            cluster.retire_idle(&still_there);
        }
    }

    /// Closes pooled connections past their idle timeout; run every second.
    pub fn close_idle(&self) {
        let now = tokio::time::Instant::now();
        for cluster in self.all() {
            cluster.close_idle(now);
        }
    }

    /// Sends one attempt to `target`, over a pooled connection or a new one.
    pub async fn send(
        &self,
        cluster: &Arc<Cluster>,
        target: &Target<'_>,
        pool: Option<&ConnectionPool>,
        mut request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let max_per_conn = pool.and_then(|p| p.max_requests_per_connection).unwrap_or(0);
        // A pooled connection can close, or get an HTTP/2 GOAWAY, between the pool's look at it
        // and the request: then the client hands the request back unsent, and it goes once
        // more on another connection instead of failing for an upstream it never reached
        // (not an attempt: no retry budget spent).
        let mut resent = false;
        let (mut conn, response, active) = loop {
            let mut conn = self.checkout(cluster, target, pool).await?;
            cluster.mark_active(&target.endpoint.uid, 1);
            let active = ActiveRequest { cluster: cluster.clone(), endpoint: target.endpoint.uid.clone() };
            if !conn.shared {
                conn.requests += 1;
            }
            let reset = |e: &dyn std::fmt::Display| UpstreamError::Reset(e.to_string());
            let response = match &mut conn.sender {
                Sender::Http1(s) => match s.try_send_request(request).await {
                    Ok(response) => response.map(Either::Left),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if !resent => {
                            (request, resent) = (unsent, true);
                            continue;
                        }
                        _ => return Err(reset(e.error())),
                    },
                },
                Sender::Http2(s) => match s.send(request).await {
                    Ok(response) => response.map(Either::Right),
                    Err(H2SendError::NotSent(unsent, _)) if !resent => {
                        (request, resent) = (*unsent, true);
                        continue;
                    }
                    Err(H2SendError::Refused(e)) => return Err(UpstreamError::Refused(e.to_string())),
                    Err(e) => return Err(reset(&e)),
                },
            };
            break (conn, response, active);
        };
        // An HTTP/1.1 connection returns after each exchange; a new HTTP/2 one joins the pool,
        // which hands out shared handles to it (`take_ready`) until maxRequestsPerConnection.
        let stream = conn.stream.take();
        let reusable = max_per_conn == 0 || conn.requests < max_per_conn;
        if reusable && !conn.shared {
            (conn.last_used, conn.idle_timeout) = (tokio::time::Instant::now(), idle_timeout(pool));
            cluster.pool((target.addr, target.protocol), conn);
        }
        Ok(response.map(|inner| UpstreamBody {
            inner,
            deadline: Timer::Off,
            _guards: (None, stream, active),
        }))
    }

    /// A connection to the target: an idle ready one, one being opened with a stream to spare
    /// (HTTP/2), a new one within `maxConnections`, or — when the pool is full — a wait among
    /// at most `http1MaxPendingRequests` others.
    async fn checkout(
        &self,
        cluster: &Arc<Cluster>,
        target: &Target<'_>,
        pool: Option<&ConnectionPool>,
    ) -> Result<PooledConn, UpstreamError> {
        let key = (target.addr, target.protocol);
        let max_conns = pool.and_then(|p| p.max_connections).map_or(usize::MAX, |m| m as usize);
        let max_pending = pool.and_then(|p| p.http1_max_pending_requests).map_or(usize::MAX, |m| m as usize);
        // Taken once, kept until the request has a connection: `http1MaxPendingRequests`
        // bounds the requests waiting, for a pooled connection to free up or for one being
        // opened (as Envoy counts a stream waiting for a connecting client as pending).
        let mut pending: Option<PendingGuard> = None;
        let wait_pending = |pending: &mut Option<PendingGuard>| {
            if pending.is_none() {
                if cluster
                    .pending
                    .try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_pending).then_some(n + 1))
                    .is_err()
                {
                    return false;
                }
                *pending = Some(PendingGuard(cluster.clone()));
            }
            true
        };
        let take_slot = || {
            cluster
                .connections
                .try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_conns).then_some(n + 1))
                .is_ok()
        };
        let room = shared_room(target.protocol, pool);
        loop {
            if let Some(conn) = take_ready(cluster, key, pool) {
                return Ok(conn);
            }
            // A connection being opened to wait for, or one to open (registered for others to
            // wait for if it will be shared).
            let (waiting, opening) = match room {
                Some(room) => {
                    match cluster.dials.join_or_open(key, room, || wait_pending(&mut pending), take_slot) {
                        Some(Turn::Wait(waiting)) => (Some(waiting), None),
                        Some(Turn::Open(opening)) => (None, Some(Some(opening))),
                        None => (None, None),
                    }
                }
                None => (None, take_slot().then_some(None)),
            };
            if let Some(waiting) = waiting {
                if let Some(stream) = waiting.finished().await? {
                    return Ok(stream);
                }
                continue;
            }
            if let Some(opening) = opening {
                // Opening one, it waits no more.
                drop(pending);
                return self.open(cluster, target, pool, opening).await;
            }
            if release_idle_elsewhere(cluster, key) {
                continue;
            }
            if !wait_pending(&mut pending) {
                return Err(UpstreamError::Overflow);
            }
            // Woken when a request ends or a connection closes; the timer covers a wake-up
            // that raced ahead of this waiter.
            let notified = cluster.released.notified();
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }

    /// Opens a connection in a slot `checkout` has taken under `maxConnections`. A new
    /// HTTP/2 connection is shared at once: requests that come meanwhile wait for it (up to
    /// the streams it is assumed to have), and it joins the pool once its server's SETTINGS
    /// are known, instead of after its first response.
    async fn open(
        &self,
        cluster: &Arc<Cluster>,
        target: &Target<'_>,
        pool: Option<&ConnectionPool>,
        opening: Option<Opening<PooledConn>>,
    ) -> Result<PooledConn, UpstreamError> {
        let key = (target.addr, target.protocol);
        let slot = Arc::new(ConnectionSlot(cluster.clone()));
        let max_per_conn = pool.and_then(|p| p.max_requests_per_connection).unwrap_or(0);
        let stream_limit = pool.and_then(|p| p.max_concurrent_streams);
        let connect_timeout = pool.and_then(|p| p.connect_timeout_ms);
        // Boxed: dialing (TLS and HTTP handshakes) is rare next to requests on pooled
        // connections, and its state is most of what a request's future would hold.
        let dial = Box::pin(self.dial(target));
        let dialed = deadline::within(connect_timeout.map(Duration::from_millis), dial).await.unwrap_or_else(|_| {
            Err(UpstreamError::Connect(format!(
                "{}: no connection within {} ms (the DestinationRule's connectionPool.tcp.connectTimeout)",
                target.addr,
                connect_timeout.unwrap_or_default()
            )))
        });
        let (sender, settings_known) = match dialed {
            Ok(dialed) => dialed,
            Err(e) => {
                if let Some(opening) = opening {
                    opening.failed(e.clone());
                }
                return Err(e);
            }
        };
        let conn =
            |sender: Sender, requests: u32, shared: bool, stream: Option<StreamClaim>, slot| PooledConn {
                sender,
                requests,
                shared,
                stream,
                slot,
                last_used: tokio::time::Instant::now(),
                idle_timeout: idle_timeout(pool),
            };
        match (sender, opening, settings_known) {
            (Sender::Http2(h2), Some(opening), Some(settings_known)) => {
                // The pool's entry, and this request's handle (its first request).
                let mut entry = conn(Sender::Http2(h2), 0, false, None, slot);
                let handle = entry.share().expect("an HTTP/2 connection");
                let limits = (stream_limit, max_per_conn);
                tokio::spawn(hand_out_then_pool(
                    cluster.clone(),
                    key,
                    entry,
                    opening,
                    settings_known,
                    limits,
                ));
                Ok(handle)
            }
            (sender, _, _) => {
                let stream = match &sender {
                    Sender::Http2(s) => Some(s.claim_stream()),
                    Sender::Http1(_) => None,
                };
                Ok(conn(sender, 0, false, stream, slot))
            }
        }
    }

    /// Opens a connection; a new HTTP/2 one comes with when its server's SETTINGS are known.
    async fn dial(&self, target: &Target<'_>) -> Result<(Sender, Option<SettingsKnown>), UpstreamError> {
        let endpoint = target.endpoint;
        let io: Box<dyn Io> = if endpoint.enrolled {
            let expected = endpoint.identity(target.trust_domain);
            let mut request = ConnectRequest::new(target.addr);
            request.forwarded_for = Some(target.forwarded_for);
            request.traceparent = target.traceparent.map(str::to_string);
            let stream = self
                .hbone
                .connect(target.addr.ip(), &expected, &request)
                .await
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            Box::new(stream)
        } else {
            let connect = tokio::net::TcpStream::connect(target.addr);
            let tcp = warren_core::connect::within(target.addr, self.hbone.connect_timeout, connect)
                .await
                .map_err(|e| UpstreamError::Connect(format!("{}: {e}", target.addr)))?;
            let _ = tcp.set_nodelay(true);
            Box::new(tcp)
        };
        let addr = target.addr;
        match target.protocol {
            Protocol::Http1 => {
                let (sender, conn) = http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                tokio::spawn(async move {
                    // With upgrades: a WebSocket's 101 hands the connection to its relay.
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(%addr, "upstream HTTP/1.1 connection ended: {e}");
                    }
                });
                Ok((Sender::Http1(sender), None))
            }
            Protocol::Http2 => {
                let (sender, settings_known) = h2_client::handshake(io, addr)
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                Ok((Sender::Http2(sender), Some(settings_known)))
            }
        }
    }
}

/// How many requests besides its opener a new connection of `protocol` is expected to carry
/// at once — the streams assumed before the server's SETTINGS, within the rule's
/// `maxConcurrentStreams` and `maxRequestsPerConnection` — or none if it is not shared
/// (HTTP/1.1, or one request per connection).
fn shared_room(protocol: Protocol, pool: Option<&ConnectionPool>) -> Option<usize> {
    let max_per_conn = pool.and_then(|p| p.max_requests_per_connection).unwrap_or(0);
    if protocol != Protocol::Http2 || max_per_conn == 1 {
        return None;
    }
    let streams = pool.and_then(|p| p.max_concurrent_streams).map_or(usize::MAX, |l| l as usize);
    let requests = if max_per_conn == 0 { usize::MAX } else { max_per_conn as usize };
    Some(h2_client::INITIAL_MAX_SEND_STREAMS.min(streams).min(requests).saturating_sub(1))
}

/// Once a new HTTP/2 connection's SETTINGS are known, claims a stream of it for each request
/// waiting for it (as many as it has free under the server's and the rule's limits, and under
/// `maxRequestsPerConnection`), pools it for the rest unless those used it up, and hands the
/// claimed streams over.
async fn hand_out_then_pool(
    cluster: Arc<Cluster>,
    key: DialKey,
    mut entry: PooledConn,
    opening: Opening<PooledConn>,
    settings_known: SettingsKnown,
    (stream_limit, max_per_conn): (Option<u32>, u32),
) {
    settings_known.await;
    let mut streams = Vec::new();
    while streams.len() < opening.waiting()
        && entry.has_free_stream(stream_limit)
        && (max_per_conn == 0 || entry.requests < max_per_conn)
    {
        streams.extend(entry.share());
    }
    // Pooled first: a request that joins while the streams are counted, and so gets none,
    // finds the connection in the pool when it looks again.
    if max_per_conn == 0 || entry.requests < max_per_conn {
        cluster.pool(key, entry);
    }
    opening.opened(streams);
    // Requests waiting at maxConnections may take its streams too.
    cluster.released.notify_waiters();
}

struct PendingGuard(Arc<Cluster>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At `maxConnections`, frees a slot by closing a connection of this cluster that no request
/// uses and that goes to another endpoint (or speaks the other protocol): else a request for an
/// endpoint without a connection would wait forever behind idle ones to the others. (Envoy
/// lets such an endpoint have one connection over the limit instead; this keeps the limit.)
/// Connections found closed on the way are dropped too. True if a slot was freed.
fn release_idle_elsewhere(cluster: &Cluster, key: (SocketAddr, Protocol)) -> bool {
    let mut idle = cluster.idle.lock().expect("poisoned");
    // Only the pool holds an unused connection's slot; an HTTP/2 one in use has handles out.
    let unused = |c: &PooledConn| Arc::strong_count(&c.slot) == 1;
    let mut freed = false;
    for list in idle.values_mut() {
        let before = list.len();
        list.retain(|c| !(c.is_closed() && unused(c)));
        freed |= list.len() < before;
    }
    if freed {
        return true;
    }
    for (other, list) in idle.iter_mut().filter(|(other, _)| **other != key) {
        if let Some(position) = list.iter().position(unused) {
            debug!(cluster = %cluster.name, endpoint = %other.0, "maxConnections reached: closing an idle connection to make room");
            list.swap_remove(position);
            return true;
        }
    }
    false
}

/// An idle connection that can take a request now. HTTP/2 connections stay in the pool while
/// in use (they multiplex) and hand out shared handles, each counted against
/// `max_per_conn` (0: no limit), leaving the pool with the last one allowed; HTTP/1.1 ones are
/// ready only between exchanges. Closed ones, and ones past the limit, are dropped on the way.
fn take_ready(
    cluster: &Cluster,
    key: (SocketAddr, Protocol),
    pool: Option<&ConnectionPool>,
) -> Option<PooledConn> {
    let max_per_conn = pool.and_then(|p| p.max_requests_per_connection).unwrap_or(0);
    let mut idle = cluster.idle.lock().expect("poisoned");
    let list = idle.get_mut(&key)?;
    // Also dropped: connections that have carried as many requests as a new, lower limit allows.
    list.retain(|c| !c.is_closed() && (max_per_conn == 0 || c.requests < max_per_conn));
    let position = list.iter().position(|c| match &c.sender {
        Sender::Http1(s) => s.is_ready(),
        // Past the server's SETTINGS_MAX_CONCURRENT_STREAMS, another connection is opened (as
        // Envoy does) rather than waiting for a stream on this one.
        Sender::Http2(s) => s.has_free_stream(pool.and_then(|p| p.max_concurrent_streams)),
    })?;
    let pooled = &mut list[position];
    if let Some(handle) = pooled.share() {
        if max_per_conn != 0 && pooled.requests >= max_per_conn {
            // Its streams finish on the handles out; the connection closes after the last.
            list.swap_remove(position);
        }
        return Some(handle);
    }
    Some(list.swap_remove(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled HTTP/1.1 connection to `addr` over an in-memory pipe, counted against the
    /// cluster's connections; the pipe's far end comes back to close it with.
    async fn pooled(cluster: &Arc<Cluster>, addr: &str) -> tokio::io::DuplexStream {
        let (conn, far) = idle_conn(cluster).await;
        cluster.pool((addr.parse().unwrap(), Protocol::Http1), conn);
        far
    }

    /// An HTTP/1.1 connection of `cluster`'s over an in-memory pipe, not in its pool yet.
    async fn idle_conn(cluster: &Arc<Cluster>) -> (PooledConn, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (sender, connection) = http1::handshake::<_, RequestBody>(TokioIo::new(near)).await.unwrap();
        tokio::spawn(connection);
        (connection_of(cluster, Sender::Http1(sender)), far)
    }

    /// `sender`'s connection as the pool holds it, counted against `cluster`'s connections;
    /// idle for a second closes it.
    fn connection_of(cluster: &Arc<Cluster>, sender: Sender) -> PooledConn {
        cluster.connections.fetch_add(1, Ordering::AcqRel);
        PooledConn {
            sender,
            requests: 1,
            shared: false,
            stream: None,
            slot: Arc::new(ConnectionSlot(cluster.clone())),
            last_used: tokio::time::Instant::now(),
            idle_timeout: Some(Duration::from_secs(1)),
        }
    }

    /// A cluster with a pooled connection to each of `addrs` (the pipes' far ends with them).
    async fn cluster_with(addrs: &[&str]) -> (Arc<Cluster>, Vec<tokio::io::DuplexStream>) {
        let key = ClusterKey { host: "payment.default.svc.cluster.local".into(), subset: None, port: 80 };
        let cluster = Arc::new(Cluster::new(key));
        let mut far_ends = Vec::new();
        for addr in addrs {
            far_ends.push(pooled(&cluster, addr).await);
        }
        (cluster, far_ends)
    }

    #[tokio::test]
    async fn the_clusters_of_a_deleted_service_are_forgotten() {
        use tokio::io::AsyncReadExt;
        let me = "spiffe://cluster.local/ns/shop/sa/waypoint".parse().unwrap();
        let clusters = Clusters::new(crate::hbone::HboneClient::new(
            warren_core::certs::CertManager::new(None, None),
            me,
            Duration::from_secs(1),
        ));
        let (payment, ledger) = ("payment.shop.svc.cluster.local", "ledger.shop.svc.cluster.local");
        let held = clusters.get(ledger, Some("v1"), 80);
        let mut pooled_far_end = pooled(&clusters.get(ledger, None, 80), "10.0.0.9:80").await;
        let kept = clusters.get(payment, None, 80);
        let mut kept_far_end = pooled(&kept, "10.0.0.8:80").await;
        let canary = clusters.get(payment, Some("canary"), 80);
        // ledger is deleted; payment stays, but its rule no longer defines `canary`.
        clusters.forget_gone(|key| key.host == payment && key.subset.is_none());
        let left: Vec<_> = clusters.all().iter().map(|c| c.key.to_string()).collect();
        assert_eq!(left, [format!("outbound|80||{payment}")], "only what the config still has stays");
        assert!(Arc::ptr_eq(&kept, &clusters.get(payment, None, 80)), "and it is the same cluster");
        assert!(
            !Arc::ptr_eq(&canary, &clusters.get(payment, Some("canary"), 80)),
            "a subset back starts afresh"
        );
        assert!(!Arc::ptr_eq(&held, &clusters.get(ledger, Some("v1"), 80)), "a host back starts afresh");
        // The forgotten cluster's pooled connection is closed (it held its cluster, so it would
        // have stayed open for good), and a connection handed back to it is not pooled.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), pooled_far_end.read(&mut byte)).await;
        assert_eq!(read.expect("closed").unwrap(), 0, "the forgotten pool's connection is closed");
        let (conn, mut far_end) = idle_conn(&held).await;
        held.pool(("10.0.0.7:80".parse().unwrap(), Protocol::Http1), conn);
        let read = tokio::time::timeout(Duration::from_secs(5), far_end.read(&mut byte)).await;
        assert_eq!(read.expect("closed").unwrap(), 0, "a forgotten cluster takes no connection back");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), kept_far_end.read(&mut byte)).await.is_err(),
            "the kept cluster's connection stays open"
        );
    }

    /// The addresses the pool holds connections to, sorted.
    fn pooled_addresses(cluster: &Cluster) -> Vec<String> {
        let idle = cluster.idle.lock().unwrap();
        let mut addrs: Vec<String> =
            idle.iter().filter(|(_, l)| !l.is_empty()).map(|(k, _)| k.0.to_string()).collect();
        addrs.sort();
        addrs
    }

    fn endpoint(uid: &str) -> Arc<Workload> {
        Arc::new(Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "shop".into(),
            service_account: "payment".into(),
            node: "node-1".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            enrolled: true,
            labels: Default::default(),
            waypoint: None,
        })
    }

    #[test]
    fn picks_skip_ejected_endpoints_until_their_ejection_ends() {
        let key = ClusterKey { host: "payment.shop.svc.cluster.local".into(), subset: None, port: 80 };
        let cluster = Cluster::new(key);
        let endpoints: Vec<Arc<Workload>> = ["a", "b", "c"].map(endpoint).to_vec();
        let headers = http::HeaderMap::new();
        let hash = HashInput {
            headers: &headers,
            source_ip: "10.0.0.9".parse().unwrap(),
            query: None,
            made_cookie: None,
        };
        let picks = |avoid: &[String]| -> std::collections::BTreeSet<String> {
            (0..30).map(|_| cluster.pick(&endpoints, None, None, &hash, avoid).unwrap().uid.clone()).collect()
        };
        let all: std::collections::BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(picks(&[]), all, "round robin reaches every endpoint");
        let avoided = picks(&["a".to_string()]);
        assert!(
            !avoided.contains("a") && avoided.len() == 2,
            "a retry avoids the endpoint tried: {avoided:?}"
        );

        let outlier = OutlierDetection {
            consecutive_5xx_errors: Some(1),
            consecutive_gateway_errors: None,
            interval_ms: 1000,
            base_ejection_time_ms: 100,
            max_ejection_percent: 100,
            min_health_percent: 0,
        };
        cluster.record("b", Ok(503), Some(&outlier), endpoints.len());
        assert_eq!(cluster.ejected(), ["b"]);
        let while_ejected = picks(&[]);
        assert!(!while_ejected.contains("b") && while_ejected.len() == 2, "{while_ejected:?}");
        std::thread::sleep(Duration::from_millis(150));
        assert!(cluster.ejected().is_empty());
        assert_eq!(picks(&[]), all, "back once its ejection ended");
    }

    #[test]
    fn a_consistent_hash_sticks_by_its_key_and_spreads_requests_without_one() {
        let key = ClusterKey { host: "payment.shop.svc.cluster.local".into(), subset: None, port: 80 };
        let cluster = Cluster::new(key);
        let endpoints: Vec<Arc<Workload>> = ["a", "b", "c", "d"].map(endpoint).to_vec();
        let lb = LoadBalancer::ConsistentHash(warren_core::l7::HashKey::HttpHeaderName("x-user".into()));
        let picks = |headers: &http::HeaderMap| -> std::collections::BTreeSet<String> {
            let hash =
                HashInput { headers, source_ip: "10.0.0.9".parse().unwrap(), query: None, made_cookie: None };
            (0..40)
                .map(|_| cluster.pick(&endpoints, Some(&lb), None, &hash, &[]).unwrap().uid.clone())
                .collect()
        };
        let mut alice = http::HeaderMap::new();
        alice.insert("x-user", http::HeaderValue::from_static("alice"));
        assert_eq!(picks(&alice).len(), 1, "one user, one endpoint");
        assert!(picks(&http::HeaderMap::new()).len() > 1, "no key: not all on one endpoint");
    }

    #[tokio::test]
    async fn at_the_limit_an_unused_connection_elsewhere_makes_room() {
        let (cluster, _far_ends) = cluster_with(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]).await;
        let in_use: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        // A handle out (an HTTP/2 stream, say) keeps 10.0.0.2's connection from being closed.
        let handle = cluster.idle.lock().unwrap()[&(in_use, Protocol::Http1)][0].slot.clone();
        let own = ("10.0.0.1:8080".parse().unwrap(), Protocol::Http1);

        assert!(release_idle_elsewhere(&cluster, own));
        assert_eq!(cluster.connections.load(Ordering::Acquire), 2);
        assert_eq!(pooled_addresses(&cluster), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        // Nothing more to close: the endpoint's own connection and the one in use stay.
        assert!(!release_idle_elsewhere(&cluster, own));
        drop(handle);
        assert!(release_idle_elsewhere(&cluster, own));
        assert_eq!(cluster.connections.load(Ordering::Acquire), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_unused_for_their_idle_timeout_are_closed() {
        let (cluster, _far_ends) = cluster_with(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]).await;
        let key = |addr: &str| (addr.parse::<SocketAddr>().unwrap(), Protocol::Http1);
        let handle = {
            let mut idle = cluster.idle.lock().unwrap();
            // 10.0.0.2's rule says 0s: never closed for idling.
            idle.get_mut(&key("10.0.0.2:8080")).unwrap()[0].idle_timeout = None;
            // 10.0.0.3's connection has a request out on it (an HTTP/2 stream, say).
            idle[&key("10.0.0.3:8080")][0].slot.clone()
        };
        tokio::time::advance(Duration::from_millis(900)).await;
        cluster.close_idle(tokio::time::Instant::now());
        assert_eq!(pooled_addresses(&cluster).len(), 3, "closed before its timeout");

        tokio::time::advance(Duration::from_millis(200)).await;
        cluster.close_idle(tokio::time::Instant::now());
        assert_eq!(pooled_addresses(&cluster), ["10.0.0.2:8080", "10.0.0.3:8080"]);
        drop(handle);
        cluster.close_idle(tokio::time::Instant::now());
        assert_eq!(pooled_addresses(&cluster), ["10.0.0.2:8080"]);
        assert_eq!(cluster.connections.load(Ordering::Acquire), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_connections_idle_time_counts_from_the_end_of_its_last_stream() {
        let key = ClusterKey { host: "payment.default.svc.cluster.local".into(), subset: None, port: 80 };
        let cluster = Arc::new(Cluster::new(key));
        let addr: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(far).await.unwrap();
            while let Some(Ok(_)) = connection.accept().await {}
        });
        let (sender, _) = h2_client::handshake(near, addr).await.unwrap();
        cluster.pool((addr, Protocol::Http2), connection_of(&cluster, Sender::Http2(sender.clone())));
        // A stream five times as long as the idle timeout: the connection is in use throughout.
        let stream = sender.claim_stream();
        tokio::time::advance(Duration::from_secs(5)).await;
        cluster.close_idle(tokio::time::Instant::now());
        assert_eq!(pooled_addresses(&cluster), ["10.0.0.1:8080"], "closed while a stream was open");
        drop(stream);
        tokio::time::advance(Duration::from_millis(900)).await;
        cluster.close_idle(tokio::time::Instant::now());
        assert_eq!(pooled_addresses(&cluster), ["10.0.0.1:8080"], "closed 0.9 s after its last stream");
        tokio::time::advance(Duration::from_millis(200)).await;
        cluster.close_idle(tokio::time::Instant::now());
        assert!(pooled_addresses(&cluster).is_empty(), "idle for its timeout since its last stream");
    }

    #[tokio::test]
    async fn a_new_config_retires_connections_to_addresses_gone_and_closed_ones() {
        let (cluster, mut far_ends) =
            cluster_with(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]).await;
        drop(far_ends.pop());
        // Let the closed connection's task see the end of its pipe.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(cluster.connections.load(Ordering::Acquire), 3);

        let gone: IpAddr = "10.0.0.2".parse().unwrap();
        cluster.retire_idle(&|ip| ip != gone);
        assert_eq!(pooled_addresses(&cluster), ["10.0.0.1:8080"]);
        // Their slots under maxConnections are free again.
        assert_eq!(cluster.connections.load(Ordering::Acquire), 1);
    }
}
