//! What every accept loop does when accept(2) fails. The failures that matter (`EMFILE`,
//! `ENFILE`, `ENOMEM`) last until connections close, and the listener stays readable all the
//! while: a loop that simply tried again would spin a core at 100 % and starve the very
//! connections whose closing would end it. So the loop pauses before the next try, and says
//! so — once, then at most once a second with a count, not 20 lines a second.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How long a client may take to complete the TLS handshake (and, for HBONE, the HTTP/2
/// preface) on a server's port. Without a bound, a client that connects and sends nothing
/// would hold a task and a file descriptor for good, and enough of them would close the port
/// to everyone. A mesh peer completes both in milliseconds.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections from one source address that may be in their handshakes at once. A mesh peer
/// pools its HBONE connections and finishes each handshake in milliseconds, so it never comes
/// near; one misbehaving client that opens connections and never finishes them is held to
/// this many descriptors and tasks (each for at most [`HANDSHAKE_TIMEOUT`]) instead of
/// every descriptor the proxy has.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 128;

/// Connections still in their handshakes, per source address.
#[derive(Debug)]
pub struct Handshakes {
    limit: usize,
    pending: Mutex<HashMap<IpAddr, usize>>,
    refusals: Mutex<Throttle>,
    /// Connections closed at accept since start.
    refused: AtomicU64,
}

/// The Prometheus counter of [`Handshakes::refused`].
pub const REFUSED_METRIC: &str = "warren_hbone_handshake_limit_refused_total";

impl Handshakes {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            pending: Mutex::default(),
            refusals: Mutex::default(),
            refused: AtomicU64::new(0),
        })
    }

    /// Connections closed at accept because their source had its most pending handshakes.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// [`Self::refused`] as a Prometheus counter, for a proxy's `/metrics`.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP {REFUSED_METRIC} HBONE connections closed at accept: their source already had {} in their TLS and HTTP/2 handshakes.\n# TYPE {REFUSED_METRIC} counter\n{REFUSED_METRIC} {}\n",
            self.limit,
            self.refused()
        )
    }

    /// A slot for one more connection from `source` until its handshakes end (the slot drops),
    /// or `Err` with a line for the log when one is due (at most one a second) if the source
    /// already has [`Self::limit`](MAX_HANDSHAKES_PER_SOURCE) pending.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<HandshakeSlot, Option<String>> {
        {
            let mut pending = self.pending.lock().expect("poisoned");
            let count = pending.entry(source).or_default();
            if *count < self.limit {
                *count += 1;
                return Ok(HandshakeSlot { handshakes: self.clone(), source });
            }
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        let refused = self.refusals.lock().expect("poisoned").note(Instant::now());
        Err(refused.map(|n| {
            format!(
                "closed {n} connection(s) from {source} at once: it already has {} that have not finished their TLS and HTTP/2 handshakes (the most one source may have; each is let go after {} s)",
                self.limit,
                HANDSHAKE_TIMEOUT.as_secs()
            )
        }))
    }

    /// Sources with connections in their handshakes now.
    pub fn sources(&self) -> usize {
        self.pending.lock().expect("poisoned").len()
    }
}

/// One connection's place among its source's pending handshakes.
#[derive(Debug)]
pub struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut pending = self.handshakes.pending.lock().expect("poisoned");
        if let Some(count) = pending.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.source);
            }
        }
    }
}

/// How long an accept loop waits after a failure before it tries again.
pub const PAUSE: Duration = Duration::from_millis(50);
/// How often a persisting failure is reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Reports of something that can happen many times a second: the first at once, then at
/// most one per [`REPORT_EVERY`], each with how many happened since the last.
#[derive(Debug, Default)]
pub struct Throttle {
    last_report: Option<Instant>,
    since_report: u64,
}

impl Throttle {
    /// Counts one occurrence at `now`; when a report is due, how many it covers.
    pub fn note(&mut self, now: Instant) -> Option<u64> {
        self.since_report += 1;
        if self.last_report.is_some_and(|last| now.duration_since(last) < REPORT_EVERY) {
            return None;
        }
        self.last_report = Some(now);
        Some(std::mem::take(&mut self.since_report))
    }
}

/// One accept loop's failures, reported through a [`Throttle`].
#[derive(Debug, Default)]
pub struct AcceptErrors {
    reports: Throttle,
}

impl AcceptErrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// After a failed accept: hands `report` a line for the log when one is due, then waits
    /// [`PAUSE`].
    pub async fn back_off(&mut self, error: &io::Error, report: impl FnOnce(&str)) {
        if let Some(line) = self.failed_at(error, Instant::now()) {
            report(&line);
        }
        tokio::time::sleep(PAUSE).await;
    }

    /// Counts a failure at `now`; the line to log, when one is due.
    fn failed_at(&mut self, error: &io::Error, now: Instant) -> Option<String> {
        let first = self.reports.last_report.is_none();
        let count = self.reports.note(now)?;
        let times = if first { String::new() } else { format!(" ({count} times in the last second)") };
        let hint = match error.raw_os_error() {
            Some(libc::EMFILE) => {
                "; the process is out of file descriptors: raise its open-files limit (ulimit -n, the container runtime's LimitNOFILE)"
            }
            Some(libc::ENFILE) => "; the node is out of file descriptors (fs.file-max)",
            _ => "",
        };
        Some(format!(
            "accepting a connection failed{times}: {error}{hint}; trying again every {} ms",
            PAUSE.as_millis()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_is_held_to_its_pending_handshakes_and_others_are_not() {
        let handshakes = Handshakes::new(3);
        let (greedy, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let held: Vec<HandshakeSlot> = (0..3).map(|_| handshakes.admit(greedy).unwrap()).collect();
        let refused = handshakes.admit(greedy).unwrap_err().expect("the first refusal is reported");
        assert!(
            refused.contains("from 10.0.0.1") && refused.contains("3 that have not finished"),
            "{refused}"
        );
        assert_eq!(handshakes.admit(greedy).unwrap_err(), None, "the next within the second is only counted");
        let _other = handshakes.admit(other).expect("another source is unaffected");
        // A finished handshake frees its place; all of them, the source's entry.
        drop(held);
        let again = handshakes.admit(greedy).expect("room again once handshakes end");
        drop(again);
        drop(_other);
        assert_eq!(handshakes.sources(), 0);
        // Every refusal counted, reported or not.
        assert_eq!(handshakes.refused(), 2);
        assert!(handshakes.render_metrics().ends_with(&format!("\n{REFUSED_METRIC} 2\n")));
    }

    #[test]
    fn a_lasting_failure_is_reported_once_a_second_with_a_count() {
        let mut errors = AcceptErrors::new();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = Instant::now();
        let first = errors.failed_at(&emfile, t0).expect("the first failure is reported");
        assert!(first.contains("out of file descriptors") && first.contains("ulimit -n"), "{first}");
        assert!(!first.contains("times"), "{first}");
        for i in 1..20 {
            assert_eq!(errors.failed_at(&emfile, t0 + PAUSE * i), None, "reported again within the second");
        }
        let again = errors.failed_at(&emfile, t0 + REPORT_EVERY).expect("reported after a second");
        assert!(again.contains("(20 times in the last second)"), "{again}");
        let other =
            errors.failed_at(&io::Error::from_raw_os_error(libc::ENOMEM), t0 + REPORT_EVERY * 2).unwrap();
        assert!(!other.contains("file descriptors"), "{other}");
    }

    #[tokio::test(start_paused = true)]
    async fn it_waits_before_the_next_try() {
        let mut errors = AcceptErrors::new();
        let started = tokio::time::Instant::now();
        let mut reports = Vec::new();
        errors.back_off(&io::Error::from_raw_os_error(libc::EMFILE), |l| reports.push(l.to_string())).await;
        errors.back_off(&io::Error::from_raw_os_error(libc::EMFILE), |l| reports.push(l.to_string())).await;
        assert_eq!(started.elapsed(), PAUSE * 2);
        assert_eq!(reports.len(), 1);
    }
}
