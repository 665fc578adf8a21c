//! What a request carries down through the layers: its id, and what is learnt while it is
//! handled (the caller, the token usage). Below every layer that fills it in, so that `relay`,
//! `auth` and `http` all reach it without importing from each other.
//!
//! The outer middleware (`http::middleware::observe`) creates one `Arc<RequestContext>` per
//! request and puts it in the request's extensions; the authentication extractor records the
//! user, the relay records usage (also from inside a stream, after the handler returned), and
//! the middleware reads both for the request's log line when the response body ends.

use std::sync::{Mutex, OnceLock};

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

/// What is learnt about a request while it is handled, for its log line.
#[derive(Debug)]
pub struct RequestContext {
    /// The request id echoed in `X-Request-ID`.
    pub request_id: HeaderValue,
    user_id: OnceLock<Uuid>,
    usage: Mutex<Option<Usage>>,
}

impl RequestContext {
    /// A context for a request with this id.
    pub fn new(request_id: HeaderValue) -> Self {
        RequestContext {
            request_id,
            user_id: OnceLock::new(),
            usage: Mutex::new(None),
        }
    }

    /// Records the authenticated user.
    pub fn set_user(&self, id: Uuid) {
        let _ = self.user_id.set(id);
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
}
