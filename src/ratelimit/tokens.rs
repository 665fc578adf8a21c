//! Token limits: each user's bucket of `TOKEN_LIMIT` tokens per `TOKEN_LIMIT_WINDOW`, in the
//! same store as request limits (Redis shared by every replica, memory as the fallback).
//!
//! A request is admitted only if its worst case fits: [`RateLimiter::admit`] takes one request
//! from the request-limit bucket and that many tokens from the token bucket at once, atomically
//! (one script call), or refuses. When the request ends,
//! the [`Reservation`] is settled: the part its usage did not spend goes back; when its usage
//! never arrives (a stream cut short) nothing goes back. So the bucket is charged at least
//! what was used, and a user never spends more than the limit, on any number of replicas.

use std::sync::Arc;

use uuid::Uuid;

use super::bucket::MAX_UNITS;
use super::{Decision, Op, Pool, RateLimiter, Shape, Step, Subject};
use crate::auth::UserTokenLimit;
use crate::config::Endpoint;

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
            self.limiter
                .apply_one(Step {
                    key: &self.key,
                    shape: self.shape,
                    op,
                    pool: Pool::Tokens,
                })
                .await;
        });
    }
}

/// A token-limit decision.
pub enum TokenDecision {
    /// No token limit applies to this user, or none was tried (the request was refused by its
    /// rate limit first).
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

    /// Admits a metered request of `user`: takes one request from its rate-limit bucket
    /// (`request`: the endpoint and subject, when the request limit was not checked already)
    /// and, when a token limit applies (the user's `own`, or `TOKEN_LIMIT`), reserves `worst`
    /// tokens (its worst case) from the user's token bucket. Both in one script call on Redis;
    /// the reservation is only tried when the request limit lets the request through. Answers
    /// the request-limit decision (when checked here) and the token decision.
    pub async fn admit(
        self: &Arc<Self>,
        request: Option<(Endpoint, &Subject)>,
        user: Uuid,
        own: Option<UserTokenLimit>,
        worst: u64,
    ) -> (Option<Decision>, TokenDecision) {
        let request_key =
            request.map(|(endpoint, subject)| (endpoint, self.key(endpoint, subject)));
        let mut steps = Vec::with_capacity(2);
        if let Some((endpoint, key)) = &request_key {
            steps.push(self.request_step(*endpoint, key, Op::Take(1)));
        }
        let shape = self.token_shape(own);
        let key = shape.map(|shape| self.token_key(user, shape));
        if let (Some(shape), Some(key)) = (shape, &key) {
            steps.push(Step {
                key,
                shape,
                op: Op::Take(worst),
                pool: Pool::Tokens,
            });
        }
        if steps.is_empty() {
            return (None, TokenDecision::Off);
        }
        let mut decisions = self.apply(&steps).await.into_iter();
        let request = request_key.as_ref().and_then(|_| decisions.next());
        if let (Some((endpoint, _)), Some(decision)) = (&request_key, &request) {
            self.count(super::endpoint_label(*endpoint), decision.allowed);
        }
        let token_decision = decisions.next();
        if let Some(decision) = &token_decision {
            self.count("tokens", decision.allowed);
        }
        let tokens = match (token_decision, shape, key) {
            (Some(decision), _, _) if !decision.allowed => TokenDecision::Refused(decision),
            (Some(decision), Some(shape), Some(key)) => TokenDecision::Admitted(
                Reservation {
                    limiter: self.clone(),
                    key,
                    shape,
                    tokens: worst,
                },
                decision,
            ),
            _ => TokenDecision::Off,
        };
        (request, tokens)
    }

    /// The key of `user`'s token bucket of `shape`. The `{…}` hash tag is the user, as in the
    /// user's request-limit keys (one Redis Cluster slot for both); the shape is in the key,
    /// so that a changed limit starts a bucket of its own (a stored level means nothing under
    /// another shape).
    fn token_key(&self, user: Uuid, shape: Shape) -> String {
        format!(
            "{}:tl:{{user:{user}}}:{}:{}",
            self.prefix, shape.capacity, shape.window_ms
        )
    }
}
