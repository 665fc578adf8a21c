//! Whether a token's user may still act: a short-lived, bounded cache of each user's state.
//!
//! Access tokens are verified in memory, so on their own they outlive a deactivation or a
//! deletion until they expire. Every request with a valid token also asks this cache; an entry
//! older than [`STATUS_TTL`] is read again from the database. So a deactivated or deleted user
//! is refused on every replica within [`STATUS_TTL`] (plus one query), and the request path
//! costs one map lookup, and one small query per user every few seconds at most — never one
//! per request (a stale entry is renewed by the request that finds it, the others keep using
//! it meanwhile). When the database cannot answer within 200 ms, the last known state is used
//! (and a user never seen is let through), and remembered: chat does not depend on the
//! database being up.

use std::time::Duration;

use uuid::Uuid;

use super::UserTokenLimit;
use super::cache::{Cached, TtlCache};
use crate::error::ApiError;
use crate::store::Store;

/// How long a user's state is trusted before it is read again.
pub const STATUS_TTL: Duration = Duration::from_secs(3);

/// How long a request waits for the database to tell a user's state.
const LOOKUP_BUDGET: Duration = Duration::from_millis(200);
/// Users remembered at most, over all shards.
const MAX_USERS: usize = 100_000;

/// What requests need to know of an active user, a few seconds old at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Standing {
    /// The user's own token limit, if set.
    pub token_limit: Option<UserTokenLimit>,
    /// Whether the user is an admin now (not when the token was issued).
    pub is_admin: bool,
    /// Access tokens issued at or before this time (Unix milliseconds) are refused.
    pub sessions_revoked_at: Option<i64>,
}

impl Standing {
    /// Whether an access token issued at `iat` (seconds since the epoch) was revoked. A token
    /// issued in the same second as the revocation counts as revoked (the claim has whole
    /// seconds): a client that logged in right then logs in again.
    pub fn revoked(&self, iat: i64) -> bool {
        self.sessions_revoked_at
            .is_some_and(|revoked| iat.saturating_mul(1000) <= revoked)
    }
}

/// A user's state as far as requests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active(Standing),
    Inactive,
    Gone,
}

fn standing_of(record: &crate::store::UserRecord) -> Standing {
    Standing {
        token_limit: token_limit_of(record),
        is_admin: record.is_admin,
        sessions_revoked_at: record.sessions_revoked_at,
    }
}

/// The user's own token limit, from its record (a non-positive value means none).
fn token_limit_of(record: &crate::store::UserRecord) -> Option<UserTokenLimit> {
    let tokens = u64::try_from(record.token_limit?).ok().filter(|t| *t > 0)?;
    Some(UserTokenLimit {
        tokens,
        window_secs: record
            .token_limit_window
            .and_then(|w| u64::try_from(w).ok())
            .filter(|w| *w > 0),
    })
}

/// The cache; one per process, in the app state.
pub struct UserStatus {
    store: Store,
    cache: TtlCache<Uuid, State>,
}

impl std::fmt::Debug for UserStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStatus").finish_non_exhaustive()
    }
}

impl UserStatus {
    /// An empty cache over `store`.
    pub fn new(store: Store) -> Self {
        UserStatus {
            store,
            cache: TtlCache::new(STATUS_TTL, MAX_USERS),
        }
    }

    /// `Ok` (with what requests need to know of the user) when `user` exists and is active; a
    /// 401 when deleted, a 403 when deactivated.
    pub async fn check(&self, user: Uuid) -> Result<Standing, ApiError> {
        let state = match self.cache.get(&user) {
            Cached::Fresh(state) => state,
            // One request reads it again; the others meanwhile use the state it had.
            Cached::Stale(state) => {
                let renewal = self.cache.renewal(user);
                let state = Box::pin(self.refresh(user, Some(state))).await;
                renewal.finish();
                state
            }
            Cached::Unknown => Box::pin(self.refresh(user, None)).await,
        };
        match state {
            State::Active(standing) => Ok(standing),
            State::Inactive => Err(ApiError::Forbidden {
                message: "this account is disabled".into(),
                code: "user_inactive",
            }),
            State::Gone => Err(ApiError::unauthorized(
                "the token's user no longer exists",
                "invalid_token",
            )),
        }
    }

    /// Forgets what is cached of `user`, so that a change made on this replica bites here at
    /// once (other replicas read it again within [`STATUS_TTL`]).
    pub fn forget(&self, user: Uuid) {
        self.cache.remove(&user);
    }

    /// Reads `user`'s state from the database (waiting at most [`LOOKUP_BUDGET`]) and
    /// remembers it; when the database does not answer in time, remembers the last known state
    /// (active for a user never seen), so that an outage costs one wait per user per
    /// [`STATUS_TTL`], not one per request.
    async fn refresh(&self, user: Uuid, last: Option<State>) -> State {
        let state = match tokio::time::timeout(LOOKUP_BUDGET, self.store.user_by_id(user)).await {
            Ok(Ok(Some(record))) if record.is_active => State::Active(standing_of(&record)),
            Ok(Ok(Some(_))) => State::Inactive,
            Ok(Ok(None)) => State::Gone,
            Ok(Err(e)) => {
                tracing::warn!(user_id = %user, error = %e, "cannot read the user's state; using the last known");
                last.unwrap_or(State::Active(Standing::default()))
            }
            Err(_) => {
                tracing::warn!(user_id = %user, "the user's state took too long to read; using the last known");
                last.unwrap_or(State::Active(Standing::default()))
            }
        };
        self.cache.insert_with(user, |_| state);
        state
    }
}
