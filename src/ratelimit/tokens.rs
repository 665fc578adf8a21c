//! Token limits: each user's bucket of `TOKEN_LIMIT` tokens per `TOKEN_LIMIT_WINDOW`, in the
//! same store as request limits (Redis shared by every replica, memory as the fallback).
//!
//! A request is admitted only if its worst case fits: [`RateLimiter::reserve_tokens`] takes
//! that many tokens at once, atomically (one script call), or refuses. When the request ends,
//! the [`Reservation`] is settled: the part its usage did not spend goes back; when its usage
//! never arrives (a stream cut short) nothing goes back. So the bucket is charged at least
//! what was used, and a user never spends more than the limit, on any number of replicas.

use std::sync::Arc;

use uuid::Uuid;

use super::bucket::MAX_UNITS;
use super::{Decision, Op, RateLimiter, Shape};
use crate::auth::UserTokenLimit;

/// Tokens reserved for one request, to settle when it ends.
pub struct Reservation {
    limiter: Arc<RateLimiter>,
    key: String,
    shape: Shape,
    /// How many tokens were reserved.
    pub tokens: u64,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("key", &self.key)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Reservation {
    /// Settles the reservation: gives back what `used` (the request's real usage) did not
    /// spend; `None` (usage unknown) keeps the whole reservation. Off the request's path: a
    /// short task of its own.
    pub fn settle(self, used: Option<u64>) {
        let Some(used) = used else {
            return;
        };
        let op = match used.cmp(&self.tokens) {
            std::cmp::Ordering::Equal => return,
            std::cmp::Ordering::Less => Op::Refund(self.tokens - used),
            // More than the worst case (the bound failed, or the upstream ignored the cap):
            // charged all the same, down to an empty bucket.
            std::cmp::Ordering::Greater => {
                tracing::warn!(
                    reserved = self.tokens,
                    used,
                    "a request used more tokens than its worst case; charged"
                );
                Op::Charge(used - self.tokens)
            }
        };
        tokio::spawn(async move {
            self.limiter.check_key(&self.key, self.shape, op).await;
        });
    }
}

/// A token-limit decision.
pub enum TokenDecision {
    /// Token limits are off (`TOKEN_LIMIT` is 0).
    Off,
    /// Admitted: the reservation to settle, and the bucket after it.
    Admitted(Reservation, Decision),
    /// Refused: the bucket as it is (its `retry_after_ms` says when the worst case fits).
    Refused(Decision),
}

/// The default window of a user's own limit when neither it nor `TOKEN_LIMIT_WINDOW` names one.
const DEFAULT_WINDOW_SECS: u64 = 86_400;

impl RateLimiter {
    /// The token bucket's shape for a user with `own` limit (or none): the user's own limit
    /// wins over `TOKEN_LIMIT`; `None` when no limit applies.
    pub fn token_shape(&self, own: Option<UserTokenLimit>) -> Option<Shape> {
        let default = self.limits.tokens.map(super::shape);
        let Some(own) = own else {
            return default;
        };
        let window_secs = own
            .window_secs
            .unwrap_or_else(|| default.map_or(DEFAULT_WINDOW_SECS, |shape| shape.window_ms / 1000));
        let window_ms = window_secs.saturating_mul(1000).clamp(1, MAX_UNITS);
        // Kept under 2^53 units (exact in Redis's Lua doubles): a limit too large for its
        // window is lowered to what fits (never raised: the rate must not grow).
        let capacity = own.tokens.clamp(1, (MAX_UNITS / window_ms).max(1));
        Some(Shape {
            capacity,
            window_ms,
        })
    }

    /// Reserves `tokens` (a request's worst case) from `user`'s token bucket, shaped by the
    /// user's `own` limit or `TOKEN_LIMIT`.
    pub async fn reserve_tokens(
        self: &Arc<Self>,
        user: Uuid,
        own: Option<UserTokenLimit>,
        tokens: u64,
    ) -> TokenDecision {
        let Some(shape) = self.token_shape(own) else {
            return TokenDecision::Off;
        };
        // The `{…}` hash tag keeps the user's bucket in one Redis Cluster slot; the shape is
        // in the key, so that a changed limit starts a bucket of its own (a stored level means
        // nothing under another shape).
        let key = format!(
            "{}:tl:{{user:{user}}}:{}:{}",
            self.prefix, shape.capacity, shape.window_ms
        );
        let decision = self.check_key(&key, shape, Op::Take(tokens)).await;
        if !decision.allowed {
            return TokenDecision::Refused(decision);
        }
        let reservation = Reservation {
            limiter: self.clone(),
            key,
            shape,
            tokens,
        };
        TokenDecision::Admitted(reservation, decision)
    }
}
