//! The Redis backend: one Lua script call per decision (one or two buckets), run atomically by
//! Redis on its own clock.
//!
//! The script is sent once and then called by its SHA (`EVALSHA`; the `redis` crate reloads it
//! when Redis answers `NOSCRIPT`, e.g. after a restart). The connection is one multiplexed
//! `ConnectionManager`, which reconnects by itself.

use redis::aio::ConnectionManager;

use super::Step;
use super::bucket::Decision;

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

    /// Applies `steps` in order, in one round trip (one script call), stopping after a `take`
    /// that is refused: the decisions of the steps applied.
    pub async fn run(&self, steps: &[Step<'_>]) -> redis::RedisResult<Vec<Decision>> {
        let mut conn = self.conn.clone();
        let mut call = self.script.prepare_invoke();
        call.arg("");
        for step in steps {
            call.key(step.key)
                .arg(step.shape.capacity)
                .arg(step.shape.window_ms)
                .arg(step.op.name())
                .arg(step.op.amount());
        }
        let answer: Vec<u64> = call.invoke_async(&mut conn).await?;
        if answer.is_empty() || !answer.len().is_multiple_of(2) || answer.len() / 2 > steps.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "the limit script answered an unexpected shape",
            )));
        }
        Ok(answer
            .chunks_exact(2)
            .zip(steps)
            .map(|(pair, step)| step.decision(pair[0] == 1, pair[1]))
            .collect())
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
