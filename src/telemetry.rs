//! Logging setup: JSON lines in production, pretty output in debug and dev.
//!
//! Lines go into one 64 KiB buffer in front of standard error, written out when it fills and
//! at least every 100 ms by a small flusher thread (and when the returned guard is dropped, at
//! exit). Under load many lines share one `write` system call, and no request wakes another
//! thread to log. The cost: on a crash, up to 100 ms of log lines can be lost.
//!
//! JSON lines are written by [`JsonLines`], field by field straight into the line, the shape of
//! `tracing-subscriber`'s JSON format (flattened fields, no spans) without its per-line map of
//! values: a line per request is on every request's path.

use std::fmt::{self, Write as _};
use std::io::{BufWriter, Stderr, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

const BUFFER_BYTES: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

static BUFFER: OnceLock<Mutex<BufWriter<Stderr>>> = OnceLock::new();

fn buffer() -> &'static Mutex<BufWriter<Stderr>> {
    BUFFER.get_or_init(|| Mutex::new(BufWriter::with_capacity(BUFFER_BYTES, std::io::stderr())))
}

/// The writer the subscriber gets for each line: the locked buffer.
pub struct LogWriter(MutexGuard<'static, BufWriter<Stderr>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

fn make_writer() -> LogWriter {
    // A poisoned lock only means a panic while writing a line; the buffer is still usable.
    LogWriter(buffer().lock().unwrap_or_else(|e| e.into_inner()))
}

/// Writes out whatever is buffered.
pub fn flush() {
    let _ = make_writer().flush();
}

/// Flushes the log buffer when dropped; keep it alive for the life of the program.
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush();
    }
}

/// Installs the global subscriber and starts the flusher. Later calls (tests make several)
/// change nothing and return `None`.
pub fn init(level: &str, format: LogFormat) -> Option<LogGuard> {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(make_writer);
    let installed = match format {
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    installed.ok()?;
    let _ = std::thread::Builder::new()
        .name("relay-log-flush".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            }
        });
    Some(LogGuard(()))
}

/// One JSON object per event: `timestamp`, `level`, the event's fields (`message` first) and
/// `target`.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_json_str(&mut writer, meta.target())?;
        writer.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = (|| {
                self.out.write_char(',')?;
                write_json_str(self.out, field.name())?;
                self.out.write_char(':')?;
                value(self.out)
            })();
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| write_json_str(w, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.field(field, |w| write!(w, "{value}"));
        } else {
            self.field(field, |w| w.write_str("null"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escaped(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

fn write_json_str(w: &mut impl fmt::Write, value: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(&mut *w).write_str(value)?;
    w.write_char('"')
}

/// Escapes what it is given as the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut clean = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f | 0x7f => "",
                _ => continue,
            };
            self.0.write_str(&s[clean..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            clean = i + 1;
        }
        self.0.write_str(&s[clean..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_json() {
        let mut out = String::new();
        let tricky = "a\"b\\c\nd\re\tf\u{1}g\u{7f}h é ✓";
        write_json_str(&mut out, tricky).unwrap();
        assert_eq!(out, r#""a\"b\\c\nd\re\tf\u0001g\u007fh é ✓""#);
        let back: String = serde_json::from_str(&out).unwrap();
        assert_eq!(back, tricky);
    }

    #[test]
    fn events_become_one_json_object_each() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let lines = std::sync::Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(JsonLines)
                .with_writer(move || SharedVec(sink.clone())),
        );
        tracing::subscriber::with_default(subscriber, || {
            let error = std::io::Error::other("disk \"full\"");
            tracing::info!(
                target: "relay::request",
                method = %"GET",
                status = 200_u16,
                latency_ms = 1.25,
                user_id = None::<&str>,
                tokens = Some(7_u64),
                negative = -3_i64,
                completed = true,
                error = %error,
                "request"
            );
            tracing::warn!(ratio = f64::NAN, "odd\nvalue");
        });
        let text = String::from_utf8(lines.lock().unwrap().clone()).unwrap();
        let mut parsed = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        let first = parsed.next().unwrap();
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["message"], "request");
        assert_eq!(first["target"], "relay::request");
        assert_eq!(first["method"], "GET");
        assert_eq!(first["status"], 200);
        assert_eq!(first["latency_ms"], 1.25);
        assert_eq!(first["tokens"], 7);
        assert_eq!(first["negative"], -3);
        assert_eq!(first["completed"], true);
        assert_eq!(first["error"], "disk \"full\"");
        assert!(first.get("user_id").is_none(), "absent values are left out");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        let keys: Vec<_> = first.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.first().map(String::as_str), Some("timestamp"));
        assert_eq!(keys.get(2).map(String::as_str), Some("message"));
        assert_eq!(keys.last().map(String::as_str), Some("target"));
        let second = parsed.next().unwrap();
        assert_eq!(second["level"], "WARN");
        assert_eq!(second["message"], "odd\nvalue");
        assert!(second["ratio"].is_null());
        assert!(parsed.next().is_none());
    }

    struct SharedVec(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for SharedVec {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
