//! Server-sent events pass-through with a usage tap.
//!
//! Bytes go from the upstream to the client as they arrive, cut only at event boundaries (an
//! event split across two TCP reads waits for its second half, nothing more). There is no task
//! and no channel in between: the client's connection polls this stream, this stream polls the
//! upstream's body, so backpressure is end to end, and when the client goes away the stream is
//! dropped and the upstream connection with it.
//!
//! Each complete event is looked at once, to pick up `usage`, notice `[DONE]` and upstream error
//! events, and to drop the usage chunk when the client did not ask for it. Anything that does
//! not parse is relayed as it came. When the upstream fails, stalls for longer than the idle
//! timeout, or ends without `[DONE]`, the client gets one final `data: {"error": …}` event.
//!
//! (Over 400 lines with its unit tests, which feed it split, cut and stalled streams; the
//! relay itself is about 250 lines and one piece: the poll loop and the event inspection.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::errors::KeyMask;
use crate::context::{RequestContext, Usage};
use crate::error::ErrorEnvelope;

/// The shape of a chunk, as far as relay cares.
#[derive(Deserialize)]
struct ChunkView {
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// Finds the end of the first complete event in `buf`: the index just past its blank line.
/// `from` is where to start looking (bytes before it were searched already).
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut from = from.min(buf.len());
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        // "\n\n" or "\n\r\n" ends an event.
        match buf.get(nl + 1) {
            Some(b'\n') => return Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
            _ => from = nl + 1,
        }
    }
    None
}

/// The `data:` payload of an event (single-line data, which is what OpenAI sends; multi-line
/// data is joined with `\n` as the SSE spec says).
fn event_data(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            parts.push(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    match parts.len() {
        0 => None,
        1 => Some(std::borrow::Cow::Borrowed(parts[0])),
        _ => Some(std::borrow::Cow::Owned(parts.join(&b'\n'))),
    }
}

/// The final event sent when the upstream fails mid-stream.
pub fn error_event(message: &str, code: &str) -> Bytes {
    ErrorEnvelope::new("server_error", message, Some(code.to_owned()), None).to_sse_event()
}

/// The largest event held while waiting for its end.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Streaming,
    Finished,
}

pin_project_lite::pin_project! {
    /// See the module documentation.
    pub struct SseRelay<S> {
        #[pin]
        upstream: S,
        #[pin]
        idle: tokio::time::Sleep,
        timeout: Duration,
        buf: BytesMut,
        forward_usage: bool,
        ctx: Arc<RequestContext>,
        mask: Arc<KeyMask>,
        seen: Seen,
        phase: Phase,
    }
}

impl<S> SseRelay<S> {
    /// Relays `upstream`, ending with an error event after `timeout` without a byte; keys in
    /// the upstream's own error events are masked with `mask`.
    pub fn new(
        upstream: S,
        timeout: Duration,
        forward_usage: bool,
        ctx: Arc<RequestContext>,
        mask: Arc<KeyMask>,
    ) -> Self {
        SseRelay {
            upstream,
            idle: tokio::time::sleep(timeout),
            timeout,
            buf: BytesMut::new(),
            forward_usage,
            ctx,
            mask,
            seen: Seen::default(),
            phase: Phase::Streaming,
        }
    }
}

/// What to do with one complete event.
enum Verdict {
    /// Forward it as it came.
    Keep,
    /// Leave it out (the usage chunk the client did not ask for).
    Drop,
    /// Forward this instead (an upstream error event with a key masked).
    Replace(Bytes),
}

/// Looks at one complete event.
fn inspect(
    event: &[u8],
    forward_usage: bool,
    ctx: &RequestContext,
    mask: &KeyMask,
    seen: &mut Seen,
) -> Verdict {
    let Some(data) = event_data(event) else {
        return Verdict::Keep;
    };
    let data: &[u8] = &data;
    if data.trim_ascii() == b"[DONE]" {
        seen.done = true;
        return Verdict::Keep;
    }
    let mentions = |needle: &[u8]| memchr::memmem::find(data, needle).is_some();
    let error_like = mentions(b"\"error\"");
    if !error_like && !mentions(b"\"usage\"") {
        return Verdict::Keep;
    }
    if let Ok(chunk) = serde_json::from_slice::<ChunkView>(data) {
        seen.error |= chunk.error.is_some();
        if let Some(usage) = chunk.usage {
            ctx.set_usage(usage);
            if !forward_usage && chunk.choices.as_ref().is_none_or(Vec::is_empty) {
                return Verdict::Drop;
            }
        }
    }
    // An error from the upstream, parsed or not: nothing in it may carry a key to the client.
    match error_like.then(|| masked(mask, event)).flatten() {
        Some(event) => Verdict::Replace(event),
        None => Verdict::Keep,
    }
}

/// `bytes` with every key masked, when there was one to mask.
fn masked(mask: &KeyMask, bytes: &[u8]) -> Option<Bytes> {
    let text = String::from_utf8_lossy(bytes);
    let masked = mask.mask(&text);
    (masked != text).then(|| Bytes::from(masked))
}

/// What the stream has shown so far.
#[derive(Debug, Default)]
struct Seen {
    done: bool,
    error: bool,
}

/// An error from the upstream body.
pub trait BodyError: std::fmt::Display {
    /// Whether it is a read timeout.
    fn is_timeout(&self) -> bool;
}

impl BodyError for hyper::Error {
    fn is_timeout(&self) -> bool {
        hyper::Error::is_timeout(self)
    }
}

impl BodyError for &'static str {
    fn is_timeout(&self) -> bool {
        false
    }
}

impl<S, E> Stream for SseRelay<S>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: BodyError,
{
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if *this.phase == Phase::Finished {
                return Poll::Ready(None);
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let deadline = tokio::time::Instant::now() + *this.timeout;
                    this.idle.as_mut().reset(deadline);
                    // A boundary may straddle the old and the new bytes: look back two.
                    let mut search_from = this.buf.len().saturating_sub(2);
                    this.buf.extend_from_slice(&chunk);
                    let mut out = BytesMut::new();
                    let mut forward_from = 0;
                    let mut scanned = 0;
                    // Cut complete events; forward them in one piece unless one is dropped.
                    while let Some(len) = event_end(&this.buf[scanned..], search_from) {
                        search_from = 0;
                        let end = scanned + len;
                        let verdict = inspect(
                            &this.buf[scanned..end],
                            *this.forward_usage,
                            this.ctx,
                            this.mask,
                            this.seen,
                        );
                        if let Verdict::Drop | Verdict::Replace(_) = verdict {
                            out.extend_from_slice(&this.buf[forward_from..scanned]);
                            forward_from = end;
                        }
                        if let Verdict::Replace(event) = verdict {
                            out.extend_from_slice(&event);
                        }
                        scanned = end;
                        if this.seen.done {
                            // Nothing may follow `[DONE]`; do not wait for the upstream to close.
                            *this.phase = Phase::Finished;
                            break;
                        }
                    }
                    if scanned == 0 {
                        if this.buf.len() > MAX_EVENT_BYTES {
                            // No event boundary in sight: not SSE as we know it. Relay the bytes
                            // as they came rather than hold them without bound.
                            let bytes = std::mem::take(this.buf).freeze();
                            let bytes = masked(this.mask, &bytes).unwrap_or(bytes);
                            return Poll::Ready(Some(Ok(bytes)));
                        }
                        continue;
                    }
                    let complete = this.buf.split_to(scanned).freeze();
                    let bytes = if forward_from == 0 {
                        complete
                    } else {
                        out.extend_from_slice(&complete[forward_from..]);
                        out.freeze()
                    };
                    if bytes.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(bytes)));
                }
                Poll::Ready(Some(Err(err))) => {
                    *this.phase = Phase::Finished;
                    tracing::warn!(error = %err, "upstream stream failed");
                    let event = if err.is_timeout() || this.idle.is_elapsed() {
                        error_event(
                            "the upstream stopped sending for too long",
                            "upstream_timeout",
                        )
                    } else {
                        error_event(
                            "the upstream connection failed mid-stream",
                            "upstream_stream_error",
                        )
                    };
                    return Poll::Ready(Some(Ok(event)));
                }
                Poll::Ready(None) => {
                    *this.phase = Phase::Finished;
                    let rest = std::mem::take(this.buf).freeze();
                    if this.seen.done || this.seen.error {
                        let rest = masked(this.mask, &rest).unwrap_or(rest);
                        return Poll::Ready((!rest.is_empty()).then_some(Ok(rest)));
                    }
                    // A cut-off partial event is dropped: clients parse each event as JSON and
                    // would fail on it before they saw the error event.
                    tracing::warn!(
                        dropped_bytes = rest.len(),
                        "upstream stream ended without [DONE]"
                    );
                    return Poll::Ready(Some(Ok(error_event(
                        "the upstream stream ended unexpectedly",
                        "upstream_stream_error",
                    ))));
                }
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        *this.phase = Phase::Finished;
                        tracing::warn!(
                            timeout_s = this.timeout.as_secs_f64(),
                            "upstream stream stalled"
                        );
                        return Poll::Ready(Some(Ok(error_event(
                            "the upstream stopped sending for too long",
                            "upstream_timeout",
                        ))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    #[test]
    fn events_are_found_with_either_line_ending() {
        assert_eq!(event_end(b"data: a\n\ndata: b", 0), Some(9));
        assert_eq!(event_end(b"data: a\r\n\r\n", 0), Some(11));
        assert_eq!(event_end(b"data: a\n", 0), None);
        assert_eq!(
            event_data(b"data: {\"x\":1}\n\n").as_deref(),
            Some(&b"{\"x\":1}"[..])
        );
        assert_eq!(event_data(b": comment\n\n"), None);
    }

    fn mask() -> Arc<KeyMask> {
        Arc::new(KeyMask::new(Some(secrecy::SecretString::from(
            "upstream-secret-key",
        ))))
    }

    fn ctx() -> Arc<RequestContext> {
        Arc::new(RequestContext::new(http::HeaderValue::from_static("t")))
    }

    async fn relay(
        chunks: Vec<Result<&'static str, &'static str>>,
        forward_usage: bool,
    ) -> (String, Arc<RequestContext>) {
        let ctx = ctx();
        let upstream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| c.map(|s| Bytes::from_static(s.as_bytes()))),
        );
        let out: Vec<_> = SseRelay::new(
            upstream,
            Duration::from_secs(5),
            forward_usage,
            ctx.clone(),
            mask(),
        )
        .collect()
        .await;
        let text = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        (text, ctx)
    }

    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";

    #[tokio::test]
    async fn split_events_are_joined_and_usage_is_tapped() {
        let (out, ctx) = relay(
            vec![
                Ok("data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n"),
                Ok("\ndata: {\"cho"),
                Ok("ices\":[]}\n\n"),
                Ok(USAGE),
                Ok("data: [DONE]\n\n"),
            ],
            false,
        )
        .await;
        assert_eq!(
            out,
            "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n"
        );
        assert_eq!(
            ctx.usage(),
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5
            })
        );
    }

    #[tokio::test]
    async fn keys_in_upstream_error_events_are_masked() {
        let (out, _) = relay(
            vec![
                Ok("data: {\"choices\":[{\"delta\":{\"content\":\"sk-in-content\"}}]}\n\n"),
                Ok("data: {\"error\":{\"message\":\"bad UPSTREAM-SECRET-KEY and sk-live-1\"}}\n\n"),
            ],
            false,
        )
        .await;
        assert!(
            out.starts_with(
                "data: {\"choices\":[{\"delta\":{\"content\":\"sk-in-content\"}}]}\n\n"
            ),
            "content is not an error: relayed as it came: {out}"
        );
        assert!(
            out.ends_with("data: {\"error\":{\"message\":\"bad [redacted] and [redacted]\"}}\n\n"),
            "{out}"
        );
        assert!(
            !out.to_ascii_lowercase().contains("upstream-secret-key"),
            "{out}"
        );
        // Masked too: an error event that does not parse as a chunk, and what follows an error
        // event when the upstream then closes.
        let (out, _) = relay(
            vec![Ok(
                "data: {\"error\":{\"message\":\"sk-abc\"},\"usage\":{\"total_tokens\":0}}\n\n",
            )],
            false,
        )
        .await;
        assert!(
            out.contains("[redacted]") && !out.contains("sk-abc"),
            "{out}"
        );
        let (out, _) = relay(
            vec![Ok(
                "data: {\"error\":{\"message\":\"x\"}}\n\ndata: {\"error\":\"sk-zzz\"}\n",
            )],
            false,
        )
        .await;
        assert!(
            out.contains("[redacted]") && !out.contains("sk-zzz"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn usage_chunk_is_kept_when_asked_for() {
        let (out, _) = relay(vec![Ok(USAGE), Ok("data: [DONE]\n\n")], true).await;
        assert_eq!(out, format!("{USAGE}data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn a_cut_stream_ends_with_one_error_event() {
        let (out, _) = relay(
            vec![Ok("data: {\"a\":1}\n\n"), Err("connection reset")],
            false,
        )
        .await;
        assert!(
            out.starts_with("data: {\"a\":1}\n\ndata: {\"error\""),
            "{out}"
        );
        let (out, _) = relay(vec![Ok("data: {\"a\":1}\n\ndata: {\"par")], false).await;
        assert_eq!(
            out.matches("data: ").count(),
            2,
            "the cut-off event is dropped: {out}"
        );
        assert!(
            out.ends_with("\n\n") && out.matches("\"error\"").count() == 1,
            "{out}"
        );
        // Nothing after [DONE], and no waiting for the upstream to close.
        let (out, _) = relay(
            vec![Ok("data: [DONE]\n\ndata: late\n\n"), Err("never seen")],
            false,
        )
        .await;
        assert_eq!(out, "data: [DONE]\n\n");
        let (out, _) = relay(
            vec![Ok("data: not json\n\n"), Ok("data: [DONE]\n\n")],
            false,
        )
        .await;
        assert_eq!(
            out, "data: not json\n\ndata: [DONE]\n\n",
            "malformed chunks pass as they came"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_stream_times_out() {
        let upstream =
            futures_util::stream::iter([Ok::<_, &str>(Bytes::from_static(b"data: {}\n\n"))])
                .chain(futures_util::stream::pending());
        let out: Vec<_> = SseRelay::new(upstream, Duration::from_secs(2), false, ctx(), mask())
            .collect()
            .await;
        assert_eq!(out.len(), 2);
        assert!(String::from_utf8_lossy(out[1].as_ref().unwrap()).contains("upstream_timeout"));
    }
}
