//! Rate limiting: one interface, two backends (Redis shared by every replica, memory as the
//! fallback), switched at run time.
//!
//! Each decision goes to Redis when it is live, with a budget (`RATE_LIMIT_REDIS_TIMEOUT_MS`,
//! [`DEFAULT_REDIS_BUDGET`] by default); a failure
//! or a timeout flips the limiter to memory (logged once), and a background probe with backoff
//! brings it back when Redis answers again. While Redis is down, requests pay nothing for it.

pub mod bucket;
pub mod memory;
pub mod redis;
pub mod tokens;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::RwLock;
use uuid::Uuid;

pub use bucket::{Decision, Op, Shape};

use self::redis::RedisLimiter;
use crate::config::{Endpoint, Limit, RateLimits};
use memory::MemoryLimiter;

/// How long a decision may wait for Redis before it is taken from memory instead, unless
/// configured otherwise.
pub const DEFAULT_REDIS_BUDGET: Duration = Duration::from_millis(50);
const PROBE_MIN: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

/// Who a bucket belongs to.
#[derive(Debug, Clone)]
pub enum Subject {
    /// An authenticated user.
    User(Uuid),
    /// An anonymous client.
    Ip(IpAddr),
    /// An email tried at login (hashed in the key).
    Email(String),
}

impl Subject {
    /// Appends the subject's part of a bucket key to `key`.
    fn push_key_part(&self, key: &mut String) {
        // A user's is built without `format!`: it is made on every request.
        if let Subject::User(id) = self {
            key.push_str("user:");
            key.push_str(id.as_hyphenated().encode_lower(&mut Uuid::encode_buffer()));
            return;
        }
        key.push_str(&self.key_part());
    }

    fn key_part(&self) -> String {
        match self {
            Subject::User(id) => format!("user:{id}"),
            // One IPv6 client usually owns a whole /64: key by it, or rotating addresses
            // inside it would dodge the limit.
            Subject::Ip(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
                let prefix = u128::from(*v6) & !((1u128 << 64) - 1);
                format!("ip6:{}/64", std::net::Ipv6Addr::from(prefix))
            }
            Subject::Ip(ip) => format!("ip:{}", ip.to_canonical()),
            Subject::Email(email) => {
                let digest = Sha256::digest(email.to_lowercase().as_bytes());
                format!("email:{}", hex::encode(&digest[..16]))
            }
        }
    }
}

/// Which backend decides right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Shared by every replica.
    Redis,
    /// This process only.
    Memory,
}

impl Backend {
    /// `redis` or `memory`, as `/health/detailed` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Memory => "memory",
        }
    }
}

struct RedisSide {
    client: ::redis::Client,
    budget: Duration,
    limiter: RwLock<Option<RedisLimiter>>,
    live: AtomicBool,
    probing: AtomicBool,
}

/// Which in-memory table a bucket lives in when Redis is not deciding. Token buckets have one
/// of their own: they are keyed by user only, so a flood of anonymous keys (one per IP) can
/// never evict one and hand its user a full bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Request buckets (by user, IP or email).
    Requests,
    /// Token buckets (by user).
    Tokens,
}

/// One operation on one bucket.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The bucket's key.
    pub key: &'a str,
    /// Its shape.
    pub shape: Shape,
    /// What to do.
    pub op: Op,
    /// Its memory table.
    pub pool: Pool,
}

impl Step<'_> {
    /// The decision for this step, given whether it was allowed and the bucket's level after it.
    pub fn decision(&self, allowed: bool, level: u64) -> Decision {
        match self.op {
            Op::Take(n) => bucket::decide_for(
                allowed,
                level,
                self.shape,
                n.saturating_mul(self.shape.window_ms),
            ),
            Op::Refund(_) | Op::Charge(_) => bucket::decide(true, level, self.shape),
        }
    }
}

/// The limiter every handler uses.
pub struct RateLimiter {
    limits: RateLimits,
    prefix: String,
    memory: MemoryLimiter,
    token_memory: MemoryLimiter,
    redis: Option<Arc<RedisSide>>,
}

fn shape(limit: Limit) -> Shape {
    Shape {
        capacity: u64::from(limit.requests),
        window_ms: u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX),
    }
}

impl RateLimiter {
    /// A limiter over `limits.redis_url` (or memory only when `None`). An unreachable Redis at
    /// start-up is not an error: the limiter starts on memory and keeps probing.
    pub async fn new(limits: RateLimits) -> anyhow::Result<Self> {
        let redis = match limits.redis_url.as_deref() {
            None => None,
            Some(url) => {
                let client = ::redis::Client::open(url)?;
                let side = Arc::new(RedisSide {
                    client,
                    budget: limits.redis_budget,
                    limiter: RwLock::new(None),
                    live: AtomicBool::new(false),
                    probing: AtomicBool::new(false),
                });
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    RedisLimiter::connect(side.client.clone()),
                )
                .await
                {
                    Ok(Ok(limiter)) => {
                        *side.limiter.write().await = Some(limiter);
                        side.live.store(true, Ordering::Release);
                        tracing::info!("rate limiter: using Redis");
                    }
                    _ => {
                        tracing::warn!(
                            "rate limiter: Redis unreachable at start-up; using in-memory limits until it answers"
                        );
                        start_probe(side.clone());
                    }
                }
                Some(side)
            }
        };
        Ok(RateLimiter {
            prefix: limits.key_prefix.clone(),
            limits,
            memory: MemoryLimiter::new(memory::DEFAULT_MAX_KEYS),
            token_memory: MemoryLimiter::new(memory::DEFAULT_MAX_KEYS),
            redis,
        })
    }

    /// The backend deciding right now.
    pub fn backend(&self) -> Backend {
        match &self.redis {
            Some(side) if side.live.load(Ordering::Acquire) => Backend::Redis,
            _ => Backend::Memory,
        }
    }

    /// Whether Redis is configured at all.
    pub fn redis_configured(&self) -> bool {
        self.redis.is_some()
    }

    /// Pings Redis (for `/health/detailed`).
    pub async fn ping_redis(&self) -> Result<(), String> {
        let side = self.redis.as_ref().ok_or("not configured")?;
        let limiter = side.limiter.read().await.clone().ok_or("not connected")?;
        limiter.ping().await.map_err(|e| e.to_string())
    }

    /// The bucket key for `endpoint` and `subject`. Endpoints without their own limit share
    /// the global bucket. The `{…}` hash tag is the subject alone, the same as in its token
    /// bucket's key, so that one script call may take from both in Redis Cluster.
    pub fn key(&self, endpoint: Endpoint, subject: &Subject) -> String {
        // The account endpoints (me, logout) always have a bucket of their own: a user who
        // spent the shared quota on chat must still be able to log out.
        let mut key = String::with_capacity(self.prefix.len() + 64);
        key.push_str(&self.prefix);
        key.push_str(":rl:");
        if self.limits.overrides.contains_key(&endpoint) || endpoint == Endpoint::Account {
            key.extend(endpoint.name().chars().map(|c| c.to_ascii_lowercase()));
        } else {
            key.push_str("all");
        }
        key.push_str(":{");
        subject.push_key_part(&mut key);
        key.push('}');
        key
    }

    /// The request-limit step for `subject` at `endpoint`: `op` on its bucket.
    fn request_step<'a>(&self, endpoint: Endpoint, key: &'a str, op: Op) -> Step<'a> {
        Step {
            key,
            shape: shape(self.limits.for_endpoint(endpoint)),
            op,
            pool: Pool::Requests,
        }
    }

    /// Takes one token for `subject` at `endpoint`.
    pub async fn check(&self, endpoint: Endpoint, subject: &Subject) -> Decision {
        let key = self.key(endpoint, subject);
        let decision = self
            .apply_one(self.request_step(endpoint, &key, Op::Take(1)))
            .await;
        self.count(endpoint_label(endpoint), decision.allowed);
        decision
    }

    /// Counts a decision in the metrics, with the backend deciding now.
    fn count(&self, endpoint: &'static str, allowed: bool) {
        crate::measure::count_decision(endpoint, allowed, self.backend().as_str());
    }

    /// Gives back the token a request took from `subject`'s bucket at `endpoint` (login takes
    /// one from the email's bucket before hashing and returns it when the password was right,
    /// so that only failed attempts count, atomically and whatever the client does after).
    pub async fn refund(&self, endpoint: Endpoint, subject: &Subject) {
        let key = self.key(endpoint, subject);
        self.apply_one(self.request_step(endpoint, &key, Op::Refund(1)))
            .await;
    }

    /// Applies one step.
    pub async fn apply_one(&self, step: Step<'_>) -> Decision {
        // `apply` answers at least the first step's decision.
        self.apply(&[step]).await[0]
    }

    /// Applies `steps` in order, stopping after a `take` that is refused; answers the decisions
    /// of the steps applied (at least the first). On Redis that is one script call, atomic;
    /// in memory, one step after the other.
    pub async fn apply(&self, steps: &[Step<'_>]) -> Vec<Decision> {
        if let Some(side) = &self.redis
            && side.live.load(Ordering::Acquire)
        {
            let limiter = side.limiter.read().await.clone();
            if let Some(limiter) = limiter {
                match tokio::time::timeout(side.budget, limiter.run(steps)).await {
                    Ok(Ok(decisions)) => return decisions,
                    Ok(Err(e)) => fall_back(side, &e.to_string()),
                    Err(_) => fall_back(side, "no answer within the budget"),
                }
            }
        }
        let mut decisions = Vec::with_capacity(steps.len());
        for step in steps {
            let memory = match step.pool {
                Pool::Requests => &self.memory,
                Pool::Tokens => &self.token_memory,
            };
            let decision = memory.check(step.key, step.shape, step.op);
            decisions.push(decision);
            if !decision.allowed {
                break;
            }
        }
        decisions
    }
}

/// An endpoint as a metric label.
fn endpoint_label(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Login => "login",
        Endpoint::Register => "register",
        Endpoint::Refresh => "refresh",
        Endpoint::Chat => "chat",
        Endpoint::Models => "models",
        Endpoint::Account => "account",
    }
}

/// Switches to memory (once) and starts the probe.
fn fall_back(side: &Arc<RedisSide>, why: &str) {
    if side.live.swap(false, Ordering::AcqRel) {
        // The probe dials a fresh connection: the current one may be hung.
        if let Ok(mut current) = side.limiter.try_write() {
            *current = None;
        }
        tracing::warn!(
            reason = why,
            "rate limiter: Redis failed; falling back to in-memory limits"
        );
        start_probe(side.clone());
    }
}

/// Successful probes in a row needed before decisions go back to Redis.
const PROBES_TO_RECOVER: u32 = 3;

/// Retries Redis with backoff until it answers, then switches back to it.
///
/// Each probe runs the real script (on a probe key) under the same budget as a decision, so a
/// Redis that answers PING but not scripts, or answers too slowly, is not taken back. A failed
/// probe drops the connection: a hung socket is never reused, the next probe dials afresh.
fn start_probe(side: Arc<RedisSide>) {
    if side.probing.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        let mut wait = PROBE_MIN;
        let mut good = 0;
        let probe_shape = Shape {
            capacity: 1_000_000,
            window_ms: 1000,
        };
        loop {
            tokio::time::sleep(wait).await;
            let current = side.limiter.read().await.clone();
            let limiter = match current {
                Some(limiter) => Some(limiter),
                None => match tokio::time::timeout(
                    Duration::from_secs(1),
                    RedisLimiter::connect(side.client.clone()),
                )
                .await
                {
                    Ok(Ok(limiter)) => {
                        *side.limiter.write().await = Some(limiter.clone());
                        Some(limiter)
                    }
                    _ => None,
                },
            };
            let healthy = match limiter {
                Some(limiter) => matches!(
                    tokio::time::timeout(
                        side.budget,
                        limiter.run(&[Step {
                            key: "relay:rl:{probe}",
                            shape: probe_shape,
                            op: Op::Take(1),
                            pool: Pool::Requests,
                        }])
                    )
                    .await,
                    Ok(Ok(_))
                ),
                None => false,
            };
            if healthy {
                good += 1;
                if good >= PROBES_TO_RECOVER {
                    // `probing` first: a decision failing right after `live` flips must be
                    // able to start a new probe.
                    side.probing.store(false, Ordering::Release);
                    side.live.store(true, Ordering::Release);
                    tracing::info!("rate limiter: Redis is back; using shared limits again");
                    return;
                }
                wait = PROBE_MIN;
            } else {
                good = 0;
                *side.limiter.write().await = None;
                wait = (wait * 2).min(PROBE_MAX);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bucket_keys_name_the_scope_and_the_subject() {
        let limit = Limit {
            requests: 10,
            window: Duration::from_secs(60),
        };
        let limiter = RateLimiter::new(RateLimits {
            global: limit,
            overrides: std::collections::HashMap::from([(Endpoint::Chat, limit)]),
            redis_budget: Duration::from_millis(50),
            key_prefix: "pre".into(),
            redis_url: None,
            tokens: None,
            max_output_tokens: 1000,
        })
        .await
        .unwrap();
        let user = Uuid::parse_str("67E55044-10B1-426F-9247-BB680E5FE0C8").unwrap();
        assert_eq!(
            limiter.key(Endpoint::Chat, &Subject::User(user)),
            "pre:rl:chat:{user:67e55044-10b1-426f-9247-bb680e5fe0c8}"
        );
        assert_eq!(
            limiter.key(Endpoint::Models, &Subject::User(user)),
            "pre:rl:all:{user:67e55044-10b1-426f-9247-bb680e5fe0c8}"
        );
        assert_eq!(
            limiter.key(Endpoint::Account, &Subject::Ip("10.1.2.3".parse().unwrap())),
            "pre:rl:account:{ip:10.1.2.3}"
        );
        assert_eq!(
            limiter.key(
                Endpoint::Register,
                &Subject::Ip("2001:db8:1:2:3:4:5:6".parse().unwrap())
            ),
            "pre:rl:all:{ip6:2001:db8:1:2::/64}"
        );
    }
}
