//! Server-sent events pass-through with a usage tap.
//!
//! Bytes go from the upstream to the client as they arrive, cut only at event boundaries (an
//! event split across two TCP reads waits for its second half, nothing more). There is no task
//! and no channel in between: the client's connection polls this stream, this stream polls the
//! upstream's body, so backpressure is end to end, and when the client goes away the stream is
//! dropped and the upstream connection with it.
//!
//! Two protocols ([`Protocol`]): Chat Completions (`data:` chunks ending with `data: [DONE]`)
//! and the Responses API (typed events, `event: <type>` + `data:`, ending with
//! `response.completed`, `response.incomplete` or `response.failed`). Each complete event is
//! looked at once, and parsed only where relay needs something from it: the usage, the end of
//! the stream, upstream errors (masked), the usage chunk a chat client did not ask for
//! (dropped), and a response's id (from `response.created`). Anything that does not parse is
//! relayed as it came. When the upstream fails, stalls for longer than the idle timeout, or
//! ends before its last event, the client gets one final error event in the protocol's shape:
//! `data: {"error": …}` for chat, `event: error` for responses.
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

use super::errors::KeyMask;
use super::response_view::{MAX_OWNED_IDS, ResponseView, item_id_of_event};
use crate::context::{RequestContext, StreamEnd, Usage};
use crate::error::ErrorEnvelope;

/// A chat chunk, as far as relay cares.
struct ChunkView {
    /// The usage it carries (`None` for `null` or none).
    usage: Option<Usage>,
    /// Its `choices` are absent, `null` or `[]` (the usage chunk's).
    no_choices: bool,
    /// It has an `error` other than `null`.
    error: bool,
}

/// The [`ChunkView`] of a chunk's data, found by walking its outline (`scan`) rather than by
/// serde (7,800 instructions for the bench's usage chunk, issue 14); `None` when it is not a
/// JSON object, or has a `usage` or `choices` relay cannot read: it is then relayed as it came.
fn chunk_view(data: &[u8]) -> Option<ChunkView> {
    let [usage, choices, error] = super::scan::members(data, ["usage", "choices", "error"])?;
    fn given(raw: Option<&[u8]>) -> Option<&[u8]> {
        raw.filter(|raw| *raw != b"null")
    }
    let usage = match given(usage) {
        Some(raw) => Some(super::chat::read_usage(raw)?),
        None => None,
    };
    let no_choices = match given(choices) {
        Some(raw) => raw
            .strip_prefix(b"[")?
            .strip_suffix(b"]")?
            .trim_ascii()
            .is_empty(),
        None => true,
    };
    Some(ChunkView {
        usage,
        no_choices,
        error: given(error).is_some(),
    })
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
    // What OpenAI sends: one `data:` line, then the blank line. Found with one `memchr`.
    if let Some(rest) = event.strip_prefix(b"data:")
        && let Some(nl) = memchr::memchr(b'\n', rest)
        && matches!(&rest[nl + 1..], b"\n" | b"\r\n")
    {
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        return Some(std::borrow::Cow::Borrowed(
            line.strip_prefix(b" ").unwrap_or(line),
        ));
    }
    let mut data = event.split(|b| *b == b'\n').filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let rest = line.strip_prefix(b"data:")?;
        Some(rest.strip_prefix(b" ").unwrap_or(rest))
    });
    let first = data.next()?;
    match data.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut joined = [first, second].join(&b'\n');
            for more in data {
                joined.push(b'\n');
                joined.extend_from_slice(more);
            }
            Some(std::borrow::Cow::Owned(joined))
        }
    }
}

/// Which stream protocol is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Chat Completions: `data:` chunks ending with `data: [DONE]`. The usage chunk (relay
    /// always asks for it) reaches the client only when `forward_usage`.
    Chat {
        /// Whether the client asked for the usage chunk.
        forward_usage: bool,
    },
    /// The Responses API: typed events ending with `response.completed`, `.incomplete` or
    /// `.failed`; usage is in the last one.
    Responses,
}

/// The final event sent when the upstream fails mid-stream, in `protocol`'s shape. For the
/// Responses API it is an `error` event with both shapes clients read: the flat one OpenAI
/// sends (`type`, `code`, `message`, `param`, `sequence_number`) and the nested `error` object
/// that makes the Python SDK raise.
pub fn error_event(protocol: Protocol, sequence: u64, message: &str, code: &str) -> Bytes {
    let envelope = ErrorEnvelope::new("server_error", message, Some(code.to_owned()), None);
    match protocol {
        Protocol::Chat { .. } => envelope.to_sse_event(),
        Protocol::Responses => {
            let data = serde_json::json!({
                "type": "error",
                "sequence_number": sequence,
                "code": code,
                "message": message,
                "param": null,
                "error": envelope.error,
            });
            Bytes::from(format!("event: error\ndata: {data}\n\n"))
        }
    }
}

/// The type of a Responses API event: its last `event:` line (the SSE rule), or, for a server
/// that sends `data:` only, the `type` its data starts with (the field the SDKs dispatch on).
fn event_type<'a>(event: &'a [u8], data: &[u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
    let named = event.rsplit(|b| *b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"event:").map(<[u8]>::trim_ascii)
    });
    match named {
        Some(name) => Some(std::borrow::Cow::Borrowed(name)),
        // The top-level `type` (a nested object may have one too): read in one pass that skips
        // everything else.
        None => match super::body::fields(data, &["type"]).ok()?.scalar("type") {
            super::body::Scalar::Str(t) => {
                Some(std::borrow::Cow::Owned(t.into_owned().into_bytes()))
            }
            _ => None,
        },
    }
}

/// The largest event held while waiting for its end. Responses events can be large: image
/// generation sends base64 images, and `response.created` / `.completed` echo the request's
/// `instructions` and `tools` (up to `MAX_REQUEST_BYTES`).
const MAX_EVENT_BYTES: usize = 32 * 1024 * 1024;

/// The most complete events held back to be written together; more goes out at once.
const MAX_HELD_BYTES: usize = 64 * 1024;
/// The room made when held events are first joined (a burst of a short answer's events fits).
const JOIN_BYTES: usize = 8 * 1024;

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
        // Fires at the earliest moment the stream may have stalled; see `poll_idle`.
        #[pin]
        idle: tokio::time::Sleep,
        timeout: Duration,
        // When the last bytes came (or the stream began).
        last_bytes: tokio::time::Instant,
        buf: BytesMut,
        protocol: Protocol,
        ctx: Arc<RequestContext>,
        mask: Arc<KeyMask>,
        seen: Seen,
        phase: Phase,
        active: crate::measure::ActiveStream,
        // Complete events not yet given to the client, sent together (see `poll_next`).
        held: Held,
    }
}

impl<S> SseRelay<S> {
    /// Relays `upstream` in `protocol`, ending with an error event after `timeout` without a
    /// byte; keys in the upstream's own error events are masked with `mask`.
    pub fn new(
        upstream: S,
        timeout: Duration,
        protocol: Protocol,
        ctx: Arc<RequestContext>,
        mask: Arc<KeyMask>,
    ) -> Self {
        SseRelay {
            upstream,
            idle: tokio::time::sleep(timeout),
            timeout,
            last_bytes: tokio::time::Instant::now(),
            buf: BytesMut::new(),
            protocol,
            ctx,
            mask,
            seen: Seen::default(),
            phase: Phase::Streaming,
            active: crate::measure::ActiveStream::start(),
            held: Held::default(),
        }
    }

    /// The ids the stream has given its caller so far (Responses API only): the response's
    /// own, from `response.created`, then its output items', in order, at most
    /// [`MAX_OWNED_IDS`].
    pub fn owned_ids(&self) -> &[String] {
        &self.seen.owned
    }
}

/// Complete events waiting to go to the client in one write. One piece is kept as it came
/// (a slice of the upstream's read buffer, not copied: a paced stream's events arrive one at
/// a time); only two or more are joined.
#[derive(Default)]
struct Held {
    one: Option<Bytes>,
    joined: BytesMut,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.one.is_none() && self.joined.is_empty()
    }

    fn len(&self) -> usize {
        self.one.as_ref().map_or(0, Bytes::len) + self.joined.len()
    }

    fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.is_empty() {
            self.one = Some(bytes);
            return;
        }
        if let Some(one) = self.one.take() {
            // Room for a burst's events at once: grown from the first two, the bench's 24
            // events took five reallocations (issue 14).
            self.joined
                .reserve((one.len() + bytes.len()).max(JOIN_BYTES));
            self.joined.extend_from_slice(&one);
        }
        self.joined.extend_from_slice(&bytes);
    }

    /// Everything held, in one piece.
    fn take(&mut self) -> Bytes {
        match self.one.take() {
            Some(one) => one,
            None => self.joined.split().freeze(),
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

/// Ready once `deadline` (the last bytes' time plus the idle timeout) has passed. Bytes move
/// the deadline without touching the timer, which is set again only when it fires before the
/// deadline: a timer reset for every chunk cost about 200 instructions a paced event (issue 14).
fn poll_idle(
    mut idle: Pin<&mut tokio::time::Sleep>,
    deadline: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        std::task::ready!(idle.as_mut().poll(cx));
        if idle.deadline() >= deadline {
            return Poll::Ready(());
        }
        idle.as_mut().reset(deadline);
    }
}

/// Looks at one complete event.
fn inspect(
    event: &[u8],
    protocol: Protocol,
    ctx: &RequestContext,
    mask: &KeyMask,
    seen: &mut Seen,
) -> Verdict {
    let Some(data) = event_data(event) else {
        return Verdict::Keep;
    };
    seen.events += 1;
    let data: &[u8] = &data;
    let error_like = match protocol {
        Protocol::Chat { forward_usage } => {
            if data.trim_ascii() == b"[DONE]" {
                seen.done = true;
                return Verdict::Keep;
            }
            let error_like = finders().error.find(data).is_some();
            // The answer's text, or a tool call's arguments.
            if let Some(text) = string_after(data, &finders().content)
                .or_else(|| string_after(data, &finders().arguments))
            {
                ctx.add_delivered(&text);
            }
            // Every chunk says `"usage": null` when usage was asked for; only the last one
            // carries it.
            let usage_like = may_carry_usage(data) && has_usage(data);
            if !error_like && !usage_like {
                return Verdict::Keep;
            }
            if let Some(chunk) = chunk_view(data) {
                seen.error |= chunk.error;
                if let Some(usage) = chunk.usage {
                    ctx.set_usage(usage);
                    if !forward_usage && chunk.no_choices {
                        return Verdict::Drop;
                    }
                }
            }
            error_like
        }
        Protocol::Responses => inspect_response_event(event, data, ctx, seen),
    };
    // An error from the upstream, parsed or not: nothing in it may carry a key to the client.
    match error_like.then(|| masked(mask, event)).flatten() {
        Some(event) => Verdict::Replace(event),
        None => Verdict::Keep,
    }
}

/// The needles looked for in every event, built once.
struct Finders {
    error: memchr::memmem::Finder<'static>,
    usage: memchr::memmem::Finder<'static>,
    content: memchr::memmem::Finder<'static>,
    arguments: memchr::memmem::Finder<'static>,
    delta: memchr::memmem::Finder<'static>,
}

fn finders() -> &'static Finders {
    static FINDERS: std::sync::OnceLock<Finders> = std::sync::OnceLock::new();
    FINDERS.get_or_init(|| Finders {
        error: memchr::memmem::Finder::new(b"\"error\""),
        usage: memchr::memmem::Finder::new(b"\"usage\""),
        content: memchr::memmem::Finder::new(b"\"content\":"),
        arguments: memchr::memmem::Finder::new(b"\"arguments\":"),
        delta: memchr::memmem::Finder::new(b"\"delta\":"),
    })
}

/// Whether the chunk `data` may carry a usage relay would take: not when its last member is
/// `"usage":null`, as every chunk but the last says once usage is asked for. Its top-level
/// `usage` is then `null` (or there twice, which [`chunk_view`] refuses), and a `usage` nested
/// deeper is not read, so the search for one, one of the three searches of every event, is
/// left out (issue 14).
fn may_carry_usage(data: &[u8]) -> bool {
    !data.ends_with(b",\"usage\":null}")
}

/// Whether a `"usage"` key in `data` has a value other than `null`. A quote inside a JSON
/// string is escaped, so `"usage"` followed by a colon is always a key.
fn has_usage(data: &[u8]) -> bool {
    finders().usage.find_iter(data).any(|at| {
        let rest = data[at + b"\"usage\"".len()..].trim_ascii_start();
        match rest.strip_prefix(b":") {
            Some(value) => !value.trim_ascii_start().starts_with(b"null"),
            None => false,
        }
    })
}

/// The string value that follows the first `key` (e.g. `"content":`) in `data`, read without
/// parsing the rest: the text an event delivers, for an estimate should usage never arrive.
/// Borrowed from `data` unless it has escapes.
fn string_after<'a>(
    data: &'a [u8],
    key: &memchr::memmem::Finder<'_>,
) -> Option<std::borrow::Cow<'a, str>> {
    let at = key.find(data)? + key.needle().len();
    let rest = data[at..].trim_ascii_start().strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] == b'"' {
        // No escape: the text is the bytes up to the closing quote.
        let text = std::str::from_utf8(&rest[..end]).ok()?;
        return (!text.is_empty()).then_some(std::borrow::Cow::Borrowed(text));
    }
    let mut de = serde_json::Deserializer::from_slice(&data[at..]);
    String::deserialize(&mut de)
        .ok()
        .filter(|text| !text.is_empty())
        .map(std::borrow::Cow::Owned)
}

/// Looks at one Responses API event; returns whether it reports an error (to be masked).
fn inspect_response_event(
    event: &[u8],
    data: &[u8],
    ctx: &RequestContext,
    seen: &mut Seen,
) -> bool {
    let own = |seen: &mut Seen, id: String| {
        if seen.owned.len() < MAX_OWNED_IDS && !seen.owned.contains(&id) {
            seen.owned.push(id);
        }
    };
    let Some(kind) = event_type(event, data) else {
        return false;
    };
    match &*kind {
        b"response.output_text.delta"
        | b"response.function_call_arguments.delta"
        | b"response.reasoning_summary_text.delta"
        | b"response.refusal.delta" => {
            if let Some(text) = string_after(data, &finders().delta) {
                ctx.add_delivered(&text);
            }
            false
        }
        b"response.created" | b"response.in_progress" | b"response.queued" => {
            if let Some(view) = ResponseView::read_event(data) {
                own(seen, view.id);
            }
            false
        }
        b"response.output_item.added" | b"response.output_item.done" => {
            if let Some(id) = item_id_of_event(data) {
                own(seen, id);
            }
            false
        }
        b"response.completed" | b"response.incomplete" | b"response.failed" => {
            seen.done = true;
            if let Some(view) = ResponseView::read_event(data) {
                if let Some(usage) = view.usage {
                    ctx.set_usage(usage);
                }
                for id in view.owned_ids() {
                    own(seen, id);
                }
            }
            &*kind == b"response.failed"
        }
        b"error" => {
            seen.error = true;
            true
        }
        _ => false,
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
    /// The last event was seen (`[DONE]`, or a response's final event).
    done: bool,
    /// The upstream sent an error event.
    error: bool,
    /// Events with data seen so far (the sequence number of the next one, in the Responses
    /// API).
    events: u64,
    /// The ids given to the caller (Responses API): the response's, then its items'.
    owned: Vec<String>,
}

/// An error from the upstream body.
pub trait BodyError: std::fmt::Display {
    /// Whether it is a read timeout.
    fn is_timeout(&self) -> bool;
}

impl BodyError for super::h1::WireError {
    fn is_timeout(&self) -> bool {
        super::h1::WireError::is_timeout(self)
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
                // What is held goes out first; then the end.
                return Poll::Ready((!this.held.is_empty()).then(|| Ok(this.held.take())));
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    *this.last_bytes = tokio::time::Instant::now();
                    // With no part of an event waiting, the new bytes are read where they are
                    // (and go on uncopied); else they join the waiting part.
                    let in_place = this.buf.is_empty();
                    // A boundary may straddle the old and the new bytes: look back two.
                    let mut search_from = this.buf.len().saturating_sub(2);
                    if !in_place {
                        this.buf.extend_from_slice(&chunk);
                    }
                    let data: &[u8] = if in_place { &chunk } else { &this.buf[..] };
                    let mut out = BytesMut::new();
                    let mut forward_from = 0;
                    let mut scanned = 0;
                    // Cut complete events; forward them in one piece unless one is dropped.
                    while let Some(len) = event_end(&data[scanned..], search_from) {
                        search_from = 0;
                        let end = scanned + len;
                        let verdict = inspect(
                            &data[scanned..end],
                            *this.protocol,
                            this.ctx,
                            this.mask,
                            this.seen,
                        );
                        if let Verdict::Drop | Verdict::Replace(_) = verdict {
                            out.extend_from_slice(&data[forward_from..scanned]);
                            forward_from = end;
                        }
                        if let Verdict::Replace(event) = verdict {
                            out.extend_from_slice(&event);
                        }
                        scanned = end;
                        if this.seen.done {
                            // Nothing may follow the last event; do not wait for the upstream to
                            // close.
                            *this.phase = Phase::Finished;
                            this.ctx.set_stream_end(if this.seen.error {
                                StreamEnd::Failed(502)
                            } else {
                                StreamEnd::Done
                            });
                            break;
                        }
                    }
                    let complete = if in_place {
                        // What follows the last complete event waits for the rest of its event.
                        if *this.phase == Phase::Streaming {
                            this.buf.extend_from_slice(&chunk[scanned..]);
                        }
                        chunk.slice(..scanned)
                    } else {
                        this.buf.split_to(scanned).freeze()
                    };
                    if scanned == 0 {
                        if this.buf.len() > MAX_EVENT_BYTES {
                            // No event boundary in sight: not SSE as we know it. Relay the bytes
                            // as they came rather than hold them without bound.
                            let bytes = std::mem::take(this.buf).freeze();
                            let bytes = masked(this.mask, &bytes).unwrap_or(bytes);
                            // Not copied when nothing else is held (it is over 32 MiB).
                            this.held.push(bytes);
                            return Poll::Ready(Some(Ok(this.held.take())));
                        }
                        continue;
                    }
                    if forward_from == 0 {
                        this.held.push(complete);
                    } else {
                        out.extend_from_slice(&complete[forward_from..]);
                        this.held.push(out.freeze());
                    }
                    if this.held.len() >= MAX_HELD_BYTES {
                        return Poll::Ready(Some(Ok(this.held.take())));
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    *this.phase = Phase::Finished;
                    tracing::warn!(error = %err, "upstream stream failed");
                    let (protocol, sequence) = (*this.protocol, this.seen.events);
                    let timed_out = err.is_timeout()
                        || tokio::time::Instant::now() >= *this.last_bytes + *this.timeout;
                    this.ctx
                        .set_stream_end(StreamEnd::Failed(if timed_out { 504 } else { 502 }));
                    let event = if timed_out {
                        error_event(
                            protocol,
                            sequence,
                            "the upstream stopped sending for too long",
                            "upstream_timeout",
                        )
                    } else {
                        error_event(
                            protocol,
                            sequence,
                            "the upstream connection failed mid-stream",
                            "upstream_stream_error",
                        )
                    };
                    this.held.push(event);
                }
                Poll::Ready(None) => {
                    *this.phase = Phase::Finished;
                    let rest = std::mem::take(this.buf).freeze();
                    if this.seen.done || this.seen.error {
                        // The upstream's own error event ended it.
                        this.ctx.set_stream_end(StreamEnd::Failed(502));
                        let rest = masked(this.mask, &rest).unwrap_or(rest);
                        this.held.push(rest);
                        continue;
                    }
                    // A cut-off partial event is dropped: clients parse each event as JSON and
                    // would fail on it before they saw the error event.
                    tracing::warn!(
                        dropped_bytes = rest.len(),
                        "upstream stream ended before its last event"
                    );
                    this.ctx.set_stream_end(StreamEnd::Failed(502));
                    this.held.push(error_event(
                        *this.protocol,
                        this.seen.events,
                        "the upstream stream ended unexpectedly",
                        "upstream_stream_error",
                    ));
                }
                Poll::Pending => {
                    if !this.held.is_empty() {
                        // Everything the upstream had ready was read: the events it held go to
                        // the client in one write (one TCP segment), not one write per event.
                        return Poll::Ready(Some(Ok(this.held.take())));
                    }
                    if poll_idle(this.idle.as_mut(), *this.last_bytes + *this.timeout, cx)
                        .is_ready()
                    {
                        *this.phase = Phase::Finished;
                        this.ctx.set_stream_end(StreamEnd::Failed(504));
                        tracing::warn!(
                            timeout_s = this.timeout.as_secs_f64(),
                            "upstream stream stalled"
                        );
                        this.held.push(error_event(
                            *this.protocol,
                            this.seen.events,
                            "the upstream stopped sending for too long",
                            "upstream_timeout",
                        ));
                        continue;
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
    fn chunks_are_read_for_usage_choices_and_error() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
        };
        let view = chunk_view(
            br#"{"id":"c","choices":[ ],"usage":{"prompt_tokens":3,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}}"#,
        )
        .unwrap();
        assert_eq!(view.usage, Some(usage));
        assert!(view.no_choices && !view.error);
        let view = chunk_view(
            br#"{"choices":[{"delta":{}}],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#,
        )
        .unwrap();
        assert_eq!(view.usage, Some(usage));
        assert!(
            !view.no_choices,
            "the last content chunk may carry usage too"
        );
        let view = chunk_view(br#"{"choices":null,"usage":null,"error":null}"#).unwrap();
        assert!(view.usage.is_none() && view.no_choices && !view.error);
        assert!(chunk_view(br#"{"error":{"message":"no"}}"#).unwrap().error);
        // Not a chunk relay can read: relayed as it came, nothing taken from it.
        for data in [
            &br#"{"usage":{"prompt_tokens":3}}"#[..],
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":5},"choices":"x"}"#,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":5}"#,
            br#"{"usage":1,"usage":2}"#,
            b"[DONE]",
        ] {
            assert!(
                chunk_view(data).is_none(),
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn usage_is_found_only_where_it_has_a_value() {
        assert!(!has_usage(
            br#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#
        ));
        assert!(!has_usage(br#"{"usage" :  null}"#));
        assert!(has_usage(br#"{"choices":[],"usage":{"prompt_tokens":1}}"#));
        assert!(has_usage(br#"{"usage" : {"prompt_tokens":1}}"#));
        // Inside a string a quote is escaped: not a key.
        assert!(!has_usage(
            br#"{"delta":{"content":"say \"usage\": 5"},"usage":null}"#
        ));
        assert!(!has_usage(br#"{"type":"usage","usage":null}"#));
        assert!(has_usage(
            br#"{"type":"usage","usage":null,"x":{"usage":{}}}"#
        ));
    }

    #[test]
    fn only_a_chunk_that_does_not_end_with_a_null_usage_is_searched() {
        assert!(!may_carry_usage(
            br#"{"choices":[{"delta":{"content":"x"}}],"usage":null}"#
        ));
        // A usage nested deeper, or the same key twice: nothing is taken from it either way.
        assert!(!may_carry_usage(
            br#"{"choices":[{"delta":{"usage":{"prompt_tokens":1}}}],"usage":null}"#
        ));
        for data in [
            &br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#[..],
            br#"{"usage":null,"choices":[]}"#,
            br#"{"choices":[],"usage": null}"#,
            br#"{"usage":null}"#,
        ] {
            assert!(may_carry_usage(data), "{}", String::from_utf8_lossy(data));
        }
    }

    #[tokio::test]
    async fn usage_is_taken_only_from_the_top_level_member() {
        // Whether the search is made or not, what is taken is the top-level member.
        for (chunk, taken) in [
            (
                "data: {\"choices\":[{\"delta\":{\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":7}}}],\"usage\":null}\n\n",
                None,
            ),
            (
                "data: {\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":7},\"choices\":[],\"usage\":null}\n\n",
                None,
            ),
            (
                "data: {\"choices\":[],\"usage\":null,\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":7}}\n\n",
                None,
            ),
            (USAGE, Some(3)),
        ] {
            let (_, ctx) = relay(vec![Ok(chunk), Ok("data: [DONE]\n\n")], false).await;
            assert_eq!(ctx.usage().map(|u| u.prompt_tokens), taken, "{chunk}");
        }
    }

    #[test]
    fn delivered_text_is_read_with_and_without_escapes() {
        let content = &finders().content;
        let text = |data: &[u8]| string_after(data, content).map(|t| t.into_owned());
        assert_eq!(
            text(br#"{"delta":{"content":"hello"}}"#).as_deref(),
            Some("hello")
        );
        assert_eq!(
            text(br#"{"delta":{"content": "a\"b\n"}}"#).as_deref(),
            Some("a\"b\n")
        );
        assert_eq!(
            text(br#"{"delta":{"content":"caf\u00e9"}}"#).as_deref(),
            Some("café")
        );
        assert_eq!(text(br#"{"delta":{"content":""}}"#), None);
        assert_eq!(text(br#"{"delta":{"content":null}}"#), None);
        assert_eq!(text(br#"{"delta":{"role":"assistant"}}"#), None);
    }

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
        assert_eq!(
            event_data(b"event: x\r\ndata: a\r\ndata:b\ndata: c\n\n").as_deref(),
            Some(&b"a\nb\nc"[..]),
            "multi-line data is joined with newlines"
        );
    }

    fn mask() -> Arc<KeyMask> {
        Arc::new(KeyMask::new(Some(secrecy::SecretString::from(
            "upstream-secret-key",
        ))))
    }

    fn ctx() -> Arc<RequestContext> {
        Arc::new(RequestContext::new(http::HeaderValue::from_static("t")))
    }

    /// A chat relay of `upstream` (usage not asked for by the client), and its context.
    fn chat_relay<S>(
        upstream: S,
        timeout: Duration,
    ) -> (Pin<Box<SseRelay<S>>>, Arc<RequestContext>) {
        let ctx = ctx();
        let relay = SseRelay::new(
            upstream,
            timeout,
            Protocol::Chat {
                forward_usage: false,
            },
            ctx.clone(),
            mask(),
        );
        (Box::pin(relay), ctx)
    }

    async fn relay(
        chunks: Vec<Result<&'static str, &'static str>>,
        forward_usage: bool,
    ) -> (String, Arc<RequestContext>) {
        let (text, ctx, _) = relay_in(Protocol::Chat { forward_usage }, chunks).await;
        (text, ctx)
    }

    /// Relays `chunks`; returns the text, the context and the response id seen.
    async fn relay_in(
        protocol: Protocol,
        chunks: Vec<Result<&'static str, &'static str>>,
    ) -> (String, Arc<RequestContext>, Option<String>) {
        let ctx = ctx();
        let upstream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| c.map(|s| Bytes::from_static(s.as_bytes()))),
        );
        let mut stream = Box::pin(SseRelay::new(
            upstream,
            Duration::from_secs(5),
            protocol,
            ctx.clone(),
            mask(),
        ));
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            out.push(item);
        }
        let id = stream.owned_ids().first().cloned();
        let text = out
            .into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect();
        (text, ctx, id)
    }

    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";

    #[tokio::test]
    async fn whole_events_that_arrive_alone_go_out_uncopied() {
        let first: &'static [u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let done: &'static [u8] = b"data: [DONE]\n\n";
        // The upstream has nothing ready before each chunk, as when events are paced.
        let upstream = futures_util::stream::unfold(0, move |step| async move {
            tokio::task::yield_now().await;
            let chunk = match step {
                0 => first,
                1 => done,
                _ => return None,
            };
            Some((Ok::<_, &'static str>(Bytes::from_static(chunk)), step + 1))
        });
        let (mut stream, ctx) = chat_relay(upstream, Duration::from_secs(5));
        for sent in [first, done] {
            let got = stream.next().await.unwrap().unwrap();
            assert_eq!(&got[..], sent);
            assert_eq!(got.as_ptr(), sent.as_ptr(), "the upstream's own bytes");
        }
        assert!(stream.next().await.is_none());
        assert_eq!(ctx.stream_end(), Some(StreamEnd::Done));
    }

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
        let out: Vec<_> = SseRelay::new(
            upstream,
            Duration::from_secs(2),
            Protocol::Chat {
                forward_usage: false,
            },
            ctx(),
            mask(),
        )
        .collect()
        .await;
        assert_eq!(out.len(), 2);
        assert!(String::from_utf8_lossy(out[1].as_ref().unwrap()).contains("upstream_timeout"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_bytes() {
        // Four events 1.5 s apart, then nothing: with a 2 s timeout the stream times out 2 s
        // after the last event (at 8 s), not 2 s after the start, nor later.
        let start = tokio::time::Instant::now();
        let upstream = futures_util::stream::unfold(0, |n| async move {
            if n == 4 {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Some((Ok::<_, &str>(Bytes::from_static(b"data: {}\n\n")), n + 1))
        });
        let (mut stream, ctx) = chat_relay(upstream, Duration::from_secs(2));
        for _ in 0..4 {
            assert_eq!(&stream.next().await.unwrap().unwrap()[..], b"data: {}\n\n");
        }
        let last = stream.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&last).contains("upstream_timeout"));
        assert_eq!(start.elapsed(), Duration::from_secs(8));
        assert_eq!(ctx.stream_end(), Some(StreamEnd::Failed(504)));
        assert!(stream.next().await.is_none());
    }

    const CREATED: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"usage\":null,\"error\":null}}\n\n";
    const DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"hi\"}\n\n";
    const COMPLETED: &str = "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}\n\n";

    #[tokio::test]
    async fn responses_events_pass_with_their_id_and_usage_tapped() {
        let (out, ctx, id) = relay_in(
            Protocol::Responses,
            vec![
                Ok(CREATED),
                Ok(&DELTA[..20]),
                Ok(&DELTA[20..]),
                Ok(COMPLETED),
                // Nothing after the last event is relayed, nor waited for.
                Ok("event: response.output_text.delta\ndata: {}\n\n"),
            ],
        )
        .await;
        assert_eq!(out, format!("{CREATED}{DELTA}{COMPLETED}"));
        assert_eq!(id.as_deref(), Some("resp_1"));
        assert_eq!(
            ctx.usage(),
            Some(Usage {
                prompt_tokens: 4,
                completion_tokens: 6
            })
        );
    }

    #[tokio::test]
    async fn a_cut_responses_stream_ends_with_an_error_event() {
        for cut in [
            Err("connection reset"),
            Ok("event: response.output_text.delta\ndata: {\"ty"),
        ] {
            let (out, _, _) =
                relay_in(Protocol::Responses, vec![Ok(CREATED), Ok(DELTA), cut]).await;
            let last = out.strip_prefix(&format!("{CREATED}{DELTA}")).unwrap();
            let data = last
                .strip_prefix("event: error\ndata: ")
                .and_then(|rest| rest.strip_suffix("\n\n"))
                .unwrap_or_else(|| panic!("not one error event: {last:?}"));
            let data: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], "error");
            assert_eq!(data["sequence_number"], 2);
            assert_eq!(data["code"], "upstream_stream_error");
            assert_eq!(data["error"]["code"], "upstream_stream_error");
            assert!(data["message"].as_str().unwrap().contains("upstream"));
        }
        // An upstream that ends cleanly on its final event needs no error event.
        let (out, _, _) = relay_in(Protocol::Responses, vec![Ok(CREATED), Ok(COMPLETED)]).await;
        assert_eq!(out, format!("{CREATED}{COMPLETED}"));
    }

    #[tokio::test]
    async fn upstream_responses_error_events_end_the_stream_masked() {
        let failed = "event: error\ndata: {\"type\":\"error\",\"code\":\"x\",\"message\":\"bad key upstream-secret-key\",\"sequence_number\":1}\n\n";
        let (out, _, _) = relay_in(Protocol::Responses, vec![Ok(CREATED), Ok(failed)]).await;
        assert!(out.starts_with(CREATED));
        assert!(out.contains("bad key [redacted]"), "{out}");
        assert!(!out.contains("upstream-secret-key"));
        // The upstream's own error event ends the stream: no second one from relay.
        assert_eq!(out.matches("event: error").count(), 1, "{out}");
    }
}
