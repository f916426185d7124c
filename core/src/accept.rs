//! What every accept loop does when accept(2) fails. The failures that matter (`EMFILE`,
//! `ENFILE`, `ENOMEM`) last until connections close, and the listener stays readable all the
//! while: a loop that simply tried again would spin a core at 100 % and starve the very
//! connections whose closing would end it. So the loop pauses before the next try, and says
//! so — once, then at most once a second with a count, not 20 lines a second.

use std::{
    io,
    time::{Duration, Instant},
};

/// How long a client may take to complete the TLS handshake (and, for HBONE, the HTTP/2
/// preface) on a server's port. Without a bound, a client that connects and sends nothing
/// would hold a task and a file descriptor for good, and enough of them would close the port
/// to everyone. A mesh peer completes both in milliseconds.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
