//! Logging for ztunnel and the waypoint: `tracing` to stderr, text or JSON, filtered by
//! `WARREN_LOG`, with lines written in batches. The lines an event loop produces while it
//! works are kept in memory and written with one `write` when the loop is about to sleep
//! (tokio's `on_thread_park` calls [`flush`]), as Envoy buffers its access logs. At 1,000
//! requests/s the waypoint wrote its access-log line with a `write` of its own per request,
//! ~3 % of its CPU, and each write woke whatever reads its stderr (on a node, the container
//! runtime's log pipe); ztunnel writes one line per connection.
//!
//! Nothing an operator needs waits: warnings and errors are written at once (after what is
//! buffered, so the order holds); so is every line of a thread that does not flush when it
//! parks (a blocking-pool or other thread: nothing would write its lines later); any line is
//! written within [`MAX_DELAY`] of being logged while the process logs, and the buffer when it
//! reaches [`MAX_BUFFERED`]; the rest at exit and before a panic's message.

use std::{
    cell::Cell,
    io::{self, Write},
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Buffered bytes that are written at once.
pub const MAX_BUFFERED: usize = 64 * 1024;
/// A line logged this long after the oldest buffered one writes the buffer out.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

struct Pending {
    bytes: Vec<u8>,
    /// When the oldest buffered line was logged.
    since: Option<Instant>,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending { bytes: Vec::new(), since: None });

thread_local! {
    /// Whether this thread calls [`flush`] when it parks (a runtime worker): only such a
    /// thread's lines wait in the buffer.
    static FLUSHES_WHEN_PARKING: Cell<bool> = const { Cell::new(false) };
}

/// Sets up `tracing` for a proxy: stderr through the buffer, one line per event as text or
/// as a JSON object, filtered by `WARREN_LOG` (`info` by default). The runtime must call
/// [`flush`] from `on_thread_park`, and the process at exit.
pub fn init(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    flush_on_panic();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(BufferedStderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Writes what is buffered: when an event loop parks (pass it to tokio's `on_thread_park`;
/// the calling thread's lines are buffered from then on), at exit, before a panic's message.
pub fn flush() {
    FLUSHES_WHEN_PARKING.set(true);
    write_out(&mut PENDING.lock().unwrap_or_else(|e| e.into_inner()));
}

fn write_out(pending: &mut Pending) {
    if !pending.bytes.is_empty() {
        // Logging has nowhere to report its own failure.
        let _ = io::stderr().lock().write_all(&pending.bytes);
        pending.bytes.clear();
    }
    pending.since = None;
}

/// Writes the buffer out before a panic's message (which goes straight to stderr).
fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
}

/// Where `tracing_subscriber::fmt` writes: stderr, through the buffer.
#[derive(Clone, Copy, Default)]
pub struct BufferedStderr;

/// One event's line (the formatter writes it whole).
pub struct LineWriter {
    /// A warning or an error: written at once.
    urgent: bool,
}

impl Write for LineWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        pending.bytes.extend_from_slice(line);
        let now = Instant::now();
        let since = *pending.since.get_or_insert(now);
        if self.urgent
            || !FLUSHES_WHEN_PARKING.get()
            || pending.bytes.len() >= MAX_BUFFERED
            || now.duration_since(since) >= MAX_DELAY
        {
            write_out(&mut pending);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter { urgent: urgent(meta.level()) }
    }
}

/// Warnings and errors are written at once. (More verbose levels compare greater.)
fn urgent(level: &Level) -> bool {
    *level <= Level::WARN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_lines_wait_for_a_flush_warnings_do_not() {
        // One test touches the process-wide buffer, so the steps below do not race.
        let buffered = || PENDING.lock().unwrap().bytes.len();
        // A thread that never flushed (not an event loop) has its lines written at once.
        std::thread::spawn(move || {
            LineWriter { urgent: false }.write_all(b"from another thread\n").unwrap();
            assert_eq!(buffered(), 0, "a thread that does not flush when parking buffered a line");
        })
        .join()
        .unwrap();
        flush();
        LineWriter { urgent: false }.write_all(b"{\"target\":\"access\"}\n").unwrap();
        assert_eq!(buffered(), 20, "an info line is kept");
        LineWriter { urgent: true }.write_all(b"warning\n").unwrap();
        assert_eq!(buffered(), 0, "a warning writes out the buffer, itself after it");
        LineWriter { urgent: false }.write_all(&vec![b'x'; MAX_BUFFERED]).unwrap();
        assert_eq!(buffered(), 0, "a full buffer is written");
        LineWriter { urgent: false }.write_all(b"late\n").unwrap();
        PENDING.lock().unwrap().since = Some(Instant::now() - MAX_DELAY);
        LineWriter { urgent: false }.write_all(b"later\n").unwrap();
        assert_eq!(buffered(), 0, "a line past MAX_DELAY after the oldest writes the buffer");
        LineWriter { urgent: false }.write_all(b"last\n").unwrap();
        flush();
        assert_eq!(buffered(), 0);
        assert!(urgent(&Level::ERROR) && urgent(&Level::WARN));
        assert!(!urgent(&Level::INFO) && !urgent(&Level::DEBUG) && !urgent(&Level::TRACE));
    }
}
