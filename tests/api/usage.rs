//! Usage records and `GET /usage`: every request that reached the upstream is recorded once,
//! off the request path, with the upstream's counts (or an estimate, marked so, when a stream
//! ended before its usage); totals are summed in SQL; records survive a SIGTERM.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::support::{self, Db, TestApp, fake_upstream, on_both_databases};
use relay::store::Store;

/// Polls `GET /usage` until it counts `requests` requests (the writer is asynchronous).
async fn usage_when(app: &TestApp, token: &str, query: &str, requests: i64) -> Value {
    let start = Instant::now();
    loop {
        let resp = app.get_authed(&format!("/usage{query}"), token).await;
        assert_eq!(resp.status(), 200);
        let usage: Value = resp.json().await.unwrap();
        if usage["total"]["requests"] == requests {
            return usage;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "expected {requests} requests, got {usage}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `(cancelled, estimated, streamed, endpoint, completion_tokens)` of every record, oldest first.
async fn records(store: &Store) -> Vec<(bool, bool, bool, String, i64)> {
    const SQL: &str = "SELECT cancelled, estimated, streamed, endpoint, completion_tokens \
                       FROM usage_records ORDER BY id";
    match store {
        Store::Sqlite(pool) => sqlx::query_as(SQL).fetch_all(pool).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_as(SQL).fetch_all(pool).await.unwrap(),
    }
}

fn counts(usage: &Value) -> (i64, i64) {
    (
        usage["prompt_tokens"].as_i64().unwrap(),
        usage["completion_tokens"].as_i64().unwrap(),
    )
}

async fn totals_equal_the_upstreams_counts(db: Db) {
    let app = support::spawn_app(db).await;
    let (token, _) = app.user_tokens("usage@example.com").await;
    let (other, _) = app.user_tokens("other@example.com").await;
    let chat = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "count these four words"}]});

    // What the upstream reports for one chat, from a plain answer.
    let answer: Value = app.chat(&token, &chat).await.json().await.unwrap();
    let (chat_prompt, chat_completion) = counts(&answer["usage"]);
    assert!(chat_prompt > 0 && chat_completion > 0);
    // The same chat streamed, without and with the usage chunk.
    for include in [false, true] {
        let mut body = chat.clone();
        body["stream"] = json!(true);
        if include {
            body["stream_options"] = json!({"include_usage": true});
        }
        let text = app.chat(&token, &body).await.text().await.unwrap();
        assert_eq!(text.contains("\"usage\":{"), include, "{text}");
    }
    // A response, JSON and streamed, and embeddings.
    let response: Value = app
        .post_json_authed(
            "/responses",
            &token,
            &json!({"model": "mock-echo", "input": "five words in this input"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let (resp_in, resp_out) = (
        response["usage"]["input_tokens"].as_i64().unwrap(),
        response["usage"]["output_tokens"].as_i64().unwrap(),
    );
    app.post_json_authed(
        "/responses",
        &token,
        &json!({"model": "mock-echo", "input": "five words in this input", "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    let embeddings: Value = app
        .post_json_authed(
            "/embeddings",
            &token,
            &json!({"model": "mock-embed", "input": "embed me"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let embed_in = embeddings["usage"]["prompt_tokens"].as_i64().unwrap();
    // Not the upstream's business: a refused request leaves no record.
    let resp = app.chat(&token, &json!({"messages": []})).await;
    assert_eq!(resp.status(), 422);

    let usage = usage_when(&app, &token, "?group_by=model", 6).await;
    assert_eq!(usage["object"], "usage");
    let prompt = 3 * chat_prompt + 2 * resp_in + embed_in;
    let completion = 3 * chat_completion + 2 * resp_out;
    assert_eq!(counts(&usage["total"]), (prompt, completion), "{usage}");
    assert_eq!(usage["total"]["total_tokens"], prompt + completion);
    let groups = usage["groups"].as_array().unwrap();
    let keys: Vec<&str> = groups.iter().map(|g| g["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["mock-echo", "mock-embed"]);
    assert_eq!(groups[0]["requests"], 5);
    assert_eq!(counts(&groups[1]), (embed_in, 0));

    // By day: today's one group holds everything; another user sees nothing of it.
    let by_day = usage_when(&app, &token, "", 6).await;
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    assert_eq!(by_day["groups"][0]["key"], today.as_str());
    assert_eq!(by_day["groups"][0]["requests"], 6);
    let theirs = usage_when(&app, &other, "", 0).await;
    assert_eq!(theirs["groups"], json!([]));
    // A range that ends before the requests holds none of them.
    let past = usage_when(&app, &token, "?to=2026-01-01T00:00:00Z", 0).await;
    assert_eq!(past["total"]["prompt_tokens"], 0);

    let all = records(&app.store).await;
    assert_eq!(all.len(), 6);
    assert!(
        all.iter()
            .all(|(cancelled, estimated, ..)| !cancelled && !estimated)
    );
    let streamed: Vec<bool> = all.iter().map(|r| r.2).collect();
    assert_eq!(streamed, [false, true, true, false, true, false]);
}

on_both_databases!(
    totals_equal_the_upstreams_counts,
    batches_of_any_size_are_written_whole
);

#[tokio::test]
async fn a_client_gone_mid_stream_leaves_one_cancelled_estimated_record() {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &base)]).await;
    let (token, _) = app.user_tokens("leaver@example.com").await;
    let body = json!({"model": "fake-endless", "stream": true,
        "messages": [{"role": "user", "content": "go on forever"}]});
    let mut stream = app.chat(&token, &body).await.bytes_stream();
    let mut read = String::new();
    while read.matches("tick").count() < 5 {
        read.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);
    let usage = usage_when(&app, &token, "", 1).await;
    let all = records(&app.store).await;
    assert_eq!(all.len(), 1);
    let (cancelled, estimated, streamed, endpoint, completion) = all[0].clone();
    assert!(cancelled && estimated && streamed);
    assert_eq!(endpoint, "chat");
    // "tick " is one token in o200k; at least the five read were delivered, and a few more may
    // have been in flight.
    assert!((5..=40).contains(&completion), "{completion}");
    assert_eq!(usage["total"]["completion_tokens"], completion);
    assert!(usage["total"]["prompt_tokens"].as_i64().unwrap() > 0);
}

#[tokio::test]
async fn records_are_written_before_a_sigterm_exit_even_past_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    // A stream of 20 chunks 200 ms apart: 4 s, longer than the 1 s grace period.
    let upstream = support::spawn_mock(relay::mock::MockOptions {
        latency: Duration::ZERO,
        chunks: Some(20),
        chunk_delay: Duration::from_millis(200),
    })
    .await;
    let db = format!("sqlite://{}/usage.db", dir.path().display());
    let mut server = support::RelayProcess::start(
        dir.path(),
        &["serve"],
        &[
            ("SECRET_KEY", "a-test-secret-key-that-is-long-enough-0123"),
            ("OPENAI_API_KEY", "sk-test"),
            ("OPENAI_BASE_URL", &upstream),
            ("DATABASE_URL", &db),
            ("REDIS_URL", ""),
            ("SHUTDOWN_GRACE_SECONDS", "1"),
        ],
    );
    let client = reqwest::Client::new();
    let token = server.access_token(&client, "sigterm@example.com").await;
    let chat = |stream: bool| {
        client
            .post(format!("{}/api/v1/chat/completions", server.base))
            .bearer_auth(&token)
            .json(&json!({"model": "mock-echo", "stream": stream,
                "messages": [{"role": "user", "content": "remember me"}]}))
            .send()
    };
    assert_eq!(chat(false).await.unwrap().status(), 200);
    let mut stream = chat(true).await.unwrap().bytes_stream();
    stream.next().await.unwrap().unwrap();
    support::send_signal(server.child.id(), "TERM");
    let code = support::wait_for_exit(&mut server.child, Duration::from_secs(10));
    assert_eq!(code, Some(0));
    let store = Store::connect(&relay::config::Database::from_url(&db).unwrap())
        .await
        .unwrap();
    let all = records(&store).await;
    store.close().await;
    assert_eq!(all.len(), 2, "{all:?}");
    let (cancelled, estimated, streamed, ..) = all[1].clone();
    assert!(
        streamed && cancelled && estimated,
        "the stream cut at the end of the grace period: {all:?}"
    );
}

#[tokio::test]
async fn a_client_gone_before_the_answer_is_logged_and_recorded() {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &base)]).await;
    let (token, _) = app.user_tokens("impatient@example.com").await;
    let body =
        json!({"model": "fake-hang", "messages": [{"role": "user", "content": "take your time"}]});
    let gone = app
        .client
        .post(app.api("/chat/completions"))
        .bearer_auth(&token)
        .json(&body)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up");
    let usage = usage_when(&app, &token, "", 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = records(&app.store).await;
    assert_eq!(all.len(), 1, "one record: {all:?}");
    let (cancelled, estimated, streamed, ..) = all[0].clone();
    assert!(cancelled && estimated && !streamed);
    assert!(
        usage["total"]["prompt_tokens"].as_i64().unwrap() > 0,
        "{usage}"
    );
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_is_recorded_as_failed() {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &base)]).await;
    let (token, _) = app.user_tokens("cut@example.com").await;
    let body = json!({"model": "fake-cut", "stream": true,
        "messages": [{"role": "user", "content": "x"}]});
    let text = app.chat(&token, &body).await.text().await.unwrap();
    assert!(text.contains("upstream_stream_error"));
    usage_when(&app, &token, "", 1).await;
    let Store::Sqlite(pool) = &app.store else {
        unreachable!()
    };
    let (status, cancelled, estimated, completion): (i64, bool, bool, i64) =
        sqlx::query_as("SELECT status, cancelled, estimated, completion_tokens FROM usage_records")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(status, 502, "answered 200, but it failed");
    assert!(!cancelled && estimated);
    assert!(
        completion >= 2,
        "'partial answer' was delivered: {completion}"
    );
}

/// The writer's batches are written in statements of a few fixed sizes: every size of batch
/// must still be written whole, exactly once.
async fn batches_of_any_size_are_written_whole(db: Db) {
    let app = support::spawn_app(db).await;
    let (token, _) = app.user_tokens("batches@example.com").await;
    let me: Value = app
        .get_authed("/auth/me", &token)
        .await
        .json()
        .await
        .unwrap();
    let user: uuid::Uuid = me["id"].as_str().unwrap().parse().unwrap();
    let from = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut written = 0;
    for n in [1_usize, 3, 63, 64, 77, 256] {
        let records: Vec<_> = (0..n)
            .map(|i| relay::store::UsageRecord {
                user_id: user,
                api_key_id: None,
                endpoint: "chat",
                model: format!("batch-{n}"),
                prompt_tokens: i as u64,
                completion_tokens: 1,
                status: 200,
                streamed: false,
                cancelled: false,
                estimated: false,
                duration_ms: 1,
                ttfb_ms: Some(1),
                request_id: format!("req-{n}-{i}"),
                created_at: chrono::Utc::now(),
            })
            .collect();
        app.store.insert_usage(&records).await.unwrap();
        written += n;
        let to = chrono::Utc::now() + chrono::Duration::hours(1);
        let (total, by_model) = app
            .store
            .usage_summary(Some(user), from, to, relay::store::GroupBy::Model)
            .await
            .unwrap();
        assert_eq!(total.requests, written as i64);
        let this = by_model
            .iter()
            .find(|g| g.key == format!("batch-{n}"))
            .unwrap();
        assert_eq!(this.requests, n as i64);
        assert_eq!(
            this.prompt_tokens,
            (n * (n - 1) / 2) as i64,
            "each row once"
        );
    }
}
