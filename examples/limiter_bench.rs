//! Latency of one rate-limit decision, memory backend and Redis backend, printed as JSON.
//! Used by `bench/run.sh`.
//!
//! ```text
//! cargo run --release --example limiter_bench -- [redis://127.0.0.1:6379/0]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark tool

use std::time::{Duration, Instant};

use relay::config::{Endpoint, Limit, RateLimits};
use relay::ratelimit::{RateLimiter, Subject};

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1e6 / samples.len() as f64;
    format!(
        "{{\"n\": {}, \"mean_us\": {mean:.3}, \"p50_us\": {:.3}, \"p99_us\": {:.3}}}",
        samples.len(),
        at(0.5),
        at(0.99)
    )
}

async fn measure(limiter: &RateLimiter, n: usize) -> Vec<Duration> {
    let users: Vec<Subject> = (0..1000)
        .map(|_| Subject::User(uuid::Uuid::new_v4()))
        .collect();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let subject = &users[i % users.len()];
        let start = Instant::now();
        let decision = limiter.check(Endpoint::Chat, subject).await;
        samples.push(start.elapsed());
        assert!(decision.allowed);
    }
    samples
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let redis_url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379/0".to_owned());
    let limits = RateLimits {
        global: Limit {
            requests: 1_000_000,
            window: Duration::from_secs(1),
        },
        overrides: Default::default(),
        redis_budget: relay::ratelimit::DEFAULT_REDIS_BUDGET,
        key_prefix: format!("bench-{}", uuid::Uuid::new_v4().simple()),
        redis_url: None,
        tokens: None,
        max_output_tokens: 4096,
    };
    let memory = RateLimiter::new(limits.clone()).await.unwrap();
    measure(&memory, 20_000).await;
    let mem = summary(measure(&memory, 200_000).await);
    let redis = RateLimiter::new(RateLimits {
        redis_url: Some(redis_url.clone()),
        ..limits
    })
    .await
    .unwrap();
    assert_eq!(
        redis.backend().as_str(),
        "redis",
        "Redis must answer at {redis_url}"
    );
    measure(&redis, 2_000).await;
    let red = summary(measure(&redis, 20_000).await);
    println!("{{\"memory\": {mem}, \"redis\": {red}}}");
}
