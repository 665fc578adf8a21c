//! Token limits: a request is admitted only if its worst case fits the user's bucket, the
//! unused part comes back when its usage arrives, and the total never exceeds the limit —
//! across two relays sharing Redis.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::support::{self, Db, TestApp, fake_upstream, spawn_app_with};

fn chat(max_tokens: u64) -> Value {
    json!({"model": "mock-echo", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "one two three"}]})
}

/// A chat whose usage (the mock counts words: 20 in, 20 echoed out) is 40 tokens.
fn forty_token_chat() -> Value {
    let words = "one two three four five six seven eight nine ten ".repeat(2);
    json!({"model": "mock-echo", "max_tokens": 25,
        "messages": [{"role": "user", "content": words.trim()}]})
}

#[tokio::test]
async fn a_worst_case_larger_than_the_bucket_is_refused_at_once() {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("OPENAI_BASE_URL", &base),
            ("TOKEN_LIMIT", "1000"),
            ("REDIS_URL", ""),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("big@example.com").await;
    let resp = app.chat(&token, &chat(5000)).await;
    assert_eq!(resp.status(), 429);
    assert!(
        resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "1000");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "token_limit_exceeded");
    assert_eq!(err["error"]["type"], "rate_limit_error");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than your token limit")
    );
    // A request with no cap gets MAX_OUTPUT_TOKENS, which is larger than the bucket here.
    let mut uncapped = chat(1);
    uncapped.as_object_mut().unwrap().remove("max_tokens");
    assert_eq!(app.chat(&token, &uncapped).await.status(), 429);
    assert!(fake.received().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn the_default_cap_is_sent_and_the_headers_show_the_bucket() {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("OPENAI_BASE_URL", &base),
            ("TOKEN_LIMIT", "100000"),
            ("MAX_OUTPUT_TOKENS", "321"),
            ("REDIS_URL", ""),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("capped@example.com").await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]});
    let resp = app.chat(&token, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "100000");
    let remaining: u64 = resp.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 100_000 - 321,
        "the worst case was taken: {remaining}"
    );
    assert_eq!(fake.received()[0].body["max_completion_tokens"], 321);
    // Settled: the fake reports 13 tokens used, the rest of the worst case comes back. The
    // same request again then leaves 13 fewer (give or take the refill of a few ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = app.chat(&token, &body).await;
    let again: u64 = resp.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (remaining - 14..=remaining - 12).contains(&again),
        "{remaining} then {again}: the unused part came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_processes_sharing_redis_never_exceed_the_limit() {
    // Two real processes sharing the database and Redis, as replicas do.
    let base = support::spawn_mock(Default::default()).await;
    let db = support::TestDb::new(Db::Postgres).await;
    let prefix = format!("tokens-{}", uuid::Uuid::new_v4().simple());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vars = [
        ("SECRET_KEY", support::SECRET),
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_BASE_URL", base.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("RATE_LIMIT_REDIS_TIMEOUT_MS", "2000"),
        ("RATE_LIMIT_KEY_PREFIX", prefix.as_str()),
        ("TOKEN_LIMIT", "1000"),
        ("TOKEN_LIMIT_WINDOW", "86400"),
    ];
    let a = support::RelayProcess::start(dir_a.path(), &["serve"], &vars);
    let b = support::RelayProcess::start(dir_b.path(), &["serve"], &vars);
    let client = reqwest::Client::new();
    for relay in [&a, &b] {
        let health: Value = client
            .get(format!("{}/api/v1/health/detailed", relay.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["rate_limiter"], "redis", "{health}");
    }
    let token = a.access_token(&client, "spender@example.com").await;
    // Each request's worst case is its body (about 180 bytes) plus 25 output tokens; it
    // really uses 40. Without the limit, 50 of them would use 2,000.
    let statuses: Vec<(u16, Option<String>)> = futures_util::stream::iter(0..50)
        .map(|i| {
            let relay = if i % 2 == 0 { &a } else { &b };
            let request = client
                .post(format!("{}/api/v1/chat/completions", relay.base))
                .bearer_auth(&token)
                .json(&forty_token_chat());
            async move {
                let resp = request.send().await.unwrap();
                let status = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap();
                (status, body["error"]["code"].as_str().map(str::to_owned))
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    let admitted = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert!(
        statuses
            .iter()
            .all(|(s, code)| *s == 200 || code.as_deref() == Some("token_limit_exceeded")),
        "{statuses:?}"
    );
    // Both processes write their records to the shared database; /usage on either sums them.
    let start = Instant::now();
    let total = loop {
        let usage: Value = client
            .get(format!("{}/api/v1/usage", b.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if usage["total"]["requests"] == admitted {
            break usage["total"]["total_tokens"].as_i64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{usage}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(total <= 1000, "used {total} of a 1000-token limit");
    assert!(
        admitted > 10,
        "refunds let more than 1000 / worst case through: {admitted} admitted, {total} used"
    );
}

#[tokio::test]
async fn a_refused_body_still_counts_against_the_request_limit() {
    // With a token limit on, the request check waits for the body (to be made with the token
    // reservation in one call); a body refused before that must count all the same.
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("TOKEN_LIMIT", "100000"),
            ("RATE_LIMIT_CHAT_REQUESTS", "2"),
            ("REDIS_URL", ""),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("invalid@example.com").await;
    let bad = json!({"model": "mock-echo", "messages": []});
    let first = app.chat(&token, &bad).await;
    assert_eq!(first.status(), 422);
    assert_eq!(first.headers()["x-ratelimit-remaining"], "1");
    assert_eq!(app.chat(&token, &bad).await.status(), 422);
    let third = app.chat(&token, &bad).await;
    assert_eq!(third.status(), 429);
    let err: Value = third.json().await.unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    // And a good one is refused by the request limit before any token is reserved.
    let resp = app.chat(&token, &chat(10)).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("x-ratelimit-limit-tokens").is_none());
}

/// Runs `relay user set` on `app`'s database; returns the user it prints.
fn user_set(app: &TestApp, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["user", "set"];
    all.extend_from_slice(args);
    let out = support::relay_command(dir.path(), &all, &[("DATABASE_URL", &app.db.url)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn fate(app: &TestApp, token: &str, until: u16) {
    let start = Instant::now();
    loop {
        let status = app.chat(token, &chat(100)).await.status().as_u16();
        if status == until {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "still {status}, not {until}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_users_own_limit_applies_within_seconds(db: Db) {
    // No TOKEN_LIMIT: nobody is limited, until a user gets a limit of their own.
    let app = spawn_app_with(db, &[("REDIS_URL", "")]).await;
    let (token, _) = app.user_tokens("own@example.com").await;
    assert_eq!(app.chat(&token, &chat(100)).await.status(), 200);
    let user = user_set(&app, &["--email", "OWN@example.com", "--token-limit", "50"]);
    assert_eq!(user["token_limit"], 50);
    assert_eq!(user["token_limit_window"], Value::Null);
    // Its worst case (body + 100) is more than 50: refused once relay sees the limit.
    fate(&app, &token, 429).await;
    let resp = app.chat(&token, &chat(100)).await;
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "50");
    let user = user_set(&app, &["--email", "own@example.com", "--token-limit", "0"]);
    assert_eq!(user["token_limit"], Value::Null);
    fate(&app, &token, 200).await;
}

crate::support::on_both_databases!(a_users_own_limit_applies_within_seconds);

#[tokio::test]
async fn stored_context_is_refused_while_a_token_limit_applies() {
    let app = spawn_app_with(Db::Sqlite, &[("TOKEN_LIMIT", "100000"), ("REDIS_URL", "")]).await;
    let (token, _) = app.user_tokens("context@example.com").await;
    let first: Value = app
        .post_json_authed("/responses", &token, &json!({"input": "remember this"}))
        .await
        .json()
        .await
        .unwrap();
    let id = first["id"].as_str().unwrap();
    let item = first["output"][0]["id"].as_str().unwrap();
    for (body, param) in [
        (
            json!({"input": "and?", "previous_response_id": id}),
            "previous_response_id",
        ),
        (
            json!({"input": [{"type": "item_reference", "id": item}]}),
            "input[0].id",
        ),
        (json!({"input": [{"id": item}]}), "input[0].id"),
        (json!({"input": "x", "prompt": {"id": "pmpt_1"}}), "prompt"),
        (
            json!({"input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "web_search"}]}),
            "tools[1].type",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_url": "https://x/a.pdf"}]}]}),
            "input",
        ),
    ] {
        let resp = app.post_json_authed("/responses", &token, &body).await;
        assert_eq!(resp.status(), 422, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param);
    }
    // Chat's web search: its results count as prompt, which the body does not bound.
    let search = json!({"model": "mock-echo", "web_search_options": {},
        "messages": [{"role": "user", "content": "news?"}]});
    let resp = app.chat(&token, &search).await;
    assert_eq!(resp.status(), 422);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["param"], "web_search_options");
    // Without a token limit, it goes through as it came.
    let open = spawn_app_with(Db::Sqlite, &[("REDIS_URL", "")]).await;
    let (token, _) = open.user_tokens("searcher@example.com").await;
    assert_eq!(open.chat(&token, &search).await.status(), 200);
}

#[tokio::test]
async fn an_answer_sent_back_with_its_content_is_not_stored_context() {
    let app = spawn_app_with(Db::Sqlite, &[("TOKEN_LIMIT", "100000"), ("REDIS_URL", "")]).await;
    let (token, _) = app.user_tokens("store-false@example.com").await;
    let first: Value = app
        .post_json_authed("/responses", &token, &json!({"input": "remember this"}))
        .await
        .json()
        .await
        .unwrap();
    let item = first["output"][0]["id"].as_str().unwrap();
    // What the AI SDK sends with `store: false`: the earlier answer itself, with its id.
    let body = json!({"input": [
        {"role": "user", "content": "remember this"},
        {"role": "assistant", "id": item, "content": [{"type": "output_text", "text": "remember this"}]},
        {"role": "user", "content": "and then"}
    ]});
    let resp = app.post_json_authed("/responses", &token, &body).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_client_gone_before_the_answer_keeps_its_reservation() {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("OPENAI_BASE_URL", &base),
            ("TOKEN_LIMIT", "100000"),
            ("REDIS_URL", ""),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("leaver@example.com").await;
    let remaining = |resp: &reqwest::Response| -> u64 {
        resp.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 5000,
        "messages": [{"role": "user", "content": "x"}]});
    let before = remaining(&app.chat(&token, &body).await);
    // The upstream is working on it (and billing) when the client hangs up.
    let mut hang = body.clone();
    hang["model"] = json!("fake-hang");
    let gone = app
        .client
        .post(app.api("/chat/completions"))
        .bearer_auth(&token)
        .json(&hang)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = remaining(&app.chat(&token, &body).await);
    // The first request settled (13 used); the hung one kept its whole worst case (> 5000).
    assert!(
        before - after > 5000,
        "{before} then {after}: the reservation was refunded"
    );
}
