//! Whether a token's user may still act: a short-lived, bounded cache of each user's state.
//!
//! Access tokens are verified in memory, so on their own they outlive a deactivation or a
//! deletion until they expire. Every request with a valid token also asks this cache; an entry
//! older than [`STATUS_TTL`] is read again from the database. So a deactivated or deleted user
//! is refused on every replica within [`STATUS_TTL`] (plus one query), and the request path
//! costs one map lookup, and one small query per user every few seconds at most — never one
//! per request. When the database cannot answer, the last known state is used (and a user never
//! seen is let through): chat does not depend on the database being up.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::error::ApiError;
use crate::store::Store;

/// How long a user's state is trusted before it is read again.
pub const STATUS_TTL: Duration = Duration::from_secs(3);

const SHARDS: usize = 16;
/// Users remembered at most, over all shards.
const MAX_USERS: usize = 100_000;

/// A user's state as far as requests care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active,
    Inactive,
    Gone,
}

/// The cache; one per process, in the app state.
pub struct UserStatus {
    store: Store,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<HashMap<Uuid, (Instant, State)>>>,
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
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, user: Uuid) -> &Mutex<HashMap<Uuid, (Instant, State)>> {
        &self.shards[(self.hasher.hash_one(user) as usize) % SHARDS]
    }

    /// `Ok` when `user` exists and is active; a 401 when deleted, a 403 when deactivated.
    pub async fn check(&self, user: Uuid) -> Result<(), ApiError> {
        let cached = self
            .shard(user)
            .lock()
            .ok()
            .and_then(|map| map.get(&user).copied());
        let state = match cached {
            Some((at, state)) if at.elapsed() < STATUS_TTL => state,
            _ => self.refresh(user, cached.map(|(_, s)| s)).await,
        };
        match state {
            State::Active => Ok(()),
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

    /// Reads `user`'s state from the database and remembers it.
    async fn refresh(&self, user: Uuid, last: Option<State>) -> State {
        let state = match self.store.user_by_id(user).await {
            Ok(Some(record)) if record.is_active => State::Active,
            Ok(Some(_)) => State::Inactive,
            Ok(None) => State::Gone,
            Err(e) => {
                tracing::warn!(user_id = %user, error = %e, "cannot read the user's state; using the last known");
                // Not remembered: the next request asks again.
                return last.unwrap_or(State::Active);
            }
        };
        if let Ok(mut map) = self.shard(user).lock() {
            if map.len() >= MAX_USERS / SHARDS && !map.contains_key(&user) {
                map.retain(|_, (at, _)| at.elapsed() < STATUS_TTL);
                if map.len() >= MAX_USERS / SHARDS {
                    map.clear();
                }
            }
            map.insert(user, (Instant::now(), state));
        }
        state
    }

    /// Forgets `user`'s state, so that the next request reads it (after a change made by this
    /// process).
    pub fn forget(&self, user: Uuid) {
        if let Ok(mut map) = self.shard(user).lock() {
            map.remove(&user);
        }
    }
}
