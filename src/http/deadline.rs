//! The request body's deadline (`REQUEST_BODY_TIMEOUT_SECONDS`).
//!
//! The accept loop (`app.rs`) wraps every request body in a [`DeadlineBody`] whose deadline is
//! counted from the moment the request's head has arrived. The deadline is for the whole body,
//! not for each read: a client trickling one byte every few seconds is cut at the same moment
//! as one that sends nothing. Once it has passed, reading the body fails with
//! [`BodyTimedOut`], which `extract::read_body` answers with `408` and `Connection: close`;
//! the server (`crate::server`) then closes the connection, since the body was not read to its
//! end.
//!
//! Only the request body has a deadline: responses (streams of any length) are not touched,
//! and a keep-alive connection's next request gets a deadline of its own.
//!
//! A body that is already there when it is read (small bodies arrive with their head) never
//! waits, and then costs no timer: the timer is started the first time a read has to wait.

use std::error::Error as StdError;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The error a [`DeadlineBody`] fails with once its deadline has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl StdError for BodyTimedOut {}

/// Whether `err`, or any error it wraps, is a [`BodyTimedOut`] (axum wraps body errors in
/// its own, and its rejections wrap those).
pub fn is_timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        current = err.source();
    }
    false
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyTimedOut`] once `deadline` has passed.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: B,
        deadline: Instant,
        // Started the first time a read has to wait.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> DeadlineBody<B> {
    /// `inner`, to be read completely before `deadline`.
    pub fn new(inner: B, deadline: Instant) -> Self {
        DeadlineBody {
            inner,
            deadline,
            timer: None,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        // Once the body has had to wait, the deadline is checked before every read, so that
        // bytes arriving just often enough cannot carry it past the deadline.
        if let Some(timer) = this.timer.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let deadline = *this.deadline;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt as _, StreamBody};

    use super::*;

    type Chunks =
        futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>;

    /// A body of `n` one-byte frames, `gap` apart.
    fn trickle(n: usize, gap: Duration) -> StreamBody<Chunks> {
        use futures_util::StreamExt as _;
        let stream = futures_util::stream::iter(0..n).then(move |_| async move {
            tokio::time::sleep(gap).await;
            Ok(Frame::data(Bytes::from_static(b"x")))
        });
        StreamBody::new(stream.boxed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_time_is_read_whole() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let body = DeadlineBody::new(trickle(5, Duration::from_millis(100)), deadline);
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"xxxxx");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_is_for_the_whole_body_not_each_read() {
        let start = Instant::now();
        // Each byte comes well within a second; the whole body would take ten.
        let body = DeadlineBody::new(
            trickle(100, Duration::from_millis(100)),
            start + Duration::from_secs(1),
        );
        let err = body.collect().await.unwrap_err();
        assert!(is_timed_out(&*err), "{err}");
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_times_out() {
        let start = Instant::now();
        let never = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let body = DeadlineBody::new(never, start + Duration::from_secs(2));
        let err = axum::body::to_bytes(axum::body::Body::new(body), usize::MAX)
            .await
            .unwrap_err();
        // Seen through axum's own error wrapping, as the extractors see it.
        assert!(is_timed_out(&err), "{err}");
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
