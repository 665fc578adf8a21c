//! The short-lived, bounded cache behind [`super::status`] and [`super::api_keys`]: what the
//! database said of a user or a key, trusted for a few seconds.
//!
//! An entry older than the time to live is *stale*: the request that finds it renews it on the
//! spot and reads the database again, while the others keep using the stale value meanwhile, so
//! one key or user costs one query per time to live, never one per request. Should that request
//! be dropped before its read ends, its [`Renewal`] makes the entry stale again for the next
//! one (not trusted for another few seconds). The map is sharded, and bounded: when a shard is
//! full, entries past their time are dropped, and if that is not enough, the whole shard.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// foldhash, seeded per process: the keys are user ids and SHA-256 digests, which a client
/// cannot pick to collide, and SipHash cost twice per lookup (the shard, then the map).
type RandomState = foldhash::fast::RandomState;

const SHARDS: usize = 16;

/// What the cache knows of a key.
pub(crate) enum Cached<V> {
    /// Read less than the time to live ago.
    Fresh(V),
    /// Older: the caller reads it again, holding the [`Renewal`] while it does.
    Stale(V),
    /// Never read (or forgotten).
    Unknown,
}

type Shard<K, V> = Mutex<HashMap<K, (Instant, V), RandomState>>;

/// A sharded map of values, each with the time it was read.
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    per_shard: usize,
    hasher: RandomState,
    shards: Vec<Shard<K, V>>,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache trusting a value for `ttl`, holding about `max` values at most.
    pub(crate) fn new(ttl: Duration, max: usize) -> Self {
        TtlCache {
            ttl,
            per_shard: (max / SHARDS).max(1),
            hasher: RandomState::default(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }

    fn shard(&self, key: &K) -> &Shard<K, V> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The remembered value. A stale one is renewed on the spot (so that only this caller reads
    /// it again); the caller holds [`TtlCache::renewal`] until its read ends.
    pub(crate) fn get(&self, key: &K) -> Cached<V> {
        let Ok(mut map) = self.shard(key).lock() else {
            return Cached::Unknown;
        };
        match map.get_mut(key) {
            None => Cached::Unknown,
            Some((at, value)) if at.elapsed() < self.ttl => Cached::Fresh(value.clone()),
            Some((at, value)) => {
                *at = Instant::now();
                Cached::Stale(value.clone())
            }
        }
    }

    /// Remembers what `make` returns, given the value remembered so far (if any), as read now.
    pub(crate) fn insert_with(&self, key: K, make: impl FnOnce(Option<&V>) -> V) {
        let Ok(mut map) = self.shard(&key).lock() else {
            return;
        };
        if map.len() >= self.per_shard && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            if map.len() >= self.per_shard {
                map.clear();
            }
        }
        let value = make(map.get(&key).map(|(_, value)| value));
        map.insert(key, (Instant::now(), value));
    }

    /// Runs `change` on the remembered value, if there is one.
    pub(crate) fn update<R>(&self, key: &K, change: impl FnOnce(&mut V) -> R) -> Option<R> {
        let mut map = self.shard(key).lock().ok()?;
        map.get_mut(key).map(|(_, value)| change(value))
    }

    /// Forgets `key`.
    pub(crate) fn remove(&self, key: &K) {
        if let Ok(mut map) = self.shard(key).lock() {
            map.remove(key);
        }
    }

    /// Forgets every value `forget` says yes to.
    pub(crate) fn forget_where(&self, forget: impl Fn(&V) -> bool) {
        for shard in &self.shards {
            if let Ok(mut map) = shard.lock() {
                map.retain(|_, (_, value)| !forget(value));
            }
        }
    }

    /// The guard of a stale entry being read again (see [`Renewal`]).
    pub(crate) fn renewal(&self, key: K) -> Renewal<'_, K, V> {
        Renewal {
            cache: self,
            key,
            done: false,
        }
    }
}

/// A stale entry being read again: dropped unfinished (the request was cancelled), it makes the
/// entry stale again.
pub(crate) struct Renewal<'a, K: Hash + Eq + Clone, V: Clone> {
    cache: &'a TtlCache<K, V>,
    key: K,
    done: bool,
}

impl<K: Hash + Eq + Clone, V: Clone> Renewal<'_, K, V> {
    /// The read ended (and remembered its value).
    pub(crate) fn finish(mut self) {
        self.done = true;
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Renewal<'_, K, V> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut map) = self.cache.shard(&self.key).lock() {
            match Instant::now().checked_sub(self.cache.ttl) {
                Some(stale) => {
                    if let Some((at, _)) = map.get_mut(&self.key) {
                        *at = stale;
                    }
                }
                None => {
                    map.remove(&self.key);
                }
            }
        }
    }
}
