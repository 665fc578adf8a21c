//! The owner's control: admin endpoints, closed registration, revocation, and the `relay user`
//! commands, on SQLite and PostgreSQL.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{self, Db, TestApp, on_both_databases, spawn_app, spawn_app_with};
use relay::store::{AdminChange, UserPatch};

/// Registers `email`, makes them an admin in the database, logs in: the access token.
pub async fn admin_token(app: &TestApp, email: &str) -> String {
    app.register(email, "password-123").await;
    let user = app.stored_user(email).await;
    let patch = UserPatch {
        is_admin: Some(true),
        ..UserPatch::default()
    };
    assert!(matches!(
        app.store.update_user(user.id, &patch).await.unwrap(),
        AdminChange::Done(_)
    ));
    let resp = app.login(email, "password-123").await;
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut request = app.client.request(method, app.api(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

async fn patch(app: &TestApp, token: &str, id: &str, body: Value) -> reqwest::Response {
    send(
        app,
        reqwest::Method::PATCH,
        &format!("/admin/users/{id}"),
        token,
        Some(body),
    )
    .await
}

/// Polls `check` every 100 ms until it holds; panics after `limit`. Returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hello() -> Value {
    json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]})
}

on_both_databases!(
    paging_returns_every_user_exactly_once,
    patch_changes_take_effect_within_seconds,
    the_last_active_admin_cannot_remove_themself,
    revoke_ends_every_session_and_key,
    the_cli_lists_sets_and_revokes,
    concurrent_patches_of_different_fields_both_stick,
);

#[tokio::test]
async fn a_non_admin_gets_403_on_every_admin_route() {
    let app = spawn_app(Db::Sqlite).await;
    let (token, _) = app.user_tokens("plain@example.com").await;
    let admin = admin_token(&app, "boss@example.com").await;
    let id = app.stored_user("plain@example.com").await.id.to_string();
    let key: Value = app
        .post_json_authed("/auth/api-keys", &admin, &json!({"name": "ci"}))
        .await
        .json()
        .await
        .unwrap();
    let admin_key = key["key"].as_str().unwrap().to_owned();
    let routes = [
        (reqwest::Method::GET, "/admin/users".to_owned(), None),
        (reqwest::Method::GET, format!("/admin/users/{id}"), None),
        (
            reqwest::Method::PATCH,
            format!("/admin/users/{id}"),
            Some(json!({"is_active": false})),
        ),
        (
            reqwest::Method::POST,
            format!("/admin/users/{id}/revoke"),
            None,
        ),
        (reqwest::Method::DELETE, format!("/admin/users/{id}"), None),
        (
            reqwest::Method::GET,
            "/admin/usage?group_by=user".to_owned(),
            None,
        ),
    ];
    for (method, path, body) in &routes {
        let resp = send(&app, method.clone(), path, &token, body.clone()).await;
        assert_eq!(resp.status(), 403, "{method} {path}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "admin_only", "{method} {path}");
        // Not even an admin's API key: admin routes take an access token.
        let resp = send(&app, method.clone(), path, &admin_key, body.clone()).await;
        assert_eq!(resp.status(), 403, "{method} {path} with a key");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "api_key_not_allowed");
        let resp = app
            .client
            .request(method.clone(), app.api(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{method} {path} without a token");
    }
    // Nothing was changed by any of them.
    let user = app.stored_user("plain@example.com").await;
    assert!(user.is_active);
    assert_eq!(app.get_authed("/auth/me", &token).await.status(), 200);
    // The admin can; the answers are not cached anywhere.
    let resp = app.get_authed("/admin/users", &admin).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
}

#[tokio::test]
async fn admin_rights_follow_the_user_not_the_token() {
    let app = spawn_app(Db::Sqlite).await;
    // A token issued before the user was made an admin works once they are one…
    let (token, _) = app.user_tokens("rising@example.com").await;
    assert_eq!(app.get_authed("/admin/users", &token).await.status(), 403);
    let other = admin_token(&app, "first@example.com").await;
    let id = app.stored_user("rising@example.com").await.id.to_string();
    assert_eq!(
        patch(&app, &other, &id, json!({"is_admin": true}))
            .await
            .status(),
        200
    );
    assert_eq!(app.get_authed("/admin/users", &token).await.status(), 200);
    // …and a token issued while they were one stops working on admin routes once demoted.
    assert_eq!(
        patch(&app, &other, &id, json!({"is_admin": false}))
            .await
            .status(),
        200
    );
    assert_eq!(app.get_authed("/admin/users", &token).await.status(), 403);
}

async fn paging_returns_every_user_exactly_once(db: Db) {
    let app = spawn_app(db).await;
    let admin = admin_token(&app, "pager@example.com").await;
    let mut expected: HashSet<String> = HashSet::new();
    let registrations = (0..22).map(|i| {
        let app = &app;
        async move {
            app.register(&format!("Page-{i:02}@Example.com"), "password-123")
                .await
        }
    });
    for user in futures_util::future::join_all(registrations).await {
        expected.insert(user["id"].as_str().unwrap().to_owned());
    }
    expected.insert(app.stored_user("pager@example.com").await.id.to_string());
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            None => "/admin/users?limit=5".to_owned(),
            Some(id) => format!("/admin/users?limit=5&after={id}"),
        };
        let resp = app.get_authed(&path, &admin).await;
        assert_eq!(resp.status(), 200);
        let page: Value = resp.json().await.unwrap();
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= 5);
        for user in data {
            assert!(user.get("password_hash").is_none());
            assert!(user.get("token_limit").is_some());
            seen.push(user["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        if page["has_more"] == false {
            break;
        }
        after = Some(seen.last().unwrap().clone());
        assert!(pages < 10);
    }
    assert_eq!(pages, 5, "23 users, 5 a page");
    assert_eq!(seen.len(), expected.len(), "no user twice");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), expected);
    // Search, any case, by part of the email; `%` and `_` are plain characters.
    let found: Value = app
        .get_authed("/admin/users?q=PAGE-1&limit=200", &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(found["data"].as_array().unwrap().len(), 10, "{found}");
    let none: Value = app
        .get_authed("/admin/users?q=%25", &admin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none["data"].as_array().unwrap().len(), 0, "{none}");
    for bad in ["limit=0", "limit=201", "after=nope", "sort=email"] {
        let resp = app.get_authed(&format!("/admin/users?{bad}"), &admin).await;
        assert_eq!(resp.status(), 422, "{bad}");
    }
}

async fn patch_changes_take_effect_within_seconds(db: Db) {
    let app = spawn_app_with(db, &[("TOKEN_LIMIT", "0")]).await;
    let admin = admin_token(&app, "patcher@example.com").await;
    let (token, _) = app.user_tokens("worker@example.com").await;
    let id = app.stored_user("worker@example.com").await.id.to_string();
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);

    let resp = patch(&app, &admin, &id, json!({"is_active": false})).await;
    assert_eq!(resp.status(), 200);
    let user: Value = resp.json().await.unwrap();
    assert_eq!(user["is_active"], false);
    // The relay that made the change refuses at once; another would within its cache's 3 s.
    let resp = app.chat(&token, &hello()).await;
    assert_eq!(resp.status(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "user_inactive");
    assert_eq!(
        app.login("worker@example.com", "password-123")
            .await
            .status(),
        403
    );

    assert_eq!(
        patch(&app, &admin, &id, json!({"is_active": true}))
            .await
            .status(),
        200
    );
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);

    // A token limit of the user's own: the headers show it.
    let resp = patch(
        &app,
        &admin,
        &id,
        json!({"token_limit": 50000, "token_limit_window": 3600, "full_name": "  Worker  "}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let user: Value = resp.json().await.unwrap();
    assert_eq!(
        (
            &user["token_limit"],
            &user["token_limit_window"],
            &user["full_name"]
        ),
        (&json!(50000), &json!(3600), &json!("Worker"))
    );
    let resp = app.chat(&token, &hello()).await;
    assert_eq!(resp.headers()["x-ratelimit-limit-tokens"], "50000");
    // null returns to the default (none here); the name too.
    let user: Value = patch(
        &app,
        &admin,
        &id,
        json!({"token_limit": null, "token_limit_window": null, "full_name": null}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(
        user["token_limit"].is_null() && user["full_name"].is_null(),
        "{user}"
    );
    let resp = app.chat(&token, &hello()).await;
    assert!(resp.headers().get("x-ratelimit-limit-tokens").is_none());

    for (body, param) in [
        (json!({"token_limit": 0}), "token_limit"),
        (json!({"token_limit_window": -5}), "token_limit_window"),
        (json!({"token_limit": 9_000_000_000_000i64}), "token_limit"),
        (json!({"is_active": "yes"}), "is_active"),
        (json!({"email": "new@example.com"}), "email"),
        (json!({"full_name": "x".repeat(201)}), "full_name"),
    ] {
        let resp = patch(&app, &admin, &id, body.clone()).await;
        assert_eq!(resp.status(), 422, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{body}: {err}");
    }
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/admin/users/{unknown}"),
        "/admin/users/nope".to_owned(),
    ] {
        assert_eq!(app.get_authed(&path, &admin).await.status(), 404, "{path}");
    }
    assert_eq!(
        patch(
            &app,
            &admin,
            &unknown.to_string(),
            json!({"is_active": false})
        )
        .await
        .status(),
        404
    );
}

async fn the_last_active_admin_cannot_remove_themself(db: Db) {
    let app = spawn_app(db).await;
    let admin = admin_token(&app, "only@example.com").await;
    let me = app.stored_user("only@example.com").await.id.to_string();
    for body in [
        json!({"is_admin": false}),
        json!({"is_active": false}),
        json!({"is_active": false, "is_admin": true}),
    ] {
        let resp = patch(&app, &admin, &me, body.clone()).await;
        assert_eq!(resp.status(), 403, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], "last_admin");
    }
    let resp = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/admin/users/{me}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(resp.status(), 403);
    assert!(app.stored_user("only@example.com").await.is_admin);
    // A name change is fine.
    assert_eq!(
        patch(&app, &admin, &me, json!({"full_name": "Only"}))
            .await
            .status(),
        200
    );
    // With a second admin, stepping down works; then the first is no admin any more.
    let second = admin_token(&app, "second@example.com").await;
    assert_eq!(
        patch(&app, &admin, &me, json!({"is_admin": false}))
            .await
            .status(),
        200
    );
    assert_eq!(app.get_authed("/admin/users", &admin).await.status(), 403);
    // And the second, now alone, is held the same way.
    let second_id = app.stored_user("second@example.com").await.id.to_string();
    let resp = patch(&app, &second, &second_id, json!({"is_admin": false})).await;
    assert_eq!(resp.status(), 403);
    // Deleting someone else works and is final.
    let resp = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/admin/users/{me}"),
        &second,
        None,
    )
    .await;
    assert_eq!(resp.status(), 204);
    assert_eq!(app.get_authed("/auth/me", &admin).await.status(), 401);
    assert_eq!(
        app.login("only@example.com", "password-123").await.status(),
        401
    );
}

async fn revoke_ends_every_session_and_key(db: Db) {
    let app = spawn_app(db).await;
    let admin = admin_token(&app, "revoker@example.com").await;
    let (token, refresh) = app.user_tokens("leaky@example.com").await;
    let id = app.stored_user("leaky@example.com").await.id.to_string();
    let key: Value = app
        .post_json_authed("/auth/api-keys", &token, &json!({"name": "server"}))
        .await
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    assert_eq!(app.chat(&key, &hello()).await.status(), 200);
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);

    let resp = send(
        &app,
        reqwest::Method::POST,
        &format!("/admin/users/{id}/revoke"),
        &admin,
        None,
    )
    .await;
    assert_eq!(resp.status(), 204);
    let resp = app.chat(&token, &hello()).await;
    assert_eq!(resp.status(), 401);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "token_revoked");
    assert_eq!(app.chat(&key, &hello()).await.status(), 401);
    assert_eq!(app.refresh(&refresh).await.status(), 401);
    // The account itself is fine: a new login (a second later: tokens carry whole seconds,
    // and one issued in the second of the revocation counts as revoked) works.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = app.login("leaky@example.com", "password-123").await;
    let body: Value = resp.json().await.unwrap();
    let fresh = body["access_token"].as_str().unwrap();
    assert_eq!(app.chat(fresh, &hello()).await.status(), 200);
    let unknown = uuid::Uuid::new_v4();
    let resp = send(
        &app,
        reqwest::Method::POST,
        &format!("/admin/users/{unknown}/revoke"),
        &admin,
        None,
    )
    .await;
    assert_eq!(resp.status(), 404);
}

async fn the_cli_lists_sets_and_revokes(db: Db) {
    let app = spawn_app(db).await;
    let (token, _) = app.user_tokens("cli-a@example.com").await;
    app.register("cli-b@example.com", "password-123").await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = support::relay_command(dir.path(), args, &[("DATABASE_URL", &app.db.url)])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = run(&["user", "list"]);
    assert!(ok, "{err}");
    let emails: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["email"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(emails.len(), 2, "{out}");
    let (ok, out, _) = run(&["user", "list", "--query", "CLI-B"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1);
    assert!(out.contains("cli-b@example.com"));

    let (ok, out, err) = run(&[
        "user",
        "set",
        "--email",
        "cli-a@example.com",
        "--active",
        "false",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap()["is_active"],
        false
    );
    within(
        Duration::from_secs(5),
        "deactivated from the CLI",
        || async { app.chat(&token, &hello()).await.status() == 403 },
    )
    .await;
    let (ok, ..) = run(&[
        "user",
        "set",
        "--email",
        "cli-a@example.com",
        "--active",
        "true",
    ]);
    assert!(ok);
    within(Duration::from_secs(5), "reactivated", || async {
        app.chat(&token, &hello()).await.status() == 200
    })
    .await;
    let (ok, _, err) = run(&["user", "revoke", "--email", "cli-a@example.com"]);
    assert!(ok, "{err}");
    within(Duration::from_secs(5), "revoked from the CLI", || async {
        app.chat(&token, &hello()).await.status() == 401
    })
    .await;
    let (ok, _, err) = run(&["user", "revoke", "--email", "nobody@example.com"]);
    assert!(!ok && err.contains("no user"), "{err}");
    // The last active admin is held here too.
    let (ok, ..) = run(&[
        "user",
        "set",
        "--email",
        "cli-b@example.com",
        "--admin",
        "true",
    ]);
    assert!(ok);
    let (ok, _, err) = run(&[
        "user",
        "set",
        "--email",
        "cli-b@example.com",
        "--admin",
        "false",
    ]);
    assert!(!ok && err.contains("no active admin"), "{err}");
}

#[tokio::test]
async fn closed_registration_refuses_but_the_cli_still_creates() {
    let app = spawn_app_with(Db::Sqlite, &[("REGISTRATION", "closed")]).await;
    let creds = json!({"email": "walkin@example.com", "password": "password-123"});
    let resp = app.post_json("/auth/register", &creds).await;
    assert_eq!(resp.status(), 403);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "registration_closed");
    assert!(err["error"]["message"].as_str().unwrap().contains("closed"));
    assert!(
        app.store
            .user_by_email("walkin@example.com")
            .await
            .unwrap()
            .is_none()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = support::relay_user_create(
        dir.path(),
        "invited@example.com",
        "password-123",
        false,
        &[("DATABASE_URL", &app.db.url), ("REGISTRATION", "closed")],
    );
    assert!(out.status.success());
    assert_eq!(
        app.login("invited@example.com", "password-123")
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn registration_email_domains_are_matched_exactly_in_any_case() {
    let app = spawn_app_with(
        Db::Sqlite,
        &[(
            "REGISTRATION_EMAIL_DOMAINS",
            "example.com, Team.Example.org",
        )],
    )
    .await;
    for (email, status) in [
        ("User@Example.COM", 201),
        ("ann@team.example.org", 201),
        ("bob@sub.example.com", 403),
        ("eve@example.com.evil.net", 403),
        ("eve@evilexample.com", 403),
        ("eve@example.org", 403),
        ("eve@example.com@evil.net", 403),
    ] {
        let creds = json!({"email": email, "password": "password-123"});
        let resp = app.post_json("/auth/register", &creds).await;
        assert_eq!(resp.status(), status, "{email}");
        if status == 403 {
            let err: Value = resp.json().await.unwrap();
            assert_eq!(err["error"]["code"], "email_domain_not_allowed");
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("example.com")
            );
        }
    }
    assert!(
        app.store
            .user_by_email("user@example.com")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn admin_usage_groups_by_user_and_filters_one() {
    let app = spawn_app(Db::Sqlite).await;
    let admin = admin_token(&app, "auditor@example.com").await;
    let (a, _) = app.user_tokens("spender-a@example.com").await;
    let (b, _) = app.user_tokens("spender-b@example.com").await;
    for _ in 0..2 {
        assert_eq!(app.chat(&a, &hello()).await.status(), 200);
    }
    assert_eq!(app.chat(&b, &hello()).await.status(), 200);
    let a_id = app
        .stored_user("spender-a@example.com")
        .await
        .id
        .to_string();
    let b_id = app
        .stored_user("spender-b@example.com")
        .await
        .id
        .to_string();
    let start = Instant::now();
    let report: Value = loop {
        let report: Value = app
            .get_authed("/admin/usage?group_by=user", &admin)
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
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{report}");
    assert_eq!(groups[0]["key"], a_id, "the largest first: {report}");
    assert_eq!(groups[0]["requests"], 2);
    assert_eq!(groups[1]["key"], b_id);
    let one: Value = app
        .get_authed(
            &format!("/admin/usage?user_id={b_id}&group_by=model"),
            &admin,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["total"]["requests"], 1, "{one}");
    assert_eq!(one["groups"][0]["key"], "mock-echo");
    // A user's own /usage never takes another's id.
    let resp = app.get_authed(&format!("/usage?user_id={b_id}"), &a).await;
    assert_eq!(resp.status(), 422);
    let resp = app.get_authed("/usage?group_by=user", &a).await;
    assert_eq!(resp.status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivation_and_key_deletion_bite_on_a_second_relay_process_within_5_s() {
    // Two processes sharing PostgreSQL and Redis, as replicas do.
    let base = support::spawn_mock(Default::default()).await;
    let db = support::TestDb::new(Db::Postgres).await;
    let prefix = format!("admin-{}", uuid::Uuid::new_v4().simple());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vars = [
        ("SECRET_KEY", support::SECRET),
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_BASE_URL", base.as_str()),
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("RATE_LIMIT_KEY_PREFIX", prefix.as_str()),
    ];
    let a = support::RelayProcess::start(dir_a.path(), &["serve"], &vars);
    let b = support::RelayProcess::start(dir_b.path(), &["serve"], &vars);
    let client = reqwest::Client::new();
    let admin_token = {
        let out = support::relay_user_create(
            dir_a.path(),
            "root@example.com",
            "password-123",
            true,
            &vars,
        );
        assert!(out.status.success());
        let pair: Value = client
            .post(format!("{}/api/v1/auth/login", a.base))
            .json(&json!({"email": "root@example.com", "password": "password-123"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pair["access_token"].as_str().unwrap().to_owned()
    };
    let token = a.access_token(&client, "remote@example.com").await;
    let key: Value = client
        .post(format!("{}/api/v1/auth/api-keys", a.base))
        .bearer_auth(&token)
        .json(&json!({"name": "replica test"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key_id, key) = (
        key["id"].as_str().unwrap().to_owned(),
        key["key"].as_str().unwrap().to_owned(),
    );
    let chat_on_b = |credential: String| {
        let request = client
            .post(format!("{}/api/v1/chat/completions", b.base))
            .bearer_auth(credential)
            .json(&hello());
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(chat_on_b(token.clone()).await, 200);
    assert_eq!(chat_on_b(key.clone()).await, 200);

    // The key is deleted on A: B refuses it within 5 s.
    let resp = client
        .delete(format!("{}/api/v1/auth/api-keys/{key_id}", a.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let took = within(Duration::from_secs(5), "key refused on B", || {
        let status = chat_on_b(key.clone());
        async move { status.await == 401 }
    })
    .await;
    eprintln!("key refused on the other replica after {took:?}");

    // The user is deactivated on A: B refuses their token within 5 s.
    let user: Value = client
        .get(format!("{}/api/v1/auth/me", a.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let resp = client
        .patch(format!(
            "{}/api/v1/admin/users/{}",
            a.base,
            user["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin_token)
        .json(&json!({"is_active": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let took = within(
        Duration::from_secs(5),
        "deactivated user refused on B",
        || {
            let status = chat_on_b(token.clone());
            async move { status.await == 403 }
        },
    )
    .await;
    eprintln!("deactivation seen by the other replica after {took:?}");
}

async fn concurrent_patches_of_different_fields_both_stick(db: Db) {
    let app = spawn_app(db).await;
    let admin = admin_token(&app, "racer@example.com").await;
    app.register("target@example.com", "password-123").await;
    let id = app.stored_user("target@example.com").await.id.to_string();
    for round in 0..15 {
        let name = format!("name {round}");
        let limit = 1000 + round;
        let (a, b) = tokio::join!(
            patch(&app, &admin, &id, json!({"full_name": name})),
            patch(&app, &admin, &id, json!({"token_limit": limit})),
        );
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
        let user = app.stored_user("target@example.com").await;
        assert_eq!(
            (user.full_name.as_deref(), user.token_limit),
            (Some(name.as_str()), Some(i64::from(limit))),
            "round {round}: one change overwrote the other"
        );
    }
}
