//! Usage records, written off the request path.
//!
//! A request's end (`http::middleware`, where its log line is written) hands its record to
//! [`UsageSink::record`], which never waits: the record goes into a bounded queue, or, when
//! the queue is full (the database is slow or down), is counted as dropped and logged, rather
//! than holding the request. One task ([`UsageWriter`]) drains the queue in batches of up to
//! [`MAX_BATCH`] rows, one `INSERT` each. At shutdown the writer is told to stop, writes what
//! is queued and ends; `App::run` waits for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::context::Delivered;
use crate::store::{Store, UsageRecord};

/// A record as a request leaves it: complete, or (a stream that ended before its usage
/// arrived) still to be estimated from what it delivered.
#[derive(Debug)]
pub struct PendingRecord {
    /// The record; its token counts are zero while `delivered` is set.
    pub record: UsageRecord,
    /// What the stream delivered, when the counts are to be estimated.
    pub delivered: Option<Delivered>,
    /// The request body's size, for the prompt estimate.
    pub prompt_bytes: u64,
}

/// Records queued at most; beyond this they are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 16_384;
/// Rows per `INSERT`.
pub const MAX_BATCH: usize = 256;
/// How long the writer gathers records into one batch after the first arrives.
const GATHER: Duration = Duration::from_millis(100);
/// How long a failed batch waits before one more try.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Where requests leave their usage record. Cheap to clone.
#[derive(Clone)]
pub struct UsageSink {
    queue: mpsc::Sender<PendingRecord>,
    dropped: Arc<AtomicU64>,
}

impl UsageSink {
    /// Queues `record` without waiting; when the queue is full it is dropped and counted.
    pub fn record(&self, record: PendingRecord) {
        if self.queue.try_send(record).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            crate::measure::count_dropped_records(1);
            // One line for the 1st, 2nd, 4th, 8th… drop: visible, never a flood.
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "usage queue full or closed: record dropped");
            }
        }
    }

    /// Records dropped so far (for metrics).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The task that writes queued records; [`UsageWriter::flush_and_stop`] ends it.
pub struct UsageWriter {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl UsageWriter {
    /// Writes what is queued, then ends; waits at most `limit`.
    pub async fn flush_and_stop(self, limit: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(limit, self.task).await.is_err() {
            tracing::warn!("usage records still queued at shutdown were not all written");
        }
    }
}

/// Starts the writer on `store`.
pub fn start(store: Store) -> (UsageSink, UsageWriter) {
    let (queue, records) = mpsc::channel(QUEUE_CAPACITY);
    let (stop, stopped) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(write_loop(store, records, stopped, dropped.clone()));
    (UsageSink { queue, dropped }, UsageWriter { stop, task })
}

async fn write_loop(
    store: Store,
    mut records: mpsc::Receiver<PendingRecord>,
    mut stopped: watch::Receiver<bool>,
    dropped: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut stopping = tokio::select! {
            n = records.recv_many(&mut batch, MAX_BATCH) => n == 0,
            _ = stopped.wait_for(|stop| *stop) => true,
        };
        if !stopping && batch.len() < MAX_BATCH {
            // Gather for a moment: one transaction for many records costs far less than one
            // each. Asleep meanwhile, not waiting on the queue: woken by every record, this
            // task ran once a request (about 1,000 instructions each, issue 14).
            stopping = tokio::select! {
                _ = tokio::time::sleep(GATHER) => false,
                _ = stopped.wait_for(|stop| *stop) => true,
            };
            while batch.len() < MAX_BATCH {
                match records.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
        }
        if stopping {
            // No more records from now on (a late one is counted as dropped by its sender);
            // write every one already queued, then end.
            records.close();
            write(&store, &mut batch, &dropped, false).await;
            while records.recv_many(&mut batch, MAX_BATCH).await > 0 {
                write(&store, &mut batch, &dropped, false).await;
            }
            return;
        }
        write(&store, &mut batch, &dropped, true).await;
    }
}

/// The longest wait between two tries of a batch while the database is down.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// Estimates what needs it, writes `batch` and empties it. While the database is down the
/// batch is retried with a growing wait (the queue fills meanwhile, and what does not fit is
/// dropped and counted); at shutdown (`patient` false) it is tried twice. A batch given up is
/// counted as dropped.
async fn write(store: &Store, batch: &mut Vec<PendingRecord>, dropped: &AtomicU64, patient: bool) {
    if batch.is_empty() {
        return;
    }
    let pending = std::mem::take(batch);
    let records = if pending.iter().any(|p| p.delivered.is_some()) {
        // Tokenizing is CPU work: on the blocking pool, never on the runtime's threads.
        match tokio::task::spawn_blocking(|| pending.into_iter().map(complete).collect()).await {
            Ok(records) => records,
            Err(err) => {
                tracing::error!(error = %err, "usage estimate failed");
                return;
            }
        }
    } else {
        pending.into_iter().map(|p| p.record).collect::<Vec<_>>()
    };
    for record in &records {
        crate::measure::count_tokens(
            &record.model,
            record.prompt_tokens,
            record.completion_tokens,
        );
    }
    let mut wait = RETRY_AFTER;
    let mut tries = 0;
    loop {
        tries += 1;
        match store.insert_usage(&records).await {
            Ok(()) => return,
            Err(err) if patient || tries < 2 => {
                if tries == 1 {
                    tracing::warn!(error = %err, records = records.len(), "usage records not written yet; retrying");
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            }
            Err(err) => {
                dropped.fetch_add(records.len() as u64, Ordering::Relaxed);
                crate::measure::count_dropped_records(records.len() as u64);
                tracing::error!(error = %err, records = records.len(), "usage records could not be written");
                return;
            }
        }
    }
}

/// The record, with its estimate filled in when it needs one.
fn complete(pending: PendingRecord) -> UsageRecord {
    let mut record = pending.record;
    if let Some(delivered) = pending.delivered {
        // A tokenizer failure (a panic) costs this record's estimate, never the batch.
        let counted = std::panic::catch_unwind(|| estimate_completion(&delivered));
        record.completion_tokens =
            counted.unwrap_or_else(|_| delivered.bytes.div_ceil(BYTES_PER_TOKEN));
        record.prompt_tokens = pending.prompt_bytes.div_ceil(BYTES_PER_TOKEN);
    }
    record
}

/// Bytes per token assumed for a prompt whose usage never arrived: OpenAI's rule of thumb for
/// English text (the body's JSON syntax makes this an overestimate of its text).
pub const BYTES_PER_TOKEN: u64 = 4;

/// The tokens of a stream's delivered text, counted with o200k_base (the encoding of the
/// GPT-4o and later families), scaled up when more was delivered than was kept.
pub fn estimate_completion(delivered: &Delivered) -> u64 {
    if delivered.bytes == 0 {
        return 0;
    }
    let counted = tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(&delivered.text)
        .len() as u64;
    let kept = delivered.text.len() as u64;
    if kept == 0 || kept >= delivered.bytes {
        return counted.max(1);
    }
    // Only the first part was kept: scale its count to everything delivered.
    (counted * delivered.bytes).div_ceil(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_count_tokens_and_scale_past_the_kept_text() {
        let whole = Delivered {
            text: "hello world, hello world".into(),
            bytes: 24,
        };
        let counted = estimate_completion(&whole);
        assert!((4..=8).contains(&counted), "{counted}");
        // Twice as much delivered as kept: twice the count.
        let half = Delivered {
            text: whole.text.clone(),
            bytes: 48,
        };
        assert_eq!(estimate_completion(&half), 2 * counted);
        assert_eq!(estimate_completion(&Delivered::default()), 0);
    }
}
