//! A small load client for streaming (and plain) requests: time to first byte, total time,
//! throughput and errors, printed as one JSON line. Used by `bench/run.sh`.
//!
//! ```text
//! cargo run --release --example stream_bench -- URL --connections 32 --seconds 10 \
//!     [--token T] [--body JSON] [--requests-per-connection N]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark tool

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;

struct Args {
    url: String,
    token: Option<String>,
    body: String,
    connections: usize,
    seconds: f64,
    per_connection: Option<usize>,
}

fn parse_args() -> Args {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        url: String::new(),
        token: None,
        body:
            r#"{"model":"mock-echo","stream":true,"messages":[{"role":"user","content":"hello"}]}"#
                .to_owned(),
        connections: 1,
        seconds: 10.0,
        per_connection: None,
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--token" => out.token = args.next(),
            "--body" => out.body = args.next().unwrap(),
            "--connections" => out.connections = args.next().unwrap().parse().unwrap(),
            "--seconds" => out.seconds = args.next().unwrap().parse().unwrap(),
            "--requests-per-connection" => {
                out.per_connection = Some(args.next().unwrap().parse().unwrap())
            }
            url => out.url = url.to_owned(),
        }
    }
    assert!(
        !out.url.is_empty(),
        "usage: stream_bench URL [--connections C] [--seconds S] [--token T] [--body JSON]"
    );
    out
}

#[derive(Default)]
struct Stats {
    ttfb: Vec<Duration>,
    total: Vec<Duration>,
    errors: usize,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args = Arc::new(parse_args());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let client = client.clone();
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            let mut done = 0;
            while Instant::now() < deadline && args.per_connection.is_none_or(|n| done < n) {
                done += 1;
                let t0 = Instant::now();
                let mut req = client
                    .post(&args.url)
                    .header("content-type", "application/json")
                    .body(args.body.clone());
                if let Some(t) = &args.token {
                    req = req.bearer_auth(t);
                }
                let Ok(resp) = req.send().await else {
                    stats.errors += 1;
                    continue;
                };
                if !resp.status().is_success() {
                    stats.errors += 1;
                    let _ = resp.bytes().await;
                    continue;
                }
                let mut body = resp.bytes_stream();
                let mut first = None;
                let mut tail: Vec<u8> = Vec::new();
                let mut failed = false;
                while let Some(chunk) = body.next().await {
                    match chunk {
                        Ok(c) => {
                            first.get_or_insert_with(|| t0.elapsed());
                            tail.extend_from_slice(&c);
                            if tail.len() > 64 {
                                tail.drain(..tail.len() - 64);
                            }
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&tail);
                let streamed = args.body.contains("\"stream\":true");
                if failed || (streamed && !text.contains("[DONE]")) || text.contains("\"error\"") {
                    stats.errors += 1;
                    continue;
                }
                stats.ttfb.push(first.unwrap_or_default());
                stats.total.push(t0.elapsed());
            }
            stats
        }));
    }
    let mut all = Stats::default();
    for t in tasks {
        let s = t.await.unwrap();
        all.ttfb.extend(s.ttfb);
        all.total.extend(s.total);
        all.errors += s.errors;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.ttfb.sort();
    all.total.sort();
    println!(
        "{{\"ok\": {}, \"errors\": {}, \"seconds\": {:.3}, \"per_second\": {:.1}, \"ttfb_p50_ms\": {:.3}, \"ttfb_p99_ms\": {:.3}, \"total_p50_ms\": {:.3}, \"total_p99_ms\": {:.3}}}",
        all.total.len(),
        all.errors,
        elapsed,
        all.total.len() as f64 / elapsed,
        pct(&all.ttfb, 0.5),
        pct(&all.ttfb, 0.99),
        pct(&all.total, 0.5),
        pct(&all.total, 0.99),
    );
}
