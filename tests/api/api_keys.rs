//! API keys: made, listed and deleted by their owner; a Bearer credential for the relay
//! endpoints, refused on account endpoints, unguessable, and gone within seconds once deleted
//! or expired.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{self, Db, TestApp, spawn_app};

fn hello() -> Value {
    json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]})
}

async fn new_key(app: &TestApp, token: &str, body: Value) -> Value {
    let resp = app.post_json_authed("/auth/api-keys", token, &body).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_key_is_shown_once_works_on_the_relay_and_is_refused_on_the_account() {
    let app = spawn_app(Db::Sqlite).await;
    let (token, _) = app.user_tokens("server@example.com").await;
    let made = new_key(
        &app,
        &token,
        json!({"name": "backend", "expires_in_days": 30}),
    )
    .await;
    let key = made["key"].as_str().unwrap();
    assert!(key.starts_with("rk-") && key.len() >= 3 + 43, "{key}");
    assert_eq!(made["prefix"].as_str().unwrap(), &key[..12]);
    assert_eq!(made["name"], "backend");
    let expires: chrono::DateTime<chrono::Utc> =
        made["expires_at"].as_str().unwrap().parse().unwrap();
    let days = (expires - chrono::Utc::now()).num_hours();
    assert!((29 * 24..=30 * 24).contains(&days), "{days}");

    // Stored only as a hash: the database never holds the key.
    let stored = app
        .store
        .list_api_keys(app.stored_user("server@example.com").await.id)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    // The list shows everything but the secret.
    let list: Value = app
        .get_authed("/auth/api-keys", &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], made["id"]);
    assert!(list["data"][0].get("key").is_none());
    assert!(!list.to_string().contains(&key[12..]));

    // A Bearer credential for chat (streamed too), models, embeddings and usage.
    assert_eq!(app.chat(key, &hello()).await.status(), 200);
    let mut stream = hello();
    stream["stream"] = json!(true);
    let resp = app.chat(key, &stream).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("[DONE]"));
    assert_eq!(app.models(key).await.status(), 200);
    let resp = app
        .post_json_authed(
            "/embeddings",
            key,
            &json!({"model": "mock-echo", "input": "x"}),
        )
        .await;
    assert_eq!(resp.status(), 200);

    // Usage records carry the key; /usage groups by it.
    let start = Instant::now();
    let report = loop {
        let report: Value = app
            .get_authed("/usage?group_by=api_key", key)
            .await
            .json()
            .await
            .unwrap();
        if report["total"]["requests"] == 3 {
            break report;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{report}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(report["groups"][0]["key"], made["id"], "{report}");
    assert_eq!(report["groups"][0]["requests"], 3);
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);

    // Refused on account endpoints: a leaked key cannot manage the account.
    for (method, path) in [
        (reqwest::Method::GET, "/auth/me"),
        (reqwest::Method::GET, "/auth/api-keys"),
        (reqwest::Method::POST, "/auth/api-keys"),
        (reqwest::Method::POST, "/auth/logout"),
    ] {
        let resp = app
            .client
            .request(method.clone(), app.api(path))
            .bearer_auth(key)
            .json(&json!({"name": "more", "refresh_token": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{method} {path}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "api_key_not_allowed", "{path}");
    }
    let resp = app
        .client
        .delete(app.api(&format!("/auth/api-keys/{}", made["id"].as_str().unwrap())))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // Deleted: refused at once here (other replicas within seconds).
    let resp = app
        .client
        .delete(app.api(&format!("/auth/api-keys/{}", made["id"].as_str().unwrap())))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = app.chat(key, &hello()).await;
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert_eq!(err["error"]["type"], "authentication_error");
}

#[tokio::test]
async fn keys_are_unguessable_and_belong_to_their_owner() {
    let app = spawn_app(Db::Sqlite).await;
    let (ann, _) = app.user_tokens("ann@example.com").await;
    let (bob, _) = app.user_tokens("bob@example.com").await;
    let made = new_key(&app, &ann, json!({"name": "ann's"})).await;
    let key = made["key"].as_str().unwrap();
    // Made-up keys, a key with one character changed, keys of the wrong length: 401.
    let mut flipped = key.to_owned().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    for forged in [
        flipped.as_str(),
        "rk-",
        "rk-0000000000000000000000000000000000000000000000000000000000",
        &format!("{key}A"),
        &key[..key.len() - 1],
    ] {
        let resp = app.chat(forged, &hello()).await;
        assert_eq!(resp.status(), 401, "{forged}");
    }
    // Every key is different.
    let other = new_key(&app, &ann, json!({"name": "second"})).await;
    assert_ne!(other["key"], made["key"]);
    assert_ne!(other["prefix"], made["prefix"]);
    // Bob can neither see nor delete Ann's key.
    let list: Value = app
        .get_authed("/auth/api-keys", &bob)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let resp = app
        .client
        .delete(app.api(&format!("/auth/api-keys/{}", made["id"].as_str().unwrap())))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(app.chat(key, &hello()).await.status(), 200);
    // Validation.
    for (body, param) in [
        (json!({}), "name"),
        (json!({"name": "  "}), "name"),
        (json!({"name": "x".repeat(101)}), "name"),
        (json!({"name": "a\u{0}b"}), "name"),
        (
            json!({"name": "k", "expires_in_days": 0}),
            "expires_in_days",
        ),
        (
            json!({"name": "k", "expires_in_days": 3651}),
            "expires_in_days",
        ),
        (json!({"name": "k", "scopes": ["all"]}), "scopes"),
    ] {
        let resp = app.post_json_authed("/auth/api-keys", &ann, &body).await;
        assert_eq!(resp.status(), 422, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
    }
}

#[tokio::test]
async fn an_expired_key_is_refused_and_last_use_is_recorded() {
    let app = spawn_app(Db::Sqlite).await;
    let (token, _) = app.user_tokens("expiring@example.com").await;
    let made = new_key(&app, &token, json!({"name": "short", "expires_in_days": 1})).await;
    let key = made["key"].as_str().unwrap();
    assert_eq!(app.chat(key, &hello()).await.status(), 200);
    // Its last use is written off the request path, within about a second.
    let user = app.stored_user("expiring@example.com").await.id;
    let start = Instant::now();
    while app.store.list_api_keys(user).await.unwrap()[0]
        .last_used_at
        .is_none()
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "last_used_at never set"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Expired in the database (as a day later): refused within the cache's few seconds.
    let id = uuid::Uuid::parse_str(made["id"].as_str().unwrap()).unwrap();
    expire(&app, id).await;
    let start = Instant::now();
    loop {
        let resp = app.chat(key, &hello()).await;
        if resp.status() == 401 {
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "api_key_expired");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sets key `id`'s expiry to a minute ago, in the database.
pub async fn expire(app: &TestApp, id: uuid::Uuid) {
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    match &app.store {
        relay::store::Store::Sqlite(pool) => {
            sqlx::query("UPDATE api_keys SET expires_at = $1 WHERE id = $2")
                .bind(past)
                .bind(id)
                .execute(pool)
                .await
                .unwrap();
        }
        relay::store::Store::Postgres(pool) => {
            sqlx::query("UPDATE api_keys SET expires_at = $1 WHERE id = $2")
                .bind(past)
                .bind(id)
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn a_user_holds_at_most_100_keys() {
    let app = spawn_app(Db::Sqlite).await;
    let (token, _) = app.user_tokens("hoarder@example.com").await;
    let user = app.stored_user("hoarder@example.com").await.id;
    for i in 0..100 {
        let key = relay::store::NewApiKey {
            id: uuid::Uuid::new_v4(),
            user_id: user,
            name: format!("k{i}"),
            key_hash: format!("{i:064x}"),
            prefix: "rk-test".into(),
            expires_at: None,
        };
        let created = app.store.create_api_key(key, 100, i64::MAX).await.unwrap();
        assert!(matches!(created, relay::store::KeyCreation::Created(_)));
    }
    let resp = app
        .post_json_authed("/auth/api-keys", &token, &json!({"name": "one more"}))
        .await;
    assert_eq!(resp.status(), 409);
}

#[tokio::test]
async fn keys_never_reach_the_log() {
    let base = support::spawn_mock(Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let url = format!("sqlite://{}", db.display());
    let relay = support::RelayProcess::start(
        dir.path(),
        &["serve"],
        &[
            ("SECRET_KEY", support::SECRET),
            ("OPENAI_API_KEY", "sk-upstream-secret"),
            ("OPENAI_BASE_URL", base.as_str()),
            ("DATABASE_URL", url.as_str()),
            ("REDIS_URL", ""),
            ("LOG_LEVEL", "debug"),
        ],
    );
    let client = reqwest::Client::new();
    let token = relay.access_token(&client, "logged@example.com").await;
    let made: Value = client
        .post(format!("{}/api/v1/auth/api-keys", relay.base))
        .bearer_auth(&token)
        .json(&json!({"name": "quiet"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = made["key"].as_str().unwrap().to_owned();
    for credential in [key.clone(), format!("{key}x")] {
        client
            .post(format!("{}/api/v1/chat/completions", relay.base))
            .bearer_auth(&credential)
            .json(&hello())
            .send()
            .await
            .unwrap();
    }
    let done = relay.wait_for_log("API key created", Duration::from_secs(2));
    assert!(done.is_some());
    std::thread::sleep(Duration::from_millis(300));
    // The secret part never appears; the log knows keys by id.
    assert!(relay.logged(&key[12..]).is_none(), "the key was logged");
    assert!(relay.logged("sk-upstream-secret").is_none());
}

#[tokio::test]
async fn a_token_revoked_elsewhere_cannot_make_a_key_that_outlives_the_revocation() {
    // The revocation comes from another replica (or the CLI): this relay's status cache still
    // trusts the token for up to 3 s. A key made with it in that window must not survive.
    let app = spawn_app(Db::Sqlite).await;
    let (token, _) = app.user_tokens("stolen@example.com").await;
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    let user = app.stored_user("stolen@example.com").await.id;
    assert!(app.store.revoke_user(user).await.unwrap());
    let resp = app
        .post_json_authed("/auth/api-keys", &token, &json!({"name": "backdoor"}))
        .await;
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "token_revoked");
    assert!(app.store.list_api_keys(user).await.unwrap().is_empty());
    // And the token itself stops within the cache's 3 s.
    let start = Instant::now();
    while app.chat(&token, &hello()).await.status() != 401 {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
