//! Logging for ztunnel and the waypoint: `tracing` to stderr, text or JSON (see
//! [`LineFormat`]), filtered by `WARREN_LOG`, with lines written in batches, as Envoy buffers
//! its access logs. Lines are kept in memory and a background thread writes them with one
//! `write` at most [`MAX_DELAY`] after the oldest was logged. At 1,000 requests/s the
//! waypoint used to write each access-log line itself when its event loop went idle, ~0.7
//! `write`s per request and ~3 % of its CPU, and each write woke whatever reads its stderr
//! (on a node, the container runtime's log pipe): now ~10 writes a second.
//!
//! Nothing an operator needs waits: warnings and errors are written at once (after what is
//! buffered, so the order holds); the buffer is written when it reaches [`MAX_BUFFERED`],
//! and at exit and before a panic's message. No event loop ever waits for stderr to take a
//! batch (a slow log reader blocks the writing thread only), except when it logs a warning.

use std::{
    io::{self, Write},
    sync::{
        Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

mod format;
pub use format::LineFormat;

/// Buffered bytes that are written at once.
pub const MAX_BUFFERED: usize = 64 * 1024;
/// How long a line may wait in the buffer.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

struct Pending {
    bytes: Vec<u8>,
    /// When the oldest buffered line was logged.
    since: Option<Instant>,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending { bytes: Vec::new(), since: None });
/// Wakes the writer thread when a line lands in an empty buffer.
static LINE_WAITING: Condvar = Condvar::new();
/// Held while a batch goes to stderr, so that batches are written in the order they were
/// taken.
static WRITING: Mutex<()> = Mutex::new(());
/// Whether the writer thread runs: without it (before [`init`]) lines are written at once.
static WRITER_RUNNING: AtomicBool = AtomicBool::new(false);

/// How log lines are written (`--log-format`, `WARREN_LOG_FORMAT` of both proxies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up `tracing` for a proxy: stderr through the buffer, one line per event as text or
/// as a JSON object, filtered by `WARREN_LOG` (`info` by default). The process calls
/// [`flush`] at exit.
pub fn init(format: LogFormat) {
    let json = format == LogFormat::Json;
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    flush_on_panic();
    start_writer();
    let ansi = !json && std::io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(BufferedStderr)
        // (Span fields are formatted by the builder's field formatter, coloured or not.)
        .with_ansi(ansi)
        .event_format(LineFormat { json, ansi });
    if json {
        // Span fields recorded as JSON objects, which the line format embeds.
        builder.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new()).init();
    } else {
        builder.init();
    }
}

/// Starts the thread that writes buffered lines out at most [`MAX_DELAY`] after the oldest
/// was logged.
fn start_writer() {
    if WRITER_RUNNING.swap(true, Ordering::SeqCst) {
        return;
    }
    let started = std::thread::Builder::new().name("log-writer".into()).spawn(|| {
        loop {
            let mut pending = lock(&PENDING);
            let due = loop {
                match pending.since {
                    Some(since) => break since + MAX_DELAY,
                    None => pending = LINE_WAITING.wait(pending).unwrap_or_else(|e| e.into_inner()),
                }
            };
            drop(pending);
            let now = Instant::now();
            if due > now {
                // Looked at again after the sleep: a warning may have written this batch
                // meanwhile, and the buffer's oldest line now be a newer one.
                std::thread::sleep(due - now);
                continue;
            }
            flush();
        }
    });
    if started.is_err() {
        // No thread: every line is written as it comes.
        WRITER_RUNNING.store(false, Ordering::SeqCst);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes what is buffered (at exit, before a panic's message; the writer thread's batches).
pub fn flush() {
    write_out(None);
}

/// Writes the buffer, with `line` appended, to stderr.
fn write_out(line: Option<&[u8]>) {
    let _order = lock(&WRITING);
    let batch = {
        let mut pending = lock(&PENDING);
        if let Some(line) = line {
            pending.bytes.extend_from_slice(line);
        }
        pending.since = None;
        std::mem::take(&mut pending.bytes)
    };
    if !batch.is_empty() {
        // Logging has nowhere to report its own failure.
        let _ = io::stderr().lock().write_all(&batch);
    }
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
        if self.urgent || !WRITER_RUNNING.load(Ordering::Relaxed) {
            write_out(Some(line));
            return Ok(line.len());
        }
        let mut pending = lock(&PENDING);
        pending.bytes.extend_from_slice(line);
        if pending.bytes.len() >= MAX_BUFFERED {
            drop(pending);
            flush();
        } else if pending.since.is_none() {
            pending.since = Some(Instant::now());
            LINE_WAITING.notify_one();
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
    fn info_lines_wait_for_the_writer_warnings_do_not() {
        // One test touches the process-wide buffer, so the steps below do not race.
        let buffered = || PENDING.lock().unwrap().bytes.len();
        // Without the writer thread, lines are written at once.
        LineWriter { urgent: false }.write_all(b"before the writer\n").unwrap();
        assert_eq!(buffered(), 0, "a line was kept with nothing to write it later");
        start_writer();
        LineWriter { urgent: false }.write_all(b"{\"target\":\"access\"}\n").unwrap();
        assert_eq!(buffered(), 20, "an info line is kept");
        LineWriter { urgent: true }.write_all(b"warning\n").unwrap();
        assert_eq!(buffered(), 0, "a warning writes out the buffer, itself after it");
        LineWriter { urgent: false }.write_all(&vec![b'x'; MAX_BUFFERED]).unwrap();
        assert_eq!(buffered(), 0, "a full buffer is written");
        let logged = Instant::now();
        LineWriter { urgent: false }.write_all(b"late\n").unwrap();
        assert_eq!(buffered(), 5);
        while buffered() > 0 {
            assert!(logged.elapsed() < MAX_DELAY * 20, "the writer thread did not write the line");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            logged.elapsed() >= MAX_DELAY,
            "written after {:?}, before its batch was due",
            logged.elapsed()
        );
        assert!(urgent(&Level::ERROR) && urgent(&Level::WARN));
        assert!(!urgent(&Level::INFO) && !urgent(&Level::DEBUG) && !urgent(&Level::TRACE));
    }
}
