//! Token-bucket arithmetic, shared by the memory backend and (as Lua) by the Redis script.
//!
//! Everything is whole numbers so that Rust and Lua (whose numbers are doubles) agree to the
//! last unit: one token is `window_ms` units, a full bucket `capacity × window_ms` units, and
//! each elapsed millisecond adds `capacity` units. That is exactly a refill of
//! `capacity / window` tokens a second, with no rounding anywhere. Config validation keeps
//! `capacity × window_ms` under 2^53, where doubles are still exact.

/// The largest `capacity × window_ms` allowed (2^53: doubles are exact below it).
pub const MAX_UNITS: u64 = crate::config::MAX_LIMIT_UNITS;

/// A bucket's shape, in the units above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Tokens when full.
    pub capacity: u64,
    /// Milliseconds for an empty bucket to refill.
    pub window_ms: u64,
}

impl Shape {
    /// Units in a full bucket.
    pub fn full(self) -> u64 {
        self.capacity * self.window_ms
    }
}

/// A bucket's stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Units in the bucket.
    pub level: u64,
    /// When `level` was last brought up to date, in milliseconds.
    pub at_ms: u64,
}

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go ahead.
    pub allowed: bool,
    /// The bucket's capacity.
    pub limit: u64,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// Milliseconds until one token is available (0 when allowed).
    pub retry_after_ms: u64,
}

/// Refills `bucket` (absent: full) up to `now_ms` and takes one token if there is one.
/// A clock that goes backwards refills nothing.
pub fn take(bucket: Option<Bucket>, now_ms: u64, shape: Shape) -> (Bucket, Decision) {
    apply(bucket, now_ms, shape, Op::Take(1))
}

/// What a decision does to a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Take this many tokens if there are that many (all or none): one for a request, a
    /// request's worst case for a token limit.
    Take(u64),
    /// Give back this many tokens taken earlier (never above a full bucket); always allowed.
    Refund(u64),
    /// Take this many tokens whatever is there (down to an empty bucket): what a request used
    /// beyond its reservation; always allowed.
    Charge(u64),
}

impl Op {
    /// `take` or `refund`, as the Lua script reads it.
    pub fn name(self) -> &'static str {
        match self {
            Op::Take(_) => "take",
            Op::Refund(_) => "refund",
            Op::Charge(_) => "charge",
        }
    }

    /// How many tokens.
    pub fn amount(self) -> u64 {
        match self {
            Op::Take(n) | Op::Refund(n) | Op::Charge(n) => n,
        }
    }
}

/// Refills `bucket` (absent: full) up to `now_ms`, then applies `op`. A clock that goes
/// backwards refills nothing.
pub fn apply(bucket: Option<Bucket>, now_ms: u64, shape: Shape, op: Op) -> (Bucket, Decision) {
    let full = shape.full();
    let mut b = bucket.unwrap_or(Bucket {
        level: full,
        at_ms: now_ms,
    });
    if now_ms > b.at_ms {
        let added = (now_ms - b.at_ms).saturating_mul(shape.capacity);
        b.level = full.min(b.level.saturating_add(added));
        b.at_ms = now_ms;
    }
    let units = op.amount().saturating_mul(shape.window_ms);
    match op {
        Op::Take(_) => {
            let allowed = b.level >= units;
            if allowed {
                b.level -= units;
            }
            (b, decide_for(allowed, b.level, shape, units))
        }
        Op::Refund(_) => {
            b.level = full.min(b.level.saturating_add(units));
            (b, decide(true, b.level, shape))
        }
        Op::Charge(_) => {
            b.level = b.level.saturating_sub(units);
            (b, decide(true, b.level, shape))
        }
    }
}

/// The bucket's level at `now_ms` without taking anything.
pub fn level_at(bucket: Bucket, now_ms: u64, shape: Shape) -> u64 {
    let added = now_ms
        .saturating_sub(bucket.at_ms)
        .saturating_mul(shape.capacity);
    shape.full().min(bucket.level.saturating_add(added))
}

/// The decision for a bucket left at `level` units, for a request of one token.
pub fn decide(allowed: bool, level: u64, shape: Shape) -> Decision {
    decide_for(allowed, level, shape, shape.window_ms)
}

/// The decision for a bucket left at `level` units, for a request of `units` (its retry time
/// is until that many are there; more than a full bucket never will be: the retry time is
/// then the time to fill it).
pub fn decide_for(allowed: bool, level: u64, shape: Shape, units: u64) -> Decision {
    let per_ms = shape.capacity.max(1);
    let reset_ms = (shape.full().saturating_sub(level)).div_ceil(per_ms);
    Decision {
        allowed,
        limit: shape.capacity,
        remaining: level / shape.window_ms.max(1),
        reset_ms,
        retry_after_ms: if allowed {
            0
        } else if units > shape.full() {
            reset_ms.max(1)
        } else {
            units.saturating_sub(level).div_ceil(per_ms)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An independent model of the same limit: the generic cell rate algorithm, in exact
    /// integers (times scaled by `capacity`). A request at `t` conforms unless
    /// `t < tat - tolerance`; a conforming one moves `tat` to `max(tat, t) + interval`.
    struct Gcra {
        tat: u64,
        interval: u64,
        tolerance: u64,
        scale: u64,
    }

    impl Gcra {
        fn new(shape: Shape) -> Self {
            Gcra {
                tat: 0,
                interval: shape.window_ms,
                tolerance: (shape.capacity - 1) * shape.window_ms,
                scale: shape.capacity,
            }
        }

        fn request(&mut self, now_ms: u64) -> bool {
            let t = now_ms * self.scale;
            if t + self.tolerance < self.tat {
                return false;
            }
            self.tat = self.tat.max(t) + self.interval;
            true
        }
    }

    proptest! {
        #[test]
        fn agrees_with_gcra(
            capacity in 1u64..50,
            window_ms in 1u64..5_000,
            steps in prop::collection::vec((0u64..400, 1usize..4), 1..200),
        ) {
            let shape = Shape { capacity, window_ms };
            let mut model = Gcra::new(shape);
            let mut bucket = None;
            let mut now = 1_000_000u64;
            for (advance, burst) in steps {
                now += advance;
                for _ in 0..burst {
                    let (b, d) = take(bucket, now, shape);
                    bucket = Some(b);
                    prop_assert_eq!(d.allowed, model.request(now), "at {} ms", now);
                    prop_assert!(d.remaining <= capacity);
                    if !d.allowed {
                        prop_assert!(d.retry_after_ms >= 1);
                    }
                }
            }
        }
    }

    #[test]
    fn full_bucket_then_refill() {
        let shape = Shape {
            capacity: 3,
            window_ms: 3000,
        };
        let mut b = None;
        for left in [2, 1, 0] {
            let (nb, d) = take(b, 0, shape);
            b = Some(nb);
            assert!(d.allowed);
            assert_eq!(d.remaining, left);
        }
        let (nb, d) = take(b, 0, shape);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 1000);
        assert_eq!(d.reset_ms, 3000);
        let (refunded, d) = apply(Some(nb), 0, shape, Op::Refund(1));
        assert!(
            d.allowed && d.remaining == 1,
            "a refund gives one token back"
        );
        let (_, d) = take(Some(refunded), 0, shape);
        assert!(d.allowed);
        let (_, d) = take(Some(nb), 1000, shape);
        assert!(d.allowed, "one token a second");
        let (full, d) = apply(None, 0, shape, Op::Refund(1));
        assert_eq!(
            (full.level, d.remaining),
            (shape.full(), 3),
            "never above full"
        );
    }

    /// A reference model of reserve and settle in exact rational arithmetic, kept apart from
    /// the units trick: tokens as a fraction `level / window_ms`.
    struct Reference {
        level: u128,
        at: u64,
        shape: Shape,
    }

    impl Reference {
        fn refill(&mut self, now: u64) {
            if now > self.at {
                let full = u128::from(self.shape.capacity) * u128::from(self.shape.window_ms);
                self.level = full
                    .min(self.level + u128::from(now - self.at) * u128::from(self.shape.capacity));
                self.at = now;
            }
        }

        fn reserve(&mut self, now: u64, tokens: u64) -> bool {
            self.refill(now);
            let need = u128::from(tokens) * u128::from(self.shape.window_ms);
            if self.level >= need {
                self.level -= need;
                true
            } else {
                false
            }
        }

        fn settle(&mut self, now: u64, tokens: u64) {
            self.refill(now);
            let full = u128::from(self.shape.capacity) * u128::from(self.shape.window_ms);
            self.level =
                full.min(self.level + u128::from(tokens) * u128::from(self.shape.window_ms));
        }
    }

    proptest! {
        #[test]
        fn reserve_and_settle_agree_with_the_reference(
            capacity in 1u64..5_000,
            window_ms in 1u64..100_000,
            steps in prop::collection::vec((0u64..2_000, 0u64..600, 0u64..100, any::<bool>()), 1..200),
        ) {
            let shape = Shape { capacity, window_ms };
            let mut model = Reference { level: u128::from(shape.full()), at: 0, shape };
            let mut bucket = None;
            let mut now = 0u64;
            // Reserved and not yet settled, and what was actually used: the bucket never lets
            // more through than capacity plus what the window refilled.
            let mut spent = 0u128;
            for (advance, worst, used_pct, settle) in steps {
                now += advance;
                let (b, d) = apply(bucket, now, shape, Op::Take(worst));
                bucket = Some(b);
                prop_assert_eq!(d.allowed, model.reserve(now, worst), "reserve {} at {}", worst, now);
                prop_assert_eq!(u128::from(b.level), model.level);
                if d.allowed {
                    let used = worst * used_pct / 100;
                    spent += u128::from(used);
                    if settle {
                        let (b, _) = apply(bucket, now, shape, Op::Refund(worst - used));
                        bucket = Some(b);
                        model.settle(now, worst - used);
                        prop_assert_eq!(u128::from(b.level), model.level);
                    } else {
                        // Usage never arrived: the whole worst case stays spent.
                        spent += u128::from(worst - used);
                    }
                } else {
                    prop_assert!(d.retry_after_ms >= 1);
                }
                // Never overshoot: spent ≤ capacity + refill since the start.
                let refilled = u128::from(now) * u128::from(capacity) / u128::from(window_ms);
                prop_assert!(spent <= u128::from(capacity) + refilled, "spent {} at {}", spent, now);
            }
        }
    }
}
