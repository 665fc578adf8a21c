//! In-process buckets: the fallback when Redis is away, and the only backend in dev mode.
//!
//! Sharded so that cores do not contend on one lock. Memory stays bounded however many keys
//! arrive: a shard that grows past its share first drops buckets that have refilled (a full
//! bucket and an absent one behave the same), and if that is not enough, it is cleared.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Mutex;
use std::time::Instant;

use super::bucket::{self, Bucket, Decision, Op, Shape};

const SHARDS: usize = 32;

/// Buckets kept before eviction starts, over all shards.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

#[derive(Default)]
struct Shard {
    /// Bucket, its shape, and when it was last used (in `tick`s).
    buckets: HashMap<String, (Bucket, Shape, u64)>,
    /// Counts uses, for least-recently-used eviction.
    tick: u64,
}

/// The memory backend.
pub struct MemoryLimiter {
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard>>,
    max_per_shard: usize,
}

impl MemoryLimiter {
    /// A limiter keeping at most about `max_keys` buckets.
    pub fn new(max_keys: usize) -> Self {
        MemoryLimiter {
            epoch: Instant::now(),
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_per_shard: (max_keys / SHARDS).max(1),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Applies `op` to `key`'s bucket.
    pub fn check(&self, key: &str, shape: Shape, op: Op) -> Decision {
        let now = self.now_ms();
        let shard = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut guard = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *guard;
        shard.tick += 1;
        let tick = shard.tick;
        let map = &mut shard.buckets;
        let stored = map
            .get(key)
            .filter(|(_, s, _)| *s == shape)
            .map(|(b, _, _)| *b);
        let (updated, decision) = bucket::apply(stored, now, shape, op);
        if stored.is_none() && map.len() >= self.max_per_shard {
            map.retain(|_, (b, s, _)| bucket::level_at(*b, now, *s) < s.full());
            if map.len() >= self.max_per_shard {
                // Still full of live buckets: drop the quarter used longest ago (rather than
                // all of them, which would reset every active limit at once).
                let mut uses: Vec<u64> = map.values().map(|(_, _, used)| *used).collect();
                let cut = uses.len() / 4;
                let oldest_kept = *uses.select_nth_unstable(cut).1;
                map.retain(|_, (_, _, used)| *used >= oldest_kept);
            }
        }
        map.insert(key.to_owned(), (updated, shape, tick));
        decision
    }

    /// Buckets held now (for tests).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.buckets.len()).unwrap_or(0))
            .sum()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_stays_bounded() {
        let limiter = MemoryLimiter::new(320);
        let shape = Shape {
            capacity: 5,
            window_ms: 60_000,
        };
        for i in 0..10_000 {
            limiter.check(&format!("key-{i}"), shape, Op::Take(1));
        }
        assert!(limiter.len() <= 320, "{}", limiter.len());
    }

    #[test]
    fn eviction_keeps_the_active_buckets() {
        let limiter = MemoryLimiter::new(SHARDS * 8);
        let shape = Shape {
            capacity: 1,
            window_ms: 3_600_000,
        };
        assert!(limiter.check("victim", shape, Op::Take(1)).allowed);
        for i in 0..2_000 {
            limiter.check(&format!("flood-{i}"), shape, Op::Take(1));
            // The victim keeps trying: its bucket must stay empty, never reset by eviction.
            assert!(
                !limiter.check("victim", shape, Op::Take(1)).allowed,
                "reset after {i} keys"
            );
        }
    }

    #[test]
    fn a_key_runs_out() {
        let limiter = MemoryLimiter::new(100);
        let shape = Shape {
            capacity: 2,
            window_ms: 60_000,
        };
        assert!(limiter.check("k", shape, Op::Take(1)).allowed);
        assert!(limiter.check("k", shape, Op::Take(1)).allowed);
        assert!(!limiter.check("k", shape, Op::Take(1)).allowed);
        assert!(limiter.check("other", shape, Op::Take(1)).allowed);
    }
}
