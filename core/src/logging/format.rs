//! The line format of Warren's logs: one line per event, as text or as a JSON object, with
//! the shape of `tracing_subscriber`'s `Full` and flattened `Json` formats (the fields of a
//! `log` record are read as its target, not printed). Written here because the waypoint logs
//! a line per request: `tracing_subscriber`'s JSON formatter went through `serde_json` with an
//! allocation per `Display` field and formatted the date anew for every line, ~10 % of the
//! waypoint's CPU at 1,000 requests/s. This one writes fields straight into the line, escaping
//! on the way, and formats the date once per second.

use std::{
    cell::RefCell,
    fmt::{self, Write as _},
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, format::Writer},
    registry::LookupSpan,
};

/// Formats events as text (`json: false`) or JSON lines.
pub struct LineFormat {
    pub json: bool,
    /// Colours the level (text only; set when stderr is a terminal).
    pub ansi: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Formatted into a plain `String` first, so that a line's hundred-odd small writes are
        // appends rather than calls through `Writer`'s `dyn Write`; `out` gets one write.
        LINE.with(|cell| match cell.try_borrow_mut() {
            Ok(mut line) => {
                line.clear();
                self.format_line(ctx, &mut line, event)?;
                let written = out.write_str(&line);
                if line.capacity() > MAX_KEPT_LINE {
                    *line = String::new();
                }
                written
            }
            // Only if an event were formatted while another is (from a field's `Display`),
            // which `tracing` prevents today by not re-entering a subscriber.
            Err(_) => {
                let mut line = String::new();
                self.format_line(ctx, &mut line, event)?;
                out.write_str(&line)
            }
        })
    }
}

thread_local! {
    /// The line being formatted on this thread.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A line buffer that grew past this (one huge line) is not kept for the next.
const MAX_KEPT_LINE: usize = 64 * 1024;

impl LineFormat {
    fn format_line<S, N>(
        &self,
        ctx: &FmtContext<'_, S, N>,
        out: &mut String,
        event: &Event<'_>,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        let meta = event.metadata();
        // A `log` record's target and place are fields of one callsite per level.
        let log_target = if meta.target() == "log" { LogTarget::of(event) } else { None };
        let target = log_target.as_deref().unwrap_or(meta.target());
        if self.json {
            out.write_str("{\"timestamp\":\"")?;
            write_timestamp(out)?;
            out.push_str("\",\"level\":\"");
            out.push_str(meta.level().as_str());
            out.push('"');
            event.record(&mut JsonFields { out, result: Ok(()) });
            out.write_str(",\"target\":")?;
            write_json_str(out, target)?;
            if let Some(scope) = ctx.event_scope() {
                out.write_str(",\"spans\":[")?;
                for (i, span) in scope.from_root().enumerate() {
                    out.write_str(if i == 0 { "{\"name\":" } else { ",{\"name\":" })?;
                    write_json_str(out, span.name())?;
                    // The span's fields, recorded by `JsonFields` as an object.
                    let ext = span.extensions();
                    let fields = ext.get::<FormattedFields<N>>().map(|f| f.fields.as_str()).unwrap_or("");
                    if let Some(inner) = fields.strip_prefix('{').and_then(|f| f.strip_suffix('}'))
                        && !inner.is_empty()
                    {
                        write!(out, ",{inner}")?;
                    }
                    out.write_char('}')?;
                }
                out.write_char(']')?;
            }
            out.write_str("}\n")
        } else {
            write_timestamp(out)?;
            let level = meta.level();
            if self.ansi {
                write!(out, " {}{level:>5}\x1b[0m ", colour(level))?;
            } else {
                write!(out, " {level:>5} ")?;
            }
            if let Some(scope) = ctx.event_scope() {
                for span in scope.from_root() {
                    out.write_str(span.name())?;
                    let ext = span.extensions();
                    if let Some(fields) = ext.get::<FormattedFields<N>>()
                        && !fields.fields.is_empty()
                    {
                        write!(out, "{{{}}}", fields.fields)?;
                    }
                    out.write_char(':')?;
                }
                out.write_char(' ')?;
            }
            write!(out, "{target}:")?;
            let mut fields = TextFields { out, result: Ok(()) };
            event.record(&mut fields);
            fields.result?;
            out.write_char('\n')
        }
    }
}

fn colour(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "\x1b[31m",
        Level::WARN => "\x1b[33m",
        Level::INFO => "\x1b[32m",
        Level::DEBUG => "\x1b[34m",
        Level::TRACE => "\x1b[35m",
    }
}

/// `log.target` of a `log` record.
struct LogTarget(Option<String>);

impl LogTarget {
    fn of(event: &Event<'_>) -> Option<String> {
        let mut target = LogTarget(None);
        event.record(&mut target);
        target.0
    }
}

impl Visit for LogTarget {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "log.target" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
}

/// The `log.*` fields of a `log` record (its target, module, file and line), not printed.
fn is_log_metadata(field: &Field) -> bool {
    field.name().starts_with("log.")
}

/// Fields as `,"name":value` (strings and formatted values escaped, numbers and booleans
/// bare).
struct JsonFields<'a> {
    out: &'a mut String,
    result: fmt::Result,
}

impl JsonFields<'_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        let name = field.name();
        // Field names are identifiers almost always: written as they are, without a pass
        // through the escaper.
        if next_to_escape(name.as_bytes()).is_none() {
            self.out.push_str(",\"");
            self.out.push_str(name);
            self.out.push_str("\":");
        } else {
            self.out.push(',');
            write_json_str(self.out, name)?;
            self.out.push(':');
        }
        Ok(())
    }

    fn bare(&mut self, field: &Field, value: impl fmt::Display) {
        if self.result.is_ok() && !is_log_metadata(field) {
            self.result = self.key(field).and_then(|()| write!(self.out, "{value}"));
        }
    }

    fn unsigned(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() && !is_log_metadata(field) {
            self.result = self.key(field).map(|()| write_u64(self.out, value));
        }
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() && !is_log_metadata(field) {
            self.result = self.key(field).and_then(|()| write_json_str(self.out, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() && !is_log_metadata(field) {
            self.result = self.key(field).and_then(|()| {
                self.out.write_char('"')?;
                write!(JsonEscaped(self.out), "{value:?}")?;
                self.out.write_char('"')
            });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{}", ErrorChain(value)));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.unsigned(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        match u64::try_from(value) {
            Ok(value) => self.unsigned(field, value),
            Err(_) => self.bare(field, value),
        }
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.bare(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.bare(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.bare(field, value);
        } else {
            // JSON has no NaN or infinity (as serde_json writes them).
            self.bare(field, "null");
        }
    }
}

/// Fields as ` message name=value`: the message and formatted (`%`/`?`) values bare, strings
/// quoted (as `tracing_subscriber`'s text format does).
struct TextFields<'a> {
    out: &'a mut String,
    result: fmt::Result,
}

impl Visit for TextFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_debug(field, &value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || is_log_metadata(field) {
            return;
        }
        self.result = if field.name() == "message" {
            write!(self.out, " {value:?}")
        } else {
            write!(self.out, " {}={value:?}", field.name())
        };
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record_debug(field, &format_args!("{}", ErrorChain(value)));
    }
}

/// An error with its sources: `outer: inner: root`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// `s` as a JSON string, quotes included.
fn write_json_str(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    JsonEscaped(out).write_str(s)?;
    out.write_char('"')
}

/// Writes what it is given with JSON's string escapes (as serde_json: `"`, `\` and control
/// characters; everything else as is).
struct JsonEscaped<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for JsonEscaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let bytes = s.as_bytes();
        let mut start = 0;
        while let Some(found) = next_to_escape(&bytes[start..]) {
            let i = start + found;
            let b = bytes[i];
            // Escaped bytes are ASCII, so these slices fall on character boundaries.
            self.0.write_str(&s[start..i])?;
            match b {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                0x08 => self.0.write_str("\\b")?,
                0x0c => self.0.write_str("\\f")?,
                _ => write!(self.0, "\\u{b:04x}")?,
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// The first byte JSON must escape. Almost nothing in a log line does, so the search reads
/// eight bytes at a time as one word and finds the bytes that need escaping with a few integer
/// operations per word (a byte-at-a-time loop cost ~10 instructions a byte, the largest
/// single cost of a waypoint's access-log line).
fn next_to_escape(bytes: &[u8]) -> Option<usize> {
    let (words, rest) = bytes.as_chunks::<8>();
    for (n, word) in words.iter().enumerate() {
        let hits = escape_mask(u64::from_le_bytes(*word));
        if hits != 0 {
            // Little-endian: the lowest set bit is in the first matching byte.
            return Some(n * 8 + hits.trailing_zeros() as usize / 8);
        }
    }
    rest.iter().position(|&b| needs_escape(b)).map(|i| words.len() * 8 + i)
}

/// What JSON escapes (as serde_json does): `"`, `\` and control characters.
fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

const LOW_SEVEN: u64 = 0x7f7f_7f7f_7f7f_7f7f;

/// The high bit of every byte of `word` that JSON must escape set, every other bit clear.
fn escape_mask(word: u64) -> u64 {
    const EVERY_BYTE: u64 = 0x0101_0101_0101_0101;
    // Below 0x20: the top three bits are clear.
    let control = zero_bytes(word & (0xe0 * EVERY_BYTE));
    let quote = zero_bytes(word ^ (u64::from(b'"') * EVERY_BYTE));
    let backslash = zero_bytes(word ^ (u64::from(b'\\') * EVERY_BYTE));
    control | quote | backslash
}

/// The high bit of every zero byte of `word` set, every other bit clear. Exact for every byte
/// (no carries between bytes: the low seven bits are added apart from the high one).
fn zero_bytes(word: u64) -> u64 {
    !(((word & LOW_SEVEN) + LOW_SEVEN) | word | LOW_SEVEN)
}

/// Writes `n` in decimal without going through `core::fmt` (a number in a log line otherwise
/// costs a formatter, padding checks and a call per piece).
fn write_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[start..]).expect("decimal digits are ASCII"));
}

/// Writes `n` as exactly `width` decimal digits (zero-padded; `n` must fit).
fn write_padded(out: &mut String, n: u64, width: u32) {
    let mut place = 10u64.pow(width.saturating_sub(1));
    while place > 0 {
        out.push(char::from(b'0' + (n / place % 10) as u8));
        place /= 10;
    }
}

thread_local! {
    /// The last second formatted (`YYYY-MM-DDTHH:MM:SS`) and its Unix time.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Now in RFC 3339, UTC, to the microsecond: `2026-11-26T20:29:01.123456Z`.
fn write_timestamp(out: &mut String) -> fmt::Result {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with_borrow_mut(|(secs, text)| {
        if *secs != now.as_secs() {
            *secs = now.as_secs();
            text.clear();
            write_second(text, *secs)?;
        }
        out.push_str(text);
        out.push('.');
        write_padded(out, now.subsec_micros().into(), 6);
        out.push('Z');
        Ok(())
    })
}

/// Unix time `secs` as `YYYY-MM-DDTHH:MM:SS` (proleptic Gregorian calendar).
fn write_second(out: &mut impl fmt::Write, secs: u64) -> fmt::Result {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    write!(out, "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}", rest / 3600, rest / 60 % 60, rest % 60)
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's `civil_from_days`: the year
/// counted from March so that the leap day falls at its end.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing::{info, warn};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[derive(Debug)]
    enum Protocol {
        Http1,
    }

    /// One access-like line and a warning with an error chain, logged through `subscriber`.
    fn log_events() {
        let addr: std::net::SocketAddr = "10.0.0.1:4242".parse().unwrap();
        info!(
            target: "access",
            method = %"GET",
            path = "/a \"quoted\"\npath\\",
            protocol = ?Protocol::Http1,
            status = 200u16,
            duration_ms = 3u64,
            offset = -2i64,
            ratio = 0.5f64,
            retried = false,
            src = %addr,
            "request"
        );
        let err = std::io::Error::other("the root\tcause");
        warn!(error = &err as &(dyn std::error::Error + 'static), "it failed: {}", 7);
    }

    fn json_lines(text: &str) -> Vec<serde_json::Map<String, Value>> {
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap().as_object().unwrap().clone()).collect()
    }

    /// Logs an event of its own when it is formatted.
    struct LogsWhenShown;

    impl fmt::Display for LogsWhenShown {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            info!(inner = true, "logged while another line was formatted");
            f.write_str("shown")
        }
    }

    #[test]
    fn an_event_logged_while_a_line_is_formatted_does_not_disturb_it() {
        for json in [true, false] {
            let out = Captured::default();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(out.clone())
                .event_format(LineFormat { json, ansi: false })
                .finish();
            tracing::subscriber::with_default(subscriber, || info!(field = %LogsWhenShown, "outer"));
            // (`tracing` does not re-enter a subscriber on the same thread: the inner event is
            // dropped before it reaches the format.)
            let text = out.text();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(text.contains("outer") && text.contains("shown"), "{text}");
        }
    }

    #[test]
    fn json_lines_carry_what_tracing_subscribers_json_carries() {
        let ours = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .event_format(LineFormat { json: true, ansi: false })
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .finish();
        tracing::subscriber::with_default(subscriber, log_events);
        let theirs = Captured::default();
        let subscriber =
            tracing_subscriber::fmt().with_writer(theirs.clone()).json().flatten_event(true).finish();
        tracing::subscriber::with_default(subscriber, log_events);

        let (ours, theirs) = (json_lines(&ours.text()), json_lines(&theirs.text()));
        assert_eq!(ours.len(), 2);
        for (mut a, mut b) in ours.into_iter().zip(theirs) {
            let (ta, tb) = (a.remove("timestamp").unwrap(), b.remove("timestamp").unwrap());
            assert_eq!(ta.as_str().unwrap().len(), tb.as_str().unwrap().len(), "{ta} vs {tb}");
            assert_eq!(ta.as_str().unwrap()[..16], tb.as_str().unwrap()[..16], "the same minute");
            assert_eq!(a, b);
        }
    }

    #[test]
    fn text_lines_read_as_tracing_subscribers_do() {
        let events = || {
            log_events();
            let span = tracing::info_span!("conn", peer = "a");
            let _entered = span.enter();
            info!("inside");
        };
        let ours = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(ours.clone())
            .with_ansi(false)
            .event_format(LineFormat { json: false, ansi: false })
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let theirs = Captured::default();
        let subscriber = tracing_subscriber::fmt().with_writer(theirs.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, events);

        let (ours, theirs) = (ours.text(), theirs.text());
        assert_eq!(ours.lines().count(), 3, "{ours}");
        // `YYYY-MM-DDTHH:MM:SS.uuuuuuZ  INFO target: message fields`: the same after the time.
        for (a, b) in ours.lines().zip(theirs.lines()) {
            assert_eq!(a[..16], b[..16], "the same minute");
            assert_eq!(a[27..], b[27..]);
        }
        assert!(ours.contains(" path=\"/a \\\"quoted\\\"\\npath\\\\\" protocol=Http1 status=200 "), "{ours}");
    }

    #[test]
    fn json_escapes_control_characters_as_serde_json_does() {
        let mut out = String::new();
        write_json_str(&mut out, "a\u{1}b\u{7f}ü\"\\\r\u{8}\u{c}").unwrap();
        assert_eq!(out, serde_json::to_string("a\u{1}b\u{7f}ü\"\\\r\u{8}\u{c}").unwrap());
        // Long strings are searched 16 bytes at a time: escapes at and around block edges,
        // several in one block, and multi-byte characters across an edge.
        let mut long = "x".repeat(70);
        for (i, c) in [(0, '"'), (15, '\n'), (16, '\\'), (17, '\u{1f}'), (31, '"'), (47, '\t'), (69, '"')] {
            long.replace_range(i..i + 1, &c.to_string());
        }
        let long = format!("{long}ééé{}€", "y".repeat(13));
        out.clear();
        write_json_str(&mut out, &long).unwrap();
        assert_eq!(out, serde_json::to_string(&long).unwrap());
    }

    #[test]
    fn the_word_at_a_time_search_finds_the_first_byte_to_escape_as_a_byte_loop_does() {
        // Every byte value, alone in a run of plain bytes and followed by a quote, at every
        // position of the first three words and the tail after them; `needs_escape` a byte at
        // a time is the reference.
        for len in [1, 7, 8, 9, 16, 23, 24, 29] {
            for at in 0..len {
                for b in 0..=u8::MAX {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let expected = bytes.iter().position(|&b| needs_escape(b));
                    assert_eq!(next_to_escape(&bytes), expected, "byte {b:#04x} at {at} of {len}");
                    if at + 1 < len {
                        bytes[at + 1] = b'"';
                        let expected = bytes.iter().position(|&b| needs_escape(b));
                        assert_eq!(
                            next_to_escape(&bytes),
                            expected,
                            "byte {b:#04x} at {at} of {len}, quote after"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn numbers_are_written_as_core_fmt_writes_them() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut out = String::new();
            write_u64(&mut out, n);
            assert_eq!(out, n.to_string());
        }
        for (n, width, text) in [(0, 6, "000000"), (42, 6, "000042"), (999_999, 6, "999999"), (7, 2, "07")] {
            let mut out = String::new();
            write_padded(&mut out, n, width);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn seconds_format_as_utc_dates() {
        let at = |secs| {
            let mut s = String::new();
            write_second(&mut s, secs).unwrap();
            s
        };
        assert_eq!(at(0), "1970-01-01T00:00:00");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(at(951_868_799), "2000-02-29T23:59:59");
        assert_eq!(at(951_868_800), "2000-03-01T00:00:00");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20");
        assert_eq!(at(1_709_164_800), "2024-02-29T00:00:00");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00");
        assert_eq!(at(4_107_542_400), "2100-03-01T00:00:00");
    }
}
