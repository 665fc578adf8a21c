//! Hostile chat bodies against a real `relay serve` process: its peak resident memory (read from
//! `/proc/<pid>/status`) must stay near the bodies' own size. A body parsed into a JSON tree
//! costs many times its size (`[[],[],…]`: about 40 bytes of tree per 3 bytes of input).

use std::time::Duration;

use crate::support::{self, RelayProcess};

/// Each body: a little under the default `MAX_REQUEST_BYTES` (8 MiB).
const BODY_BYTES: usize = 8_000_000;
const MIB: u64 = 1024 * 1024;

/// A valid chat request whose extra field `pad` is `fill` repeated up to `BODY_BYTES`.
fn padded(open: &str, item: &str, close: &str) -> String {
    let head = r#"{"model":"mock-echo","messages":[{"role":"user","content":"hi"}],"pad":"#;
    let mut body = String::with_capacity(BODY_BYTES + 64);
    body.push_str(head);
    body.push_str(open);
    let mut i = 0usize;
    while body.len() + item.len() + 16 < BODY_BYTES {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&item.replace("{i}", &i.to_string()));
        i += 1;
    }
    body.push_str(close);
    body.push('}');
    body
}

/// The hostile shapes: wide arrays, many tiny objects, one long string, many keys, and the
/// same wide array as the message list itself (refused, after a look at its first element).
fn hostile_bodies() -> Vec<(&'static str, String)> {
    let long_string = format!(
        r#"{{"model":"mock-echo","messages":[{{"role":"user","content":"hi"}}],"pad":"{}"}}"#,
        "x".repeat(BODY_BYTES - 100)
    );
    let mut messages = String::from(r#"{"model":"mock-echo","messages":["#);
    while messages.len() + 4 < BODY_BYTES {
        messages.push_str("[],");
    }
    messages.push_str("[]]}");
    vec![
        ("wide arrays", padded("[", "[]", "]")),
        ("tiny objects", padded("[", "{}", "]")),
        ("long string", long_string),
        ("many keys", padded("{", r#""k{i}":0"#, "}")),
        ("wide messages", messages),
    ]
}

/// `VmHWM` (peak resident set) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

async fn send(client: &reqwest::Client, url: &str, token: &str, body: String) -> u16 {
    client
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_cost_about_their_size_not_a_tree() {
    let upstream = support::spawn_mock(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/relay.db", dir.path().display());
    let vars = support::test_vars(
        &db,
        &[
            ("OPENAI_BASE_URL", &upstream),
            ("REDIS_URL", ""),
            ("LOG_LEVEL", "info"),
        ],
    );
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = RelayProcess::start(dir.path(), &["serve"], &vars);
    let pid = server.child.id();
    let client = reqwest::Client::new();
    let token = server.access_token(&client, "hostile@example.com").await;
    let url = format!("{}/api/v1/chat/completions", server.base);
    let bodies = hostile_bodies();
    // Warm up with an ordinary request of each kind of answer.
    let small = r#"{"model":"mock-echo","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(send(&client, &url, &token, small.to_owned()).await, 200);

    // One at a time: each adds at most about twice its size to the peak.
    for (name, body) in &bodies {
        let before = peak_rss(pid);
        let status = send(&client, &url, &token, body.clone()).await;
        let expected = if *name == "wide messages" { 422 } else { 200 };
        assert_eq!(status, expected, "{name}");
        let added = peak_rss(pid).saturating_sub(before);
        eprintln!("{name}: peak RSS +{:.1} MiB", added as f64 / MIB as f64);
        assert!(
            added <= 2 * BODY_BYTES as u64 + 8 * MIB,
            "{name}: peak RSS grew by {} MiB for an {} MiB body",
            added / MIB,
            BODY_BYTES as u64 / MIB
        );
    }

    // Eight at once stay under 200 MiB in all.
    let eight = (0..8).map(|i| {
        let (name, body) = &bodies[i % bodies.len()];
        let (client, url, token, body) = (client.clone(), url.clone(), token.clone(), body.clone());
        async move { (*name, send(&client, &url, &token, body).await) }
    });
    for (name, status) in futures_util::future::join_all(eight).await {
        assert!(status == 200 || status == 422, "{name}: {status}");
    }
    let peak = peak_rss(pid);
    eprintln!(
        "eight at once: peak RSS {:.1} MiB",
        peak as f64 / MIB as f64
    );
    assert!(
        peak < 200 * MIB,
        "peak RSS {} MiB with eight hostile bodies at once",
        peak / MIB
    );
}
