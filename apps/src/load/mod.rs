//! `warren-load`: a load client for HTTP/1.1 (keep-alive or a connection per request) and h2c
//! that reports status, `x-echo-version` and latency counts.

pub mod client;
mod summary;
mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{ArgGroup, Parser};
use http::Method;
use tokio::time::Instant;

use client::{Connection, RequestError};
pub use summary::{Errors, Latency, Recorder, Summary, UNKNOWN_VERSION, percentile};
pub use target::{Header, RequestTemplate, Target, TargetError};

/// Most requests one run may send (`--requests`).
pub const MAX_REQUESTS: u64 = 10_000_000;
/// Longest run (`--duration`), so a forgotten run stops by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Most concurrent workers (`--concurrency`).
pub const MAX_CONCURRENCY: u32 = 10_000;
/// Longest per-request timeout (`--timeout-ms`).
pub const MAX_TIMEOUT_MS: u64 = 600_000;

/// Flags of `warren-load`; build one in-process with `Config::try_parse_from`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "warren-load",
    about = "Load client for HTTP/1.1 and h2c: counts statuses, x-echo-version answers and latency",
    group(ArgGroup::new("amount").args(["requests", "duration"]).required(true).multiple(true))
)]
pub struct Config {
    /// Target URL: http://HOST[:PORT][/PATH][?QUERY], HOST a literal IP ([::1] for IPv6) or a
    /// host name. Only plain http: HTTP/1.1, or h2c with --http2.
    #[arg(value_name = "URL")]
    pub url: String,

    /// Number of requests to send (1..=10000000). With --duration too, whichever ends first.
    #[arg(short = 'n', long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=MAX_REQUESTS))]
    pub requests: Option<u64>,

    /// Stop starting requests after this many seconds (fractions allowed, at most 600);
    /// requests in flight then still finish or time out.
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Target rate in requests per second over all workers, on a fixed schedule: request i is
    /// due at start + i/R whatever earlier answers took (open loop), as long as a worker is
    /// free. 0 sends as fast as the workers can.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Number of workers sending at once; each has its own connection (1..=10000).
    #[arg(short = 'c', long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONCURRENCY)))]
    pub concurrency: u32,

    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1 keep-alive.
    #[arg(long)]
    pub http2: bool,

    /// Open a new TCP connection for every request (HTTP/1.1 only), to measure connection
    /// set-up through the mesh.
    #[arg(long, conflicts_with = "http2")]
    pub new_connection_per_request: bool,

    /// Extra request header, 'name: value'; repeatable. A `host` header overrides the URL's
    /// host (the :authority with --http2).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<Header>,

    /// Request method.
    #[arg(short = 'X', long, value_name = "METHOD", default_value = "GET")]
    pub method: Method,

    /// Request body, sent as is with every request.
    #[arg(short = 'd', long, value_name = "STRING")]
    pub data: Option<String>,

    /// Per-request timeout in milliseconds, covering connect (when needed), sending and reading
    /// the whole response (1..=600000).
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub timeout_ms: u64,

    /// Print the summary as JSON (the `Summary` type of the warren-apps crate) instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= MAX_DURATION.as_secs_f64()) {
        return Err(format!("must be more than 0 and at most {} seconds", MAX_DURATION.as_secs()));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !rate.is_finite() || rate < 0.0 {
        return Err("must be a finite number of requests per second, 0 or more".to_string());
    }
    Ok(rate)
}

impl Config {
    /// Checks everything clap checks too, because a `Config` may be built by hand, and parses
    /// the URL.
    pub fn validate(&self) -> Result<Target> {
        if self.requests.is_none() && self.duration.is_none() {
            bail!("give --requests N and/or --duration SECS");
        }
        if let Some(n) = self.requests {
            anyhow::ensure!((1..=MAX_REQUESTS).contains(&n), "--requests must be 1..={MAX_REQUESTS}");
        }
        if let Some(d) = self.duration {
            anyhow::ensure!(
                !d.is_zero() && d <= MAX_DURATION,
                "--duration must be more than 0 and at most 600"
            );
        }
        anyhow::ensure!(self.rate.is_finite() && self.rate >= 0.0, "--rate must be 0 or more");
        anyhow::ensure!(
            (1..=MAX_CONCURRENCY).contains(&self.concurrency),
            "--concurrency must be 1..={MAX_CONCURRENCY}"
        );
        anyhow::ensure!(
            (1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms),
            "--timeout-ms must be 1..={MAX_TIMEOUT_MS}"
        );
        if self.http2 && self.new_connection_per_request {
            bail!("--new-connection-per-request is for HTTP/1.1 only, not with --http2");
        }
        self.url.parse::<Target>().with_context(|| format!("URL {:?}", self.url))
    }
}

/// Hands out request slots: which request comes next and when it is due.
struct Schedule {
    start: Instant,
    requests: Option<u64>,
    deadline: Option<Instant>,
    /// Seconds between two due times; 0 sends as soon as a worker is free.
    interval_secs: f64,
    next: AtomicU64,
}

impl Schedule {
    /// The due time of the next request, or None when the run is over.
    fn next_slot(&self) -> Option<Instant> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        if self.requests.is_some_and(|n| i >= n) {
            return None;
        }
        // Computed from the start each time, not by adding intervals, so errors do not
        // accumulate and a slow moment does not shift the rest of the schedule.
        let due = if self.interval_secs > 0.0 {
            self.start + Duration::from_secs_f64(self.interval_secs * i as f64)
        } else {
            Instant::now()
        };
        match self.deadline {
            Some(deadline) if due >= deadline => None,
            _ => Some(due),
        }
    }
}

/// Runs the load described by `config` and returns the summary. Fails only on a bad config or
/// a host name that does not resolve; failed requests are counted, not returned as errors.
pub async fn run(config: Config) -> Result<Summary> {
    let target = config.validate()?;
    let addr = resolve(&target).await?;
    let body = Bytes::from(config.data.clone().unwrap_or_default());
    let template = RequestTemplate::new(&target, config.http2, config.method.clone(), &config.headers, body)
        .map_err(anyhow::Error::msg)?;

    let start = Instant::now();
    let schedule = Arc::new(Schedule {
        start,
        requests: config.requests,
        deadline: config.duration.map(|d| start + d),
        interval_secs: if config.rate > 0.0 { 1.0 / config.rate } else { 0.0 },
        next: AtomicU64::new(0),
    });
    let worker = Arc::new(Worker {
        addr,
        http2: config.http2,
        new_connection_per_request: config.new_connection_per_request,
        timeout: Duration::from_millis(config.timeout_ms),
        template,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency {
        tasks.spawn(worker.clone().run(schedule.clone()));
    }
    let mut recorder = Recorder::default();
    while let Some(result) = tasks.join_next().await {
        recorder.merge(result.context("a load worker panicked")?);
    }
    Ok(recorder.finish(&config.url, config.http2, config.concurrency, start.elapsed()))
}

/// Resolves once up front, so every request goes to the same address and DNS time is not
/// counted as request latency.
async fn resolve(target: &Target) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("resolving {}", target.host))?;
    addrs.next().with_context(|| format!("{} has no address", target.host))
}

struct Worker {
    addr: SocketAddr,
    http2: bool,
    new_connection_per_request: bool,
    timeout: Duration,
    template: RequestTemplate,
}

/// How far a request got; decides whether a timeout counts as a connect error.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sent,
}

impl Worker {
    async fn run(self: Arc<Self>, schedule: Arc<Schedule>) -> Recorder {
        let mut recorder = Recorder::default();
        let mut connection: Option<Connection> = None;
        while let Some(due) = schedule.next_slot() {
            tokio::time::sleep_until(due).await;
            let started = Instant::now();
            let mut phase = Phase::Connecting;
            let outcome = tokio::time::timeout(self.timeout, self.attempt(&mut connection, &mut phase)).await;
            let succeeded = match outcome {
                Ok(Ok(response)) => {
                    let version = response.headers().get("x-echo-version").and_then(|v| v.to_str().ok());
                    recorder.response(response.status().as_u16(), version, started.elapsed());
                    true
                }
                Ok(Err(RequestError::Connect(_))) => {
                    recorder.errors.connect += 1;
                    false
                }
                Ok(Err(RequestError::Protocol(_))) => {
                    recorder.errors.protocol += 1;
                    false
                }
                Err(_elapsed) if phase == Phase::Connecting => {
                    recorder.errors.connect += 1;
                    false
                }
                Err(_elapsed) => {
                    recorder.errors.timeout += 1;
                    false
                }
            };
            // After an error the connection's state is unknown (an HTTP/1.1 request may still be
            // in flight on it): start afresh.
            if !succeeded || self.new_connection_per_request {
                connection = None;
            }
        }
        recorder
    }

    async fn attempt(
        &self,
        connection: &mut Option<Connection>,
        phase: &mut Phase,
    ) -> Result<http::Response<Bytes>, RequestError> {
        if let Some(conn) = connection.as_mut()
            && !conn.ready().await
        {
            *connection = None;
        }
        let conn = match connection {
            Some(conn) => conn,
            None => connection.insert(Connection::open(self.addr, self.http2).await?),
        };
        *phase = Phase::Sent;
        conn.send(self.template.build()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("warren-load").chain(args.iter().copied()))
    }

    #[test]
    fn amount_is_required() {
        let err = parse(&["http://127.0.0.1/"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(parse(&["http://127.0.0.1/", "-n", "10"]).is_ok());
        assert!(parse(&["http://127.0.0.1/", "--duration", "1.5"]).is_ok());
        let both = parse(&["http://127.0.0.1/", "-n", "10", "--duration", "2"]).unwrap();
        assert_eq!((both.requests, both.duration), (Some(10), Some(Duration::from_secs(2))));
    }

    #[test]
    fn limits() {
        let url = "http://127.0.0.1/";
        assert!(parse(&[url, "-n", "10000000"]).is_ok());
        assert!(parse(&[url, "-n", "10000001"]).is_err());
        assert!(parse(&[url, "-n", "0"]).is_err());
        assert!(parse(&[url, "--duration", "600"]).is_ok());
        assert!(parse(&[url, "--duration", "600.5"]).is_err());
        assert!(parse(&[url, "--duration", "0"]).is_err());
        assert!(parse(&[url, "--duration", "nan"]).is_err());
        assert!(parse(&[url, "-n", "1", "--rate", "-1"]).is_err());
        assert!(parse(&[url, "-n", "1", "--rate", "inf"]).is_err());
        assert!(parse(&[url, "-n", "1", "-c", "0"]).is_err());
        assert!(parse(&[url, "-n", "1", "--timeout-ms", "0"]).is_err());
        assert!(parse(&[url, "-n", "1", "--http2", "--new-connection-per-request"]).is_err());
        assert!(parse(&[url, "-n", "1", "-H", "no colon"]).is_err());
        assert!(parse(&[url, "-n", "1", "-X", "GE T"]).is_err());
    }

    #[test]
    fn defaults_and_headers() {
        let c = parse(&["http://127.0.0.1/", "-n", "1", "-H", "a: 1", "-H", "b: 2", "-X", "POST"]).unwrap();
        assert_eq!((c.rate, c.concurrency, c.timeout_ms, c.http2, c.json), (0.0, 1, 10_000, false, false));
        assert_eq!(c.headers.len(), 2);
        assert_eq!(c.method, Method::POST);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn validate_catches_hand_built_configs() {
        let good = parse(&["http://127.0.0.1/", "-n", "1"]).unwrap();
        let bad = |edit: fn(&mut Config)| {
            let mut c = good.clone();
            edit(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.url = "https://127.0.0.1/".into()));
        assert!(bad(|c| c.requests = None));
        assert!(bad(|c| c.requests = Some(MAX_REQUESTS + 1)));
        assert!(bad(|c| c.duration = Some(Duration::from_secs(601))));
        assert!(bad(|c| c.concurrency = 0));
        assert!(bad(|c| c.rate = f64::NAN));
        assert!(bad(|c| c.timeout_ms = 0));
        assert!(bad(|c| {
            c.http2 = true;
            c.new_connection_per_request = true;
        }));
    }

    #[tokio::test]
    async fn schedule_counts_and_paces() {
        let start = Instant::now();
        let counted = Schedule {
            start,
            requests: Some(3),
            deadline: None,
            interval_secs: 0.0,
            next: AtomicU64::new(0),
        };
        assert_eq!((0..5).filter(|_| counted.next_slot().is_some()).count(), 3);

        // 10 per second for one second: slots at 0, 0.1, ..., 0.9 s, then the deadline.
        let paced = Schedule {
            start,
            requests: None,
            deadline: Some(start + Duration::from_secs(1)),
            interval_secs: 0.1,
            next: AtomicU64::new(0),
        };
        let slots: Vec<Instant> = std::iter::from_fn(|| paced.next_slot()).collect();
        assert_eq!(slots.len(), 10);
        let third = (slots[3] - start).as_secs_f64();
        assert!((third - 0.3).abs() < 1e-6, "slot 3 due after {third} s");
    }
}
