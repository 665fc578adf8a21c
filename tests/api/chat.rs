//! The chat relay over real HTTP: the built-in mock for round trips, a fault-injecting fake
//! upstream for everything that can go wrong.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::support::fake_upstream::{self, FakeUpstream};
use crate::support::{self, Db, TestApp, spawn_app_with};

/// A relay whose upstream is the fake; returns the app, the fake and an access token.
async fn with_fake(extra: &[(&str, &str)]) -> (TestApp, FakeUpstream, String) {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let mut vars = vec![("OPENAI_BASE_URL", base.as_str())];
    vars.extend_from_slice(extra);
    let app = spawn_app_with(Db::Sqlite, &vars).await;
    let (token, _) = app.user_tokens("chat@example.com").await;
    (app, fake, token)
}

/// A relay whose upstream is the built-in mock (what `spawn_app` gives every test app).
async fn with_mock() -> (TestApp, String) {
    let app = support::spawn_app(Db::Sqlite).await;
    let (token, _) = app.user_tokens("mock@example.com").await;
    (app, token)
}

fn hello(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello relay world"}]})
}

/// The `data:` payloads of an SSE body.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

fn content_of(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn non_streaming_round_trip_through_the_mock() {
    let (app, token) = with_mock().await;
    let resp = app.chat(&token, &hello("mock-echo")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "hello relay world"
    );
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn streaming_round_trip_through_the_mock() {
    let (app, token) = with_mock().await;
    let mut body = hello("mock-echo");
    body["stream"] = json!(true);
    let resp = app.chat(&token, &body).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    let ev = events(&resp.text().await.unwrap());
    assert_eq!(ev.last().unwrap(), "[DONE]");
    assert_eq!(content_of(&ev), "hello relay world");
    assert!(
        ev.iter().all(|e| !e.contains("\"prompt_tokens\"")),
        "no usage chunk unless the client asks"
    );

    body["stream_options"] = json!({"include_usage": true});
    let ev = events(&app.chat(&token, &body).await.text().await.unwrap());
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);

    // The /stream endpoint always streams.
    let resp = app
        .post_json_authed("/chat/completions/stream", &token, &hello("mock-echo"))
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(
        content_of(&events(&resp.text().await.unwrap())),
        "hello relay world"
    );
}

#[tokio::test]
async fn unknown_fields_arrive_unchanged_and_client_headers_do_not() {
    let (app, fake, token) = with_fake(&[]).await;
    let body = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "x", "name": "ann"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_object"},
        "seed": 42, "logprobs": true, "top_logprobs": 2,
        "x_future_field": {"nested": [1, 2.5, null, "s"]}
    });
    let resp = app
        .client
        .post(app.api("/chat/completions"))
        .bearer_auth(&token)
        .header("cookie", "session=abc")
        .header("x-custom", "client-value")
        .header("proxy-authorization", "Basic abc")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = fake.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, body, "the body arrives unchanged");
    let h = &got[0].headers;
    assert_eq!(h["authorization"], "Bearer sk-test-upstream-key");
    for name in ["cookie", "x-custom", "proxy-authorization"] {
        assert!(h.get(name).is_none(), "{name} was forwarded");
    }
    assert!(
        !format!("{h:?}").contains(&token),
        "the client's token reached the upstream"
    );
}

#[tokio::test]
async fn missing_model_means_default_model_and_allowed_models_are_enforced() {
    let (app, fake, token) = with_fake(&[
        ("DEFAULT_MODEL", "gpt-4o"),
        ("ALLOWED_MODELS", "gpt-4o,gpt-4o-mini"),
    ])
    .await;
    let no_model = json!({"messages": [{"role": "user", "content": "x"}]});
    let resp = app.chat(&token, &no_model).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(fake.received()[0].body["model"], "gpt-4o");
    let resp = app.chat(&token, &hello("o1")).await;
    assert_eq!(resp.status(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "model_not_allowed");
    assert_eq!(
        fake.received().len(),
        1,
        "a refused model never reaches the upstream"
    );
}

#[tokio::test]
async fn validation_errors_never_reach_the_upstream() {
    let (app, fake, token) = with_fake(&[]).await;
    let cases = [
        (json!({"model": "m"}), "messages"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"content": "no role"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user"}], "temperature": 3}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user"}], "top_p": 1.5}),
            "top_p",
        ),
        (json!({"messages": [{"role": "user"}], "n": 0}), "n"),
        (
            json!({"messages": [{"role": "user"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user"}], "model": ["a"]}),
            "model",
        ),
    ];
    for (body, param) in cases {
        let resp = app.chat(&token, &body).await;
        assert_eq!(resp.status(), 422, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{body}");
    }
    let resp = app
        .client
        .post(app.api("/chat/completions"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = app.post_json("/chat/completions", &hello("m")).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn upstream_errors_pass_through_with_their_status() {
    let (app, _fake, token) = with_fake(&[]).await;
    let resp = app.chat(&token, &hello("fake-500")).await;
    assert_eq!(resp.status(), 500);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["message"], "the upstream broke");
    assert_eq!(err["error"]["type"], "upstream_type");
    assert!(err["error"].get("extra").is_none());

    let resp = app.chat(&token, &hello("fake-404")).await;
    assert_eq!(resp.status(), 404);

    let resp = app.chat(&token, &hello("fake-429")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "42");
    let resp = app.chat(&token, &hello("fake-429-bare")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");

    // The upstream refusing relay's own key is relay's problem, not the client's login.
    let resp = app.chat(&token, &hello("fake-401")).await;
    assert_eq!(resp.status(), 502);
}

#[tokio::test]
async fn the_upstream_key_never_reaches_the_client() {
    let (app, _fake, token) = with_fake(&[]).await;
    let resp = app.chat(&token, &hello("fake-leak-key")).await;
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("sk-test-upstream-key"), "{text}");
    assert!(text.contains("[redacted]"), "{text}");
}

#[tokio::test]
async fn the_upstream_key_is_masked_in_any_case_and_in_stream_error_events() {
    let (app, _fake, token) = with_fake(&[]).await;
    let resp = app.chat(&token, &hello("fake-leak-upper")).await;
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(
        !text.to_ascii_lowercase().contains("sk-test-upstream-key"),
        "{text}"
    );
    assert!(text.contains("[redacted]"), "{text}");

    let mut body = hello("fake-stream-error-leak");
    body["stream"] = json!(true);
    let resp = app.chat(&token, &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        !text.to_ascii_lowercase().contains("sk-test-upstream-key"),
        "{text}"
    );
    let last = events(&text).pop().unwrap();
    let event: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        event["error"]["message"],
        "quota of [redacted] ([redacted]) used up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_health_checks_do_not_spend_the_upstream_key() {
    let (app, fake, _) = with_fake(&[]).await;
    let hits = || {
        fake.shared
            .model_hits
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = hits();
    let checks = futures_util::future::join_all((0..300).map(|_| app.health_detailed())).await;
    for (status, body) in checks {
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["checks"]["upstream"]["status"], "ok", "{body}");
    }
    assert_eq!(
        hits() - before,
        1,
        "one upstream call for 300 health checks"
    );
    // And the model list is served from what that one call fetched.
    let token = app.user_tokens("models@example.com").await.0;
    assert_eq!(app.models(&token).await.status(), 200);
    assert_eq!(hits() - before, 1);
}

#[tokio::test]
async fn garbage_and_unreachable_upstreams_are_502() {
    let (app, _fake, token) = with_fake(&[]).await;
    for model in [
        "fake-garbage",
        "fake-garbage-500",
        "fake-json-not-completion",
    ] {
        let resp = app.chat(&token, &hello(model)).await;
        assert_eq!(resp.status(), 502, "{model}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "server_error", "{model}");
    }
    let base = fake_upstream::unreachable_base_url().await;
    let app = spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", base.as_str())]).await;
    let (token, _) = app.user_tokens("u@example.com").await;
    let resp = app.chat(&token, &hello("gpt-4o-mini")).await;
    assert_eq!(resp.status(), 502);
    let resp = app.models(&token).await;
    assert_eq!(resp.status(), 502);
    let health = app.health_detailed().await.1;
    assert_eq!(health["checks"]["upstream"]["status"], "down");
    assert_eq!(health["status"], "degraded");
}

#[tokio::test]
async fn a_hanging_upstream_is_504_within_the_timeout() {
    let (app, _fake, token) = with_fake(&[("UPSTREAM_TIMEOUT_SECONDS", "1")]).await;
    let start = Instant::now();
    let resp = app.chat(&token, &hello("fake-hang")).await;
    let took = start.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn a_stream_cut_or_stalled_mid_way_ends_with_an_error_event() {
    let (app, _fake, token) = with_fake(&[("UPSTREAM_TIMEOUT_SECONDS", "1")]).await;
    for (model, code) in [
        ("fake-cut", "upstream_stream_error"),
        ("fake-stall", "upstream_timeout"),
    ] {
        let mut body = hello(model);
        body["stream"] = json!(true);
        let start = Instant::now();
        let resp = app.chat(&token, &body).await;
        assert_eq!(resp.status(), 200);
        let text = tokio::time::timeout(Duration::from_secs(5), resp.text())
            .await
            .unwrap()
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(4), "{model} hung");
        let ev = events(&text);
        let last: Value = serde_json::from_str(ev.last().unwrap()).unwrap();
        assert!(last["error"]["message"].is_string(), "{model}: {text}");
        assert_eq!(last["error"]["code"], code, "{model}");
        assert!(content_of(&ev).starts_with(if model == "fake-cut" {
            "partial answer"
        } else {
            "first"
        }));
        assert_eq!(
            ev.iter().filter(|e| e.contains("\"error\"")).count(),
            1,
            "{model}"
        );
    }
}

#[tokio::test]
async fn a_long_steady_stream_outlives_the_timeout() {
    let (app, _fake, token) = with_fake(&[("UPSTREAM_TIMEOUT_SECONDS", "1")]).await;
    let mut body = hello("fake-slow");
    body["stream"] = json!(true);
    let start = Instant::now();
    let text = app.chat(&token, &body).await.text().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(4800));
    let ev = events(&text);
    assert_eq!(ev.last().unwrap(), "[DONE]", "{text}");
    assert_eq!(content_of(&ev).split_whitespace().count(), 25);
    assert!(!text.contains("\"error\""));
}

#[tokio::test]
async fn a_client_gone_mid_stream_closes_the_upstream_connection() {
    let (app, fake, token) = with_fake(&[]).await;
    let mut body = hello("fake-endless");
    body["stream"] = json!(true);
    let resp = app.chat(&token, &body).await;
    let mut stream = resp.bytes_stream();
    let mut got = 0;
    while got < 3 {
        stream.next().await.unwrap().unwrap();
        got += 1;
    }
    assert!(fake.shared.stream_closed.lock().unwrap().is_none());
    drop(stream);
    let gone = Instant::now();
    loop {
        if let Some(closed) = *fake.shared.stream_closed.lock().unwrap() {
            assert!(closed.duration_since(gone) < Duration::from_secs(1));
            break;
        }
        assert!(
            gone.elapsed() < Duration::from_secs(1),
            "the upstream stream is still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn models_are_filtered_and_cached() {
    let (app, fake, token) = with_fake(&[("ALLOWED_MODELS", "gpt-4o,o1,not-upstream")]).await;
    for path in ["/models", "/chat/models", "/models"] {
        let resp = app.get_authed(path, &token).await;
        assert_eq!(resp.status(), 200);
        let list: Value = resp.json().await.unwrap();
        assert_eq!(list["object"], "list");
        let ids: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["gpt-4o", "o1"], "{path}");
        assert_eq!(list["data"][0]["object"], "model");
        assert_eq!(list["data"][0]["owned_by"], "openai");
    }
    assert_eq!(
        fake.shared
            .model_hits
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "cached"
    );
    let resp = app.get("/models").await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn embeddings_are_relayed_and_checked() {
    let (app, token) = with_mock().await;
    let body =
        json!({"model": "mock-embed", "input": ["the quick brown fox", "jumps"], "dimensions": 8});
    let resp = app.post_json_authed("/embeddings", &token, &body).await;
    assert_eq!(resp.status(), 200);
    let list: Value = resp.json().await.unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(list["data"][1]["embedding"].as_array().unwrap().len(), 8);
    assert_eq!(list["usage"]["prompt_tokens"], 5);
    for (body, param) in [
        (json!({"model": "mock-embed"}), "input"),
        (json!({"input": "x"}), "model"),
        (json!({"model": 3, "input": "x"}), "model"),
        (json!({"model": "mock-embed", "input": 3}), "input"),
    ] {
        let resp = app.post_json_authed("/embeddings", &token, &body).await;
        assert_eq!(resp.status(), 422, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{body}");
    }
    let resp = app.post_json("/embeddings", &body).await;
    assert_eq!(resp.status(), 401, "no anonymous embeddings");

    let app = crate::support::spawn_app_with(Db::Sqlite, &[("ALLOWED_MODELS", "mock-echo")]).await;
    let (token, _) = app.user_tokens("embed@example.com").await;
    let body = json!({"model": "mock-embed", "input": "x"});
    let resp = app.post_json_authed("/embeddings", &token, &body).await;
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn one_model_can_be_looked_up() {
    let (app, token) = with_mock().await;
    let resp = app.get_authed("/models/mock-echo", &token).await;
    assert_eq!(resp.status(), 200);
    let model: Value = resp.json().await.unwrap();
    assert_eq!(
        (model["id"].as_str(), model["object"].as_str()),
        (Some("mock-echo"), Some("model"))
    );
    let resp = app.get_authed("/models/gpt-not-here", &token).await;
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "model_not_found");
    assert_eq!(app.get("/models/mock-echo").await.status(), 401);
}

#[tokio::test]
async fn the_mock_answers_the_responses_api_like_openai() {
    // The groundwork for relaying /responses: the built-in mock speaks it, JSON and events.
    let base = crate::support::spawn_mock(Default::default()).await;
    let client = reqwest::Client::new();
    let post = |body: Value| {
        client
            .post(format!("{base}/responses"))
            .bearer_auth("sk-mock")
            .json(&body)
            .send()
    };
    let resp = post(json!({"model": "mock-echo", "input": "hello relay world"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let object: Value = resp.json().await.unwrap();
    assert_eq!(object["object"], "response");
    assert_eq!(object["status"], "completed");
    assert_eq!(
        object["output"][0]["content"][0]["text"],
        "hello relay world"
    );
    assert_eq!(object["usage"]["input_tokens"], 3);
    assert_eq!(object["usage"]["output_tokens"], 3);

    let body = json!({"model": "mock-echo", "stream": true,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "one two"}]}]});
    let text = post(body).await.unwrap().text().await.unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (head, data) = e.split_once('\n').unwrap();
            let kind = head.strip_prefix("event: ").unwrap().to_owned();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], kind);
            (kind, data)
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    let deltas: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "one two");
    let sequence: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(sequence, (0..events.len() as u64).collect::<Vec<_>>());
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(completed["usage"]["output_tokens"], 2);
    assert_eq!(events[0].1["response"]["id"], completed["id"]);
}
