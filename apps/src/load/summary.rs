//! The result of a load run: what `--json` prints and what [`super::run`] returns.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Key of [`Summary::versions`] for responses without an `x-echo-version` header.
pub const UNKNOWN_VERSION: &str = "unknown";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub url: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    pub concurrency: u32,
    /// Requests attempted: `responses` + all errors.
    pub total: u64,
    /// Requests that got an HTTP response, whatever its status.
    pub responses: u64,
    /// Responses with a status below 400.
    pub successes: u64,
    pub errors: Errors,
    /// Responses by status code (JSON keys are strings, e.g. `"200"`).
    pub status: BTreeMap<u16, u64>,
    /// Responses by `x-echo-version` header; `"unknown"` when absent.
    pub versions: BTreeMap<String, u64>,
    /// Latency of the requests that got a response, from sending to the end of the body.
    pub latency_us: Latency,
    /// `total / elapsedSeconds`.
    pub requests_per_second: f64,
    pub elapsed_seconds: f64,
}

/// Requests that got no response, by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    /// TCP connect or handshake failed (or timed out): the request was never sent.
    pub connect: u64,
    /// No full response within `--timeout-ms`.
    pub timeout: u64,
    /// The connection broke or the answer was not valid HTTP.
    pub protocol: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.protocol
    }
}

/// Exact percentiles (nearest rank) in microseconds; all zero when there were no samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    /// `samples` need not be sorted; it is sorted here.
    pub fn from_samples(samples: &mut [u64]) -> Latency {
        samples.sort_unstable();
        Latency {
            samples: samples.len() as u64,
            p50: percentile(samples, 50_000),
            p90: percentile(samples, 90_000),
            p99: percentile(samples, 99_000),
            p999: percentile(samples, 99_900),
            max: samples.last().copied().unwrap_or(0),
        }
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p` of all
/// samples at or below it. `p` is in thousandths of a percent (99.9 % = 99_900) so that the
/// rank is computed exactly in integers: with floats 99.9 % of 1000 rounds up to 1000.
pub fn percentile(sorted: &[u64], p_milli_percent: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len() as u128;
    let rank = (u128::from(p_milli_percent) * n).div_ceil(100_000).clamp(1, n);
    sorted[(rank - 1) as usize]
}

/// What one worker saw; merged into the [`Summary`] at the end, so workers share nothing hot.
#[derive(Debug, Default)]
pub struct Recorder {
    pub latencies_us: Vec<u64>,
    pub status: BTreeMap<u16, u64>,
    pub versions: BTreeMap<String, u64>,
    pub errors: Errors,
}

impl Recorder {
    pub fn response(&mut self, status: u16, version: Option<&str>, latency: Duration) {
        self.latencies_us.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
        *self.status.entry(status).or_default() += 1;
        *self.versions.entry(version.unwrap_or(UNKNOWN_VERSION).to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        self.latencies_us.extend(other.latencies_us);
        for (status, n) in other.status {
            *self.status.entry(status).or_default() += n;
        }
        for (version, n) in other.versions {
            *self.versions.entry(version).or_default() += n;
        }
        self.errors.connect += other.errors.connect;
        self.errors.timeout += other.errors.timeout;
        self.errors.protocol += other.errors.protocol;
    }

    pub fn finish(mut self, url: &str, http2: bool, concurrency: u32, elapsed: Duration) -> Summary {
        let responses = self.latencies_us.len() as u64;
        let total = responses + self.errors.total();
        let successes = self.status.iter().filter(|(status, _)| **status < 400).map(|(_, n)| n).sum();
        let elapsed_seconds = elapsed.as_secs_f64();
        Summary {
            url: url.to_string(),
            protocol: if http2 { "HTTP/2" } else { "HTTP/1.1" }.to_string(),
            concurrency,
            total,
            responses,
            successes,
            errors: self.errors,
            latency_us: Latency::from_samples(&mut self.latencies_us),
            status: self.status,
            versions: self.versions,
            requests_per_second: if elapsed_seconds > 0.0 { total as f64 / elapsed_seconds } else { 0.0 },
            elapsed_seconds,
        }
    }
}

impl Summary {
    /// True when not a single request made it onto a connection: the target is unreachable,
    /// which the binary reports with a failing exit status.
    pub fn nothing_sent(&self) -> bool {
        self.errors.connect == self.total
    }
}

fn counts<K: fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    if map.is_empty() {
        return "-".to_string();
    }
    map.iter().map(|(k, n)| format!("{k}: {n}")).collect::<Vec<_>>().join(", ")
}

/// The human table printed without `--json`.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency_us;
        writeln!(f, "target        {} ({}, concurrency {})", self.url, self.protocol, self.concurrency)?;
        writeln!(f, "requests      {}", self.total)?;
        writeln!(f, "successes     {}", self.successes)?;
        writeln!(
            f,
            "errors        connect: {}, timeout: {}, protocol: {}",
            self.errors.connect, self.errors.timeout, self.errors.protocol
        )?;
        writeln!(f, "status        {}", counts(&self.status))?;
        writeln!(f, "versions      {}", counts(&self.versions))?;
        writeln!(
            f,
            "latency (us)  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        writeln!(f, "throughput    {:.1} requests/s", self.requests_per_second)?;
        writeln!(f, "elapsed       {:.3} s", self.elapsed_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&sorted, 50_000), 500);
        assert_eq!(percentile(&sorted, 90_000), 900);
        assert_eq!(percentile(&sorted, 99_000), 990);
        assert_eq!(percentile(&sorted, 99_900), 999);
        assert_eq!(percentile(&sorted, 100_000), 1000);
        assert_eq!(percentile(&sorted, 0), 1);
        assert_eq!(percentile(&[], 50_000), 0);
        assert_eq!(percentile(&[7], 99_900), 7);
        // Two samples: the median is the lower one, p90 the higher.
        assert_eq!(percentile(&[10, 20], 50_000), 10);
        assert_eq!(percentile(&[10, 20], 90_000), 20);
    }

    #[test]
    fn latency_sorts_first() {
        let mut samples = vec![5, 1, 4, 2, 3];
        let l = Latency::from_samples(&mut samples);
        assert_eq!(l, Latency { samples: 5, p50: 3, p90: 5, p99: 5, p999: 5, max: 5 });
    }

    #[test]
    fn merge_and_finish() {
        let ms = Duration::from_millis;
        let mut a = Recorder::default();
        a.response(200, Some("v1"), ms(1));
        a.response(503, Some("v2"), ms(2));
        a.errors.timeout = 1;
        let mut b = Recorder::default();
        b.response(200, None, ms(3));
        b.errors.connect = 2;
        a.merge(b);
        let s = a.finish("http://127.0.0.1/", true, 2, Duration::from_secs(2));
        assert_eq!((s.total, s.responses, s.successes), (6, 3, 2));
        assert_eq!(s.errors, Errors { connect: 2, timeout: 1, protocol: 0 });
        assert_eq!(s.status, BTreeMap::from([(200, 2), (503, 1)]));
        assert_eq!(s.versions, BTreeMap::from([("unknown".into(), 1), ("v1".into(), 1), ("v2".into(), 1)]));
        assert_eq!(s.latency_us.max, 3000);
        assert_eq!(s.requests_per_second, 3.0);
        assert!(!s.nothing_sent());
        let table = s.to_string();
        assert!(table.contains("status        200: 2, 503: 1"), "{table}");
    }

    #[test]
    fn json_round_trip() {
        let mut r = Recorder::default();
        r.response(200, Some("v1"), Duration::from_micros(120));
        let s = r.finish("http://127.0.0.1/", false, 1, Duration::from_secs(1));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["status"]["200"], 1);
        assert_eq!(json["latencyUs"]["p999"], 120);
        assert_eq!(json["errors"]["connect"], 0);
        let back: Summary = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn all_connect_errors_means_nothing_sent() {
        let r = Recorder { errors: Errors { connect: 3, ..Errors::default() }, ..Recorder::default() };
        assert!(r.finish("http://127.0.0.1/", false, 1, Duration::from_secs(1)).nothing_sent());
    }
}
