//! API keys, for servers: minting, checking and a short-lived cache of their state.
//!
//! A key is `rk-` followed by the URL-safe base64 of 32 random bytes and a 12-byte tag, an
//! HMAC-SHA256 of those bytes under a key derived from `SECRET_KEY`. Only relay can make a key
//! whose tag checks, so a made-up key is refused in memory, without a database query: guessing
//! keys costs relay nothing but an HMAC. The database holds the SHA-256 of the whole key (never
//! the key) and its first characters, to recognise it in a list. Changing `SECRET_KEY` ends
//! every key, as it ends every access token.
//!
//! A key that checks is looked up by its hash in a cache (an entry is trusted for
//! [`KEY_TTL`], then read again by the one request that finds it stale), so that a deleted or
//! expired key is refused on every replica within seconds, and the request path makes no query
//! per request. The last-used time is written off the request path, at most once a minute a key.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::cache::{Cached, TtlCache};
use crate::error::ApiError;
use crate::store::Store;

/// What every key starts with.
pub const KEY_PREFIX: &str = "rk-";
const RANDOM_BYTES: usize = 32;
const TAG_BYTES: usize = 12;
/// Characters of a key shown in lists (`rk-` and 9 more): enough to tell keys apart, far too
/// few to guess the rest.
const VISIBLE_CHARS: usize = 12;
/// The length of a key: `rk-` and 44 bytes in base64 (59 characters).
pub const KEY_LEN: usize = KEY_PREFIX.len() + (RANDOM_BYTES + TAG_BYTES).div_ceil(3) * 4 - 1;

/// How long a key's state is trusted before it is read again.
pub const KEY_TTL: Duration = Duration::from_secs(3);
/// How often a key's last-used time is written at most.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);
const LOOKUP_BUDGET: Duration = Duration::from_millis(200);
const MAX_KEYS: usize = 100_000;

/// A key just made: the secret (shown once) and what is stored of it.
pub struct MintedKey {
    /// The whole key, `rk-…`.
    pub key: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    /// Its first characters.
    pub prefix: String,
}

/// Who a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner {
    /// The key's id.
    pub key_id: Uuid,
    /// The owner's id.
    pub user_id: Uuid,
}

#[derive(Clone, Copy)]
struct Known {
    owner: KeyOwner,
    expires_at: Option<DateTime<Utc>>,
}

/// What the cache holds of a key: the key (`None`: no such key), and when its last-used time
/// was last queued for writing.
#[derive(Clone, Copy)]
struct Entry {
    key: Option<Known>,
    touched_at: Option<Instant>,
}

/// Keys: minting, and the cache every request with a key asks.
pub struct ApiKeys {
    tag_key: [u8; 32],
    store: Store,
    cache: TtlCache<[u8; 32], Entry>,
    touches: mpsc::Sender<Uuid>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys").finish_non_exhaustive()
    }
}

/// Whether `token` has the shape of an API key (and not of a JWT).
pub fn looks_like_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

impl ApiKeys {
    /// Keys tagged under `secret` (`SECRET_KEY`), stored in `store`; starts the task that
    /// writes last-used times (needs a Tokio runtime).
    pub fn new(secret: &[u8], store: Store) -> Self {
        // A key of its own, so that a tag never doubles as anything signed with SECRET_KEY.
        let mut derive = Sha256::new();
        derive.update(b"relay api key tag v1\0");
        derive.update(secret);
        let tag_key: [u8; 32] = derive.finalize().into();
        let (touches, queue) = mpsc::channel(1024);
        tokio::spawn(write_touches(store.clone(), queue));
        ApiKeys {
            tag_key,
            store,
            cache: TtlCache::new(KEY_TTL, MAX_KEYS),
            touches,
        }
    }

    /// HMAC-SHA256 under the tag key (zero-padded to the block, as HMAC does with short keys).
    fn mac(&self) -> Hmac<Sha256> {
        let mut key = [0u8; 64];
        key[..32].copy_from_slice(&self.tag_key);
        <Hmac<Sha256> as KeyInit>::new(&key.into())
    }

    fn tag(&self, random: &[u8]) -> [u8; TAG_BYTES] {
        let mut mac = self.mac();
        mac.update(random);
        let full = mac.finalize().into_bytes();
        let mut tag = [0; TAG_BYTES];
        tag.copy_from_slice(&full[..TAG_BYTES]);
        tag
    }

    /// A new key.
    pub fn mint(&self) -> MintedKey {
        let mut bytes = [0u8; RANDOM_BYTES + TAG_BYTES];
        rand::rng().fill_bytes(&mut bytes[..RANDOM_BYTES]);
        let tag = self.tag(&bytes[..RANDOM_BYTES]);
        bytes[RANDOM_BYTES..].copy_from_slice(&tag);
        let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
        MintedKey {
            hash: hex::encode(Sha256::digest(key.as_bytes())),
            prefix: key[..VISIBLE_CHARS].to_owned(),
            key,
        }
    }

    /// The SHA-256 of `key` when its tag checks (in constant time); `None` for anything relay
    /// did not make.
    fn checked_hash(&self, key: &str) -> Option<[u8; 32]> {
        if key.len() != KEY_LEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(key.strip_prefix(KEY_PREFIX)?).ok()?;
        if bytes.len() != RANDOM_BYTES + TAG_BYTES {
            return None;
        }
        let mut mac = self.mac();
        mac.update(&bytes[..RANDOM_BYTES]);
        mac.verify_truncated_left(&bytes[RANDOM_BYTES..]).ok()?;
        Some(Sha256::digest(key.as_bytes()).into())
    }

    /// The owner of `key`, or a 401 for a key that is unknown, deleted or expired.
    pub async fn owner(&self, key: &str) -> Result<KeyOwner, ApiError> {
        let invalid = || ApiError::unauthorized("invalid API key", "invalid_api_key");
        let hash = self.checked_hash(key).ok_or_else(invalid)?;
        let known = match self.cache.get(&hash) {
            Cached::Fresh(entry) => entry.key,
            Cached::Stale(last) => {
                let renewal = self.cache.renewal(hash);
                let known = Box::pin(self.read(hash, Some(last.key))).await;
                renewal.finish();
                known?
            }
            Cached::Unknown => Box::pin(self.read(hash, None)).await?,
        };
        let known = known.ok_or_else(invalid)?;
        if known.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(ApiError::unauthorized(
                "this API key has expired",
                "api_key_expired",
            ));
        }
        self.touch(&hash, known.owner.key_id);
        Ok(known.owner)
    }

    /// Reads the key from the database and remembers it. When the database does not answer in
    /// time, the last known state is used; a key never seen is then refused with a 503 (it
    /// cannot be checked).
    async fn read(
        &self,
        hash: [u8; 32],
        last: Option<Option<Known>>,
    ) -> Result<Option<Known>, ApiError> {
        let found = tokio::time::timeout(
            LOOKUP_BUDGET,
            self.store.api_key_by_hash(&hex::encode(hash)),
        )
        .await;
        let key = match found {
            Ok(Ok(record)) => record.map(|r| Known {
                owner: KeyOwner {
                    key_id: r.id,
                    user_id: r.user_id,
                },
                expires_at: r.expires_at,
            }),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read an API key; using the last known state");
                last.ok_or_else(unavailable)?
            }
            Err(_) => {
                tracing::warn!("an API key took too long to read; using the last known state");
                last.ok_or_else(unavailable)?
            }
        };
        self.cache.insert_with(hash, |last| Entry {
            key,
            touched_at: last.and_then(|e| e.touched_at),
        });
        Ok(key)
    }

    /// Queues a last-used write for `key_id` when none was queued in the last minute.
    fn touch(&self, hash: &[u8; 32], key_id: Uuid) {
        let due = self.cache.update(hash, |entry| {
            let due = entry
                .touched_at
                .is_none_or(|at| at.elapsed() >= TOUCH_EVERY);
            if due {
                entry.touched_at = Some(Instant::now());
            }
            due
        }) == Some(true);
        if due {
            // A full queue skips this write: the time is a hint, never worth a wait.
            let _ = self.touches.try_send(key_id);
        }
    }

    /// Forgets the cached keys whose owner `forget` says yes to.
    fn forget_where(&self, forget: impl Fn(&KeyOwner) -> bool) {
        self.cache
            .forget_where(|entry| entry.key.is_some_and(|k| forget(&k.owner)));
    }

    /// Forgets key `key_id` (deleted on this replica, so that it bites at once here; other
    /// replicas notice within [`KEY_TTL`]).
    pub fn forget_key(&self, key_id: Uuid) {
        self.forget_where(|owner| owner.key_id == key_id);
    }

    /// Forgets every key of `user_id` (revoked or deleted on this replica).
    pub fn forget_user(&self, user_id: Uuid) {
        self.forget_where(|owner| owner.user_id == user_id);
    }
}

fn unavailable() -> ApiError {
    ApiError::ServiceUnavailable("cannot check the API key now, try again later".into())
}

/// Writes last-used times: gathers the ids queued within a second, then one update each.
async fn write_touches(store: Store, mut queue: mpsc::Receiver<Uuid>) {
    while let Some(first) = queue.recv().await {
        let mut ids = vec![first];
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(id)) = tokio::time::timeout_at(until, queue.recv()).await {
            if !ids.contains(&id) && ids.len() < 1024 {
                ids.push(id);
            }
        }
        if let Err(e) = store.touch_api_keys(&ids, Utc::now()).await {
            tracing::warn!(error = %e, keys = ids.len(), "cannot record API keys' last use");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn keys(secret: &[u8]) -> ApiKeys {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&crate::config::Database::Sqlite(dir.path().join("k.db")))
            .await
            .unwrap();
        ApiKeys::new(secret, store)
    }

    #[tokio::test]
    async fn only_keys_relay_made_check() {
        let keys = keys(b"a secret key of at least thirty-two bytes").await;
        let minted = keys.mint();
        assert_eq!(minted.key.len(), KEY_LEN);
        assert!(minted.key.starts_with(KEY_PREFIX) && looks_like_key(&minted.key));
        assert_eq!(minted.prefix, minted.key[..VISIBLE_CHARS]);
        let hash = keys.checked_hash(&minted.key).expect("its own key checks");
        assert_eq!(hex::encode(hash), minted.hash);
        // Two keys never repeat.
        assert_ne!(keys.mint().key, minted.key);
        // One character changed anywhere, a key of the right shape made up, or a key made under
        // another SECRET_KEY: refused in memory.
        for i in KEY_PREFIX.len()..minted.key.len() {
            let mut forged = minted.key.clone().into_bytes();
            forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
            let forged = String::from_utf8(forged).unwrap();
            assert!(keys.checked_hash(&forged).is_none(), "{i}");
        }
        let made_up = format!("{KEY_PREFIX}{}", "A".repeat(KEY_LEN - KEY_PREFIX.len()));
        assert!(keys.checked_hash(&made_up).is_none());
        let other = keys_with_other_secret().await;
        assert!(other.checked_hash(&minted.key).is_none());
        assert!(keys.checked_hash("rk-short").is_none());
        assert!(keys.checked_hash(&format!("{}x", minted.key)).is_none());
    }

    async fn keys_with_other_secret() -> ApiKeys {
        keys(b"another secret key of at least thirty-two bytes").await
    }
}
