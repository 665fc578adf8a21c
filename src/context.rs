//! What a request carries down through the layers: its id, and what is learnt while it is
//! handled (the caller, the token usage). Below every layer that fills it in, so that `relay`,
//! `auth` and `http` all reach it without importing from each other.
//!
//! The outer middleware (`http::middleware::ObserveLayer`) creates one `Arc<RequestContext>` per
//! request and puts it in the request's extensions; the authentication extractor records the
//! user, the relay records usage (also from inside a stream, after the handler returned), and
//! the middleware reads both for the request's log line when the response body ends.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use http::HeaderValue;
use uuid::Uuid;

/// Token counts of one request, when the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// A request that went to the upstream: what its usage record needs besides the counts.
#[derive(Debug, Clone)]
pub struct UpstreamCall {
    /// `chat`, `responses` or `embeddings`.
    pub endpoint: &'static str,
    /// The model asked for.
    pub model: String,
    /// Whether the answer is streamed.
    pub streamed: bool,
    /// The size of the request body sent (for a prompt estimate when usage never arrives).
    pub prompt_bytes: u64,
}

/// The most text of a streamed answer kept for estimating its tokens when its usage never
/// arrives; the estimate scales its count by the bytes delivered beyond it. Small, because
/// every stream keeps it and it is almost never needed.
pub const MAX_DELIVERED_TEXT: usize = 16 * 1024;

/// The room made for a stream's delivered text at its first delta.
const FIRST_DELIVERED_BYTES: usize = 128;

/// What a stream delivered, for an estimate when the upstream's usage never arrives.
#[derive(Debug, Default)]
pub struct Delivered {
    /// The answer's text so far (up to [`MAX_DELIVERED_TEXT`] bytes).
    pub text: String,
    /// Bytes of answer text delivered, also past the kept text.
    pub bytes: u64,
}

/// What to do with a request's token reservation when it ends: called once, with the tokens
/// the request used (`None`: unknown, so the reservation is kept whole).
pub struct Settlement(pub Box<dyn FnOnce(Option<u64>) + Send>);

impl std::fmt::Debug for Settlement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settlement")
    }
}

/// How a relayed stream ended, as relay saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Its last event arrived (`[DONE]`, `response.completed`, …).
    Done,
    /// It failed after it started (the status its record carries: 502, or 504 for a stall).
    Failed(u16),
}

/// What is learnt about a request while it is handled, for its log line and usage record.
#[derive(Debug)]
pub struct RequestContext {
    /// The request id echoed in `X-Request-ID`.
    pub request_id: HeaderValue,
    /// When the request arrived.
    pub started: Instant,
    user_id: OnceLock<Uuid>,
    api_key_id: OnceLock<Uuid>,
    usage: Mutex<Option<Usage>>,
    upstream: OnceLock<UpstreamCall>,
    first_byte: OnceLock<Instant>,
    delivered: Mutex<Delivered>,
    stream_end: OnceLock<StreamEnd>,
    settlement: Mutex<Option<Settlement>>,
}

impl RequestContext {
    /// A context for a request with this id.
    pub fn new(request_id: HeaderValue) -> Self {
        RequestContext {
            request_id,
            started: Instant::now(),
            user_id: OnceLock::new(),
            api_key_id: OnceLock::new(),
            usage: Mutex::new(None),
            upstream: OnceLock::new(),
            first_byte: OnceLock::new(),
            delivered: Mutex::new(Delivered::default()),
            stream_end: OnceLock::new(),
            settlement: Mutex::new(None),
        }
    }

    /// Records the authenticated user.
    pub fn set_user(&self, id: Uuid) {
        let _ = self.user_id.set(id);
    }

    /// Records the API key the request came with.
    pub fn set_api_key(&self, id: Uuid) {
        let _ = self.api_key_id.set(id);
    }

    /// The API key the request came with, if any.
    pub fn api_key(&self) -> Option<Uuid> {
        self.api_key_id.get().copied()
    }

    /// Records the request's token usage (the last report wins).
    pub fn set_usage(&self, usage: Usage) {
        if let Ok(mut slot) = self.usage.lock() {
            *slot = Some(usage);
        }
    }

    /// The authenticated user, once known.
    pub fn user(&self) -> Option<Uuid> {
        self.user_id.get().copied()
    }

    /// The usage recorded so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage.lock().ok().and_then(|u| *u)
    }

    /// Records that the request is going to the upstream (it gets a usage record).
    pub fn set_upstream(&self, call: UpstreamCall) {
        let _ = self.upstream.set(call);
    }

    /// The upstream call, if the request made one.
    pub fn upstream(&self) -> Option<&UpstreamCall> {
        self.upstream.get()
    }

    /// Records that the upstream's answer (its headers) arrived.
    pub fn set_first_byte(&self) {
        let _ = self.first_byte.set(Instant::now());
    }

    /// When the upstream's answer arrived.
    pub fn first_byte(&self) -> Option<Instant> {
        self.first_byte.get().copied()
    }

    /// Notes answer text delivered to the client (a stream's deltas).
    pub fn add_delivered(&self, text: &str) {
        if let Ok(mut delivered) = self.delivered.lock() {
            delivered.bytes += text.len() as u64;
            let room = MAX_DELIVERED_TEXT.saturating_sub(delivered.text.len());
            if room > 0 {
                let mut end = text.len().min(room);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                if delivered.text.capacity() == 0 {
                    // Room for a short answer's deltas at once: grown from nothing, a 100-byte
                    // answer took five allocations (issue 14).
                    delivered.text.reserve(FIRST_DELIVERED_BYTES.max(end));
                }
                delivered.text.push_str(&text[..end]);
            }
        }
    }

    /// Records how the stream ended (the first report wins).
    pub fn set_stream_end(&self, end: StreamEnd) {
        let _ = self.stream_end.set(end);
    }

    /// How the stream ended, if it did.
    pub fn stream_end(&self) -> Option<StreamEnd> {
        self.stream_end.get().copied()
    }

    /// Sets what to do with the request's token reservation when it ends.
    pub fn set_settlement(&self, settlement: Settlement) {
        if let Ok(mut slot) = self.settlement.lock() {
            *slot = Some(settlement);
        }
    }

    /// Takes the settlement (once, when the request ends).
    pub fn take_settlement(&self) -> Option<Settlement> {
        self.settlement.lock().ok().and_then(|mut s| s.take())
    }

    /// Takes what was delivered (once, for the usage record).
    pub fn take_delivered(&self) -> Delivered {
        self.delivered
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_text_is_capped_at_a_character_boundary() {
        let ctx = RequestContext::new(HeaderValue::from_static("t"));
        ctx.add_delivered(&"a".repeat(MAX_DELIVERED_TEXT - 1));
        ctx.add_delivered("éé");
        let delivered = ctx.take_delivered();
        assert_eq!(
            delivered.text.len(),
            MAX_DELIVERED_TEXT - 1,
            "é does not fit in 1 byte"
        );
        assert_eq!(delivered.bytes, MAX_DELIVERED_TEXT as u64 + 3);
        assert_eq!(ctx.take_delivered().bytes, 0, "taken once");
    }
}
