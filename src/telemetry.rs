//! Logging setup: JSON lines in production, pretty output in debug and dev.
//!
//! Lines go into one 64 KiB buffer in front of standard error, written out when it fills and
//! at least every 100 ms by a small flusher thread (and when the returned guard is dropped, at
//! exit). Under load many lines share one `write` system call, and no request wakes another
//! thread to log. The cost: on a crash, up to 100 ms of log lines can be lost.

use std::io::{BufWriter, Stderr, Write};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

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
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
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
