//! The Responses API over real HTTP: round trips through the built-in mock (JSON and typed
//! events), the ownership of stored responses tried as another user would, and the event relay
//! under upstream failures and a client that leaves, against the fault-injecting fake.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::support::fake_upstream::{self, FakeUpstream};
use crate::support::{self, Db, TestApp, spawn_app_with};

/// A relay on the built-in mock, and two users' access tokens.
async fn with_mock(db: Db) -> (TestApp, String, String) {
    let app = support::spawn_app(db).await;
    let (alice, _) = app.user_tokens("alice@example.com").await;
    let (mallory, _) = app.user_tokens("mallory@example.com").await;
    (app, alice, mallory)
}

/// A relay on the fake upstream, and two users' access tokens.
async fn with_fake(extra: &[(&str, &str)]) -> (TestApp, FakeUpstream, String, String) {
    let fake = fake_upstream::start().await;
    let base = fake.base_url();
    let mut vars = vec![("OPENAI_BASE_URL", base.as_str())];
    vars.extend_from_slice(extra);
    let app = spawn_app_with(Db::Sqlite, &vars).await;
    let (alice, _) = app.user_tokens("alice@example.com").await;
    let (mallory, _) = app.user_tokens("mallory@example.com").await;
    (app, fake, alice, mallory)
}

/// `(event, data)` of each typed event of an SSE body.
fn typed_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut kind = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = k.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap_or_else(|_| panic!("not JSON: {d}"));
                }
            }
            (kind, data)
        })
        .collect()
}

fn deltas(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(kind, _)| kind == "response.output_text.delta")
        .map(|(_, data)| data["delta"].as_str().unwrap())
        .collect()
}

async fn delete(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .delete(app.api(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn create(app: &TestApp, token: &str, body: &Value) -> reqwest::Response {
    app.post_json_authed("/responses", token, body).await
}

#[tokio::test]
async fn a_response_round_trips_as_json_and_as_typed_events() {
    let (app, alice, _) = with_mock(Db::Sqlite).await;
    let resp = create(&app, &alice, &json!({"input": "hello relay world"})).await;
    assert_eq!(resp.status(), 200);
    let object: Value = resp.json().await.unwrap();
    assert_eq!(object["object"], "response");
    assert_eq!(object["model"], "gpt-4o-mini", "DEFAULT_MODEL filled in");
    assert_eq!(
        object["output"][0]["content"][0]["text"],
        "hello relay world"
    );
    assert_eq!(object["usage"]["input_tokens"], 3);

    let resp = create(
        &app,
        &alice,
        &json!({"model": "mock-echo", "input": "one two three", "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = typed_events(&resp.text().await.unwrap());
    assert_eq!(events[0].0, "response.created");
    assert_eq!(events.last().unwrap().0, "response.completed");
    assert_eq!(deltas(&events), "one two three");
    for (i, (kind, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], kind.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    assert_eq!(
        events.last().unwrap().1["response"]["usage"]["output_tokens"],
        3
    );
}

/// Everything another user could try with someone's response id: 404, as if it did not exist.
async fn assert_hidden(app: &TestApp, token: &str, id: &str) {
    for resp in [
        app.get_authed(&format!("/responses/{id}"), token).await,
        app.get_authed(&format!("/responses/{id}/input_items"), token)
            .await,
        app.post_json_authed(&format!("/responses/{id}/cancel"), token, &json!({}))
            .await,
        delete(app, &format!("/responses/{id}"), token).await,
        create(
            app,
            token,
            &json!({"input": "what did they say?", "previous_response_id": id}),
        )
        .await,
    ] {
        let url = resp.url().clone();
        assert_eq!(resp.status(), 404, "{url}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "not_found", "{url}");
        assert!(err["error"]["message"].as_str().unwrap().contains(id));
    }
}

async fn stored_responses_belong_to_their_creator(db: Db) {
    let (app, alice, mallory) = with_mock(db).await;
    // One response created as JSON, one streamed: both are recorded before the id is out.
    let object: Value = create(&app, &alice, &json!({"input": "my secret plan"}))
        .await
        .json()
        .await
        .unwrap();
    let first = object["id"].as_str().unwrap().to_owned();
    let text = create(
        &app,
        &alice,
        &json!({"input": "more secrets", "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    let second = typed_events(&text)[0].1["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    for id in [&first, &second] {
        assert_hidden(&app, &mallory, id).await;
        let resp = app.get_authed(&format!("/responses/{id}"), &alice).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.unwrap()["id"], id.as_str());
    }
    let items: Value = app
        .get_authed(&format!("/responses/{first}/input_items"), &alice)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(items["data"][0]["content"][0]["text"], "my secret plan");

    // The owner continues the conversation.
    let resp = create(
        &app,
        &alice,
        &json!({"input": "and then?", "previous_response_id": first}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let next: Value = resp.json().await.unwrap();
    assert_eq!(next["previous_response_id"], first.as_str());
    // … and the new response is hers too.
    assert_hidden(&app, &mallory, next["id"].as_str().unwrap()).await;

    // Deleted: gone for its owner as well.
    let resp = delete(&app, &format!("/responses/{first}"), &alice).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["deleted"], true);
    let resp = app.get_authed(&format!("/responses/{first}"), &alice).await;
    assert_eq!(resp.status(), 404);

    // Without a token, nothing at all.
    let resp = app.get(&format!("/responses/{second}")).await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn stored_responses_belong_to_their_creator_sqlite() {
    stored_responses_belong_to_their_creator(Db::Sqlite).await;
}

#[tokio::test]
async fn stored_responses_belong_to_their_creator_postgres() {
    stored_responses_belong_to_their_creator(Db::Postgres).await;
}

#[tokio::test]
async fn nothing_reaches_the_upstream_for_an_id_of_someone_else() {
    let (app, fake, alice, mallory) = with_fake(&[]).await;
    let object: Value = create(&app, &alice, &json!({"model": "gpt-4o-mini", "input": "x"}))
        .await
        .json()
        .await
        .unwrap();
    let id = object["id"].as_str().unwrap().to_owned();
    assert_eq!(id, "resp_fake0");
    // Guessed, forged and hostile ids as well as the real one.
    for tried in [
        id.as_str(),
        "resp_fake1",
        "resp_fake0%2F..%2Fmodels",
        "x%3Fa%3D1",
    ] {
        for resp in [
            app.get_authed(&format!("/responses/{tried}"), &mallory)
                .await,
            app.get_authed(&format!("/responses/{tried}/input_items"), &mallory)
                .await,
            app.post_json_authed(&format!("/responses/{tried}/cancel"), &mallory, &json!({}))
                .await,
            delete(&app, &format!("/responses/{tried}"), &mallory).await,
        ] {
            assert_eq!(resp.status(), 404, "{tried}: {}", resp.url());
        }
    }
    let resp = create(
        &app,
        &mallory,
        &json!({"model": "gpt-4o-mini", "input": "x", "previous_response_id": id}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["param"], "previous_response_id");
    assert!(fake.shared.stored_calls.lock().unwrap().is_empty());
    assert_eq!(
        fake.received().len(),
        1,
        "only alice's create went upstream"
    );

    // A resumed stream is not relayed: refused before the upstream.
    let resp = app
        .get_authed(&format!("/responses/{id}?stream=true"), &alice)
        .await;
    assert_eq!(resp.status(), 422);
    assert!(fake.shared.stored_calls.lock().unwrap().is_empty());

    // The owner's calls go upstream, to the right paths, with the query kept.
    let resp = app
        .get_authed(
            &format!("/responses/{id}?include[]=message.output_text.logprobs"),
            &alice,
        )
        .await;
    assert_eq!(resp.status(), 200);
    app.get_authed(
        &format!("/responses/{id}/input_items?limit=5&order=asc"),
        &alice,
    )
    .await;
    app.post_json_authed(&format!("/responses/{id}/cancel"), &alice, &json!({}))
        .await;
    delete(&app, &format!("/responses/{id}"), &alice).await;
    assert_eq!(
        *fake.shared.stored_calls.lock().unwrap(),
        [
            format!("GET /v1/responses/{id}?include%5B%5D=message.output_text.logprobs"),
            format!("GET /v1/responses/{id}/input_items?limit=5&order=asc"),
            format!("POST /v1/responses/{id}/cancel"),
            format!("DELETE /v1/responses/{id}"),
        ]
    );
    // The client's headers never go upstream.
    let sent = &fake.received()[0];
    assert!(
        sent.headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer sk-")
    );
}

#[tokio::test]
async fn what_relay_cannot_check_is_refused_before_the_upstream() {
    let (app, fake, alice, _) = with_fake(&[("ALLOWED_MODELS", "gpt-4o-mini")]).await;
    for (body, param) in [
        (json!({"model": "gpt-4o-mini"}), "input"),
        (
            json!({"input": "x", "Previous_Response_Id": "resp_theirs"}),
            "previous_response_id",
        ),
        (
            json!({"input": [{"type": "message", "Type": "item_reference", "id": "x"}]}),
            "input[0].type",
        ),
        (
            json!({"input": "x", "tools": [{"type": "code_interpreter", "container": "cntr_1"}]}),
            "tools[0].container",
        ),
        (
            json!({"input": "x", "conversation": "conv_123"}),
            "conversation",
        ),
        (
            json!({"input": "x", "conversation": {"id": "conv_123"}}),
            "conversation",
        ),
        (
            json!({"input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (json!({"input": "x", "model": 7}), "model"),
    ] {
        let resp = create(&app, &alice, &body).await;
        assert_eq!(resp.status(), 422, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{body}");
    }
    let resp = create(&app, &alice, &json!({"model": "gpt-4o", "input": "x"})).await;
    assert_eq!(resp.status(), 403);
    let resp = app
        .get_authed("/responses/resp_fake0?stream=true", &alice)
        .await;
    assert_eq!(resp.status(), 404, "not hers: the id is checked first");
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn unknown_fields_are_forwarded_byte_for_byte() {
    let (app, fake, alice, _) = with_fake(&[]).await;
    let raw = r#"{"model":"gpt-4o-mini","input":[{"role":"user","content":"x"}],"tools":[{"type":"web_search"}],"reasoning":{"effort":"low"},"store":false}"#;
    let resp = app
        .client
        .post(app.api("/responses"))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .header("x-client-secret", "do-not-forward")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = &fake.received()[0];
    assert_eq!(sent.raw, raw.as_bytes(), "the very bytes");
    assert!(sent.headers.get("x-client-secret").is_none());
}

#[tokio::test]
async fn a_responses_stream_cut_or_stalled_ends_with_one_error_event() {
    let (app, _fake, alice, _) = with_fake(&[("UPSTREAM_TIMEOUT_SECONDS", "1")]).await;
    for (model, code, text) in [
        ("fake-cut", "upstream_stream_error", "partial"),
        ("fake-stall", "upstream_timeout", "first"),
    ] {
        let start = Instant::now();
        let resp = create(
            &app,
            &alice,
            &json!({"model": model, "input": "x", "stream": true}),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(5), resp.text())
            .await
            .unwrap()
            .unwrap();
        assert!(start.elapsed() < Duration::from_secs(4), "{model} hung");
        let events = typed_events(&body);
        assert_eq!(deltas(&events), text, "{model}");
        let (kind, data) = events.last().unwrap();
        assert_eq!(kind, "error", "{model}: {body}");
        assert_eq!(data["type"], "error");
        assert_eq!(data["code"], code);
        assert_eq!(data["sequence_number"], events.len() - 1);
        assert_eq!(
            events.iter().filter(|(k, _)| k == "error").count(),
            1,
            "{model}"
        );
    }
    // A server that sends no `response.created` is relayed all the same.
    let resp = create(
        &app,
        &alice,
        &json!({"model": "fake-no-created", "input": "x", "stream": true}),
    )
    .await;
    let events = typed_events(&resp.text().await.unwrap());
    assert_eq!(deltas(&events), "no created");
    assert_eq!(events.last().unwrap().0, "response.completed");
}

#[tokio::test]
async fn a_client_gone_mid_stream_closes_the_upstream_response() {
    let (app, fake, alice, _) = with_fake(&[]).await;
    let resp = create(
        &app,
        &alice,
        &json!({"model": "fake-endless", "input": "x", "stream": true}),
    )
    .await;
    let mut stream = resp.bytes_stream();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    assert!(fake.shared.stream_closed.lock().unwrap().is_none());
    drop(stream);
    let gone = Instant::now();
    while fake.shared.stream_closed.lock().unwrap().is_none() {
        assert!(
            gone.elapsed() < Duration::from_secs(1),
            "the upstream stream is still open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn ids_are_recorded_before_the_client_sees_them() {
    let (app, _fake, alice, mallory) = with_fake(&[]).await;
    let resp = create(
        &app,
        &alice,
        &json!({"model": "fake-endless", "input": "x", "stream": true}),
    )
    .await;
    let mut stream = resp.bytes_stream();
    let first = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    let events = typed_events(&first);
    assert_eq!(events[0].0, "response.created");
    let id = events[0].1["response"]["id"].as_str().unwrap().to_owned();
    // The stream is still running: the id is already hers, and only hers.
    let resp = app.get_authed(&format!("/responses/{id}"), &alice).await;
    assert_eq!(resp.status(), 200);
    assert_hidden(&app, &mallory, &id).await;
    drop(stream);
}

#[tokio::test]
async fn output_items_can_be_referenced_by_their_owner_only() {
    let (app, alice, mallory) = with_mock(Db::Sqlite).await;
    // One item from a JSON answer, one from a stream (the AI SDK's default path).
    let object: Value = create(&app, &alice, &json!({"input": "first turn"}))
        .await
        .json()
        .await
        .unwrap();
    let json_item = object["output"][0]["id"].as_str().unwrap().to_owned();
    let text = create(
        &app,
        &alice,
        &json!({"input": "second turn", "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    let events = typed_events(&text);
    let streamed_item = events
        .iter()
        .find(|(kind, _)| kind == "response.output_item.done")
        .map(|(_, data)| data["item"]["id"].as_str().unwrap().to_owned())
        .unwrap();
    // What the AI SDK sends on the next turn: item references to the earlier answers.
    let next_turn = |items: &[&str]| {
        let mut input: Vec<Value> = vec![json!({"role": "user", "content": "first turn"})];
        input.extend(
            items
                .iter()
                .map(|id| json!({"type": "item_reference", "id": id})),
        );
        input.push(json!({"role": "user", "content": "third turn"}));
        json!({"input": input, "stream": true})
    };
    let resp = create(&app, &alice, &next_turn(&[&json_item, &streamed_item])).await;
    assert_eq!(resp.status(), 200);
    let events = typed_events(&resp.text().await.unwrap());
    assert_eq!(deltas(&events), "third turn");

    // Someone else's items, however they are named: 404, the field named.
    for item in [
        json!({"type": "item_reference", "id": json_item}),
        json!({"id": streamed_item}),
        json!({"type": null, "id": json_item}),
        json!({"type": "message", "role": "assistant", "id": streamed_item, "content": "x"}),
    ] {
        let body = json!({"input": [{"role": "user", "content": "hi"}, item]});
        let resp = create(&app, &mallory, &body).await;
        assert_eq!(resp.status(), 404, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], "input[1].id", "{body}");
    }
}

#[tokio::test]
async fn unusual_event_streams_are_read_all_the_same() {
    let (app, _fake, alice, mallory) = with_fake(&[]).await;
    for (model, text) in [
        ("fake-comment-first", "after comment"),
        ("fake-data-only", "data only"),
    ] {
        let resp = create(
            &app,
            &alice,
            &json!({"model": model, "input": "x", "stream": true}),
        )
        .await;
        let body = resp.text().await.unwrap();
        assert!(!body.contains("upstream_stream_error"), "{model}: {body}");
        let id = body
            .split("\"id\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .to_owned();
        assert!(id.starts_with("resp_fake"), "{model}: {id}");
        assert!(body.contains(text), "{model}: {body}");
        let resp = app.get_authed(&format!("/responses/{id}"), &alice).await;
        assert_eq!(resp.status(), 200, "{model}: the id was recorded");
        assert_hidden(&app, &mallory, &id).await;
    }
}

#[tokio::test]
async fn owners_older_than_the_upstreams_retention_are_purged() {
    let (app, token, _) = with_mock(Db::Sqlite).await;
    let made: Value = create(&app, &token, &json!({"input": "keep me"}))
        .await
        .json()
        .await
        .unwrap();
    let id = made["id"].as_str().unwrap();
    assert_eq!(
        app.get_authed(&format!("/responses/{id}"), &token)
            .await
            .status(),
        200
    );
    // A recent owner survives the purge; one past 30 days does not.
    let cutoff = chrono::Utc::now() - chrono::Duration::days(relay::app::RESPONSE_OWNER_DAYS);
    assert_eq!(app.store.purge_response_owners(cutoff).await.unwrap(), 0);
    if let relay::store::Store::Sqlite(pool) = &app.store {
        sqlx::query("UPDATE response_owners SET created_at = $1")
            .bind(chrono::Utc::now() - chrono::Duration::days(31))
            .execute(pool)
            .await
            .unwrap();
    }
    assert!(app.store.purge_response_owners(cutoff).await.unwrap() >= 1);
    // Forgotten: refused, and nothing is asked of the upstream.
    assert_eq!(
        app.get_authed(&format!("/responses/{id}"), &token)
            .await
            .status(),
        404
    );
}
