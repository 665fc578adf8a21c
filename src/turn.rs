//! Writes to a peer held to the end of the runtime's turn while other requests are being
//! served.
//!
//! A proxy at full load finds its peers (the upstream, the clients) asleep at nearly every
//! write, and waking one on another core is the dearest part of the write (perf:
//! `sock_def_readable` under `writev`). A request about to write a request upstream or an
//! answer to its client therefore yields once first: the other tasks ready in the same turn
//! reach their writes, and the peer gets them back to back and wakes once for several. Alone
//! on one core, 40,000 requests at 64 connections, alternated with nginx: 45.5 → 38–39.5 µs of
//! CPU a request; with the other changes of issue 14's night, 1.71 → 1.44 × nginx's (see
//! `bench/README.md`). A request served alone has nobody to wait for and does not yield (a
//! yield costs it an `epoll_wait` and a poll of its task).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests being served by this process.
static SERVING: AtomicUsize = AtomicUsize::new(0);

/// A request being served: counted while this lives.
#[derive(Debug)]
pub struct Serving(());

impl Serving {
    /// Counts a request from now until this is dropped.
    pub fn start() -> Serving {
        SERVING.fetch_add(1, Ordering::Relaxed);
        Serving(())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Called before a write to a peer: yields once when other requests are being served (see
/// the module documentation).
pub async fn before_write() {
    if SERVING.load(Ordering::Relaxed) > 1 {
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::{Serving, before_write};

    /// With another request being served, a write waits until the other tasks ready in this
    /// turn have run. (That a request served alone does not wait is not checked here: other
    /// tests in this process serve requests at the same time.)
    #[tokio::test(flavor = "current_thread")]
    async fn a_write_waits_for_the_tasks_ready_in_the_turn_when_others_are_served() {
        let _this = Serving::start();
        let _other = Serving::start();
        let ran = Arc::new(AtomicBool::new(false));
        let other = tokio::spawn({
            let ran = ran.clone();
            async move { ran.store(true, Ordering::SeqCst) }
        });
        assert!(!ran.load(Ordering::SeqCst));
        before_write().await;
        assert!(ran.load(Ordering::SeqCst), "the write went first");
        other.await.unwrap();
    }
}
