//! Shared application state, built once by [`crate::app::App::build`] and handed to handlers.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

use crate::auth::api_keys::ApiKeys;
use crate::auth::status::UserStatus;
use crate::auth::{JwtKeys, Passwords, Sessions};
use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::relay::Upstream;
use crate::store::Store;
use crate::usage::UsageSink;

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What every handler can reach.
pub struct Inner {
    /// Validated settings.
    pub config: Arc<Config>,
    /// Users and refresh tokens (on the chat path only through `users`, a few-second cache).
    pub store: Store,
    /// Token signing and verification.
    pub jwt: JwtKeys,
    /// Rate limits (Redis shared by every replica, memory as the fallback).
    pub limiter: Arc<RateLimiter>,
    /// The one pooled upstream client.
    pub upstream: Upstream,
    /// Password hashing on the blocking pool, bounded by a semaphore.
    pub passwords: Passwords,
    /// Whether a token's user still exists and is active (cached for a few seconds).
    pub users: UserStatus,
    /// API keys: checked in memory, their state cached for a few seconds.
    pub keys: ApiKeys,
    /// Where each request that reached the upstream leaves its usage record.
    pub usage: UsageSink,
    /// The Prometheus recorder's handle, for `GET /metrics` (`None`: `METRICS_ENABLED=false`).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// When the process started serving, for `uptime_seconds`.
    pub started_at: Instant,
}

impl AppState {
    /// Wraps the parts.
    pub fn new(inner: Inner) -> Self {
        AppState(Arc::new(inner))
    }

    /// Logins, refreshes and logouts, over this state's keys, store and hasher.
    pub fn sessions(&self) -> Sessions<'_> {
        Sessions {
            jwt: &self.jwt,
            store: &self.store,
            passwords: &self.passwords,
        }
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}
