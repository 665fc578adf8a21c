//! The Redis backend: one Lua script per decision, run atomically by Redis on its own clock.
//!
//! The script is sent once and then called by its SHA (`EVALSHA`; the `redis` crate reloads it
//! when Redis answers `NOSCRIPT`, e.g. after a restart). The connection is one multiplexed
//! `ConnectionManager`, which reconnects by itself.

use redis::aio::ConnectionManager;

use super::bucket::{self, Decision, Op, Shape};

/// The script (see `bucket.lua`); public so that tests can run it with their own clock.
pub const SCRIPT: &str = include_str!("bucket.lua");

/// The Redis backend.
#[derive(Clone)]
pub struct RedisLimiter {
    conn: ConnectionManager,
    script: redis::Script,
}

impl RedisLimiter {
    /// Connects (fails if Redis does not answer).
    pub async fn connect(client: redis::Client) -> redis::RedisResult<Self> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(std::time::Duration::from_millis(500))
            .set_response_timeout(std::time::Duration::from_millis(500))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisLimiter {
            conn,
            script: redis::Script::new(SCRIPT),
        })
    }

    /// Applies `op` to `key`'s bucket: one round trip.
    pub async fn check(&self, key: &str, shape: Shape, op: Op) -> redis::RedisResult<Decision> {
        let mut conn = self.conn.clone();
        let (allowed, level): (u8, u64) = self
            .script
            .key(key)
            .arg(shape.capacity)
            .arg(shape.window_ms)
            .arg(op.name())
            .arg(op.amount())
            .invoke_async(&mut conn)
            .await?;
        let units = op.amount().saturating_mul(shape.window_ms);
        Ok(match op {
            Op::Take(_) => bucket::decide_for(allowed == 1, level, shape, units),
            Op::Refund(_) | Op::Charge(_) => bucket::decide(true, level, shape),
        })
    }

    /// `PING`, for health checks and the recovery probe.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
    }
}
