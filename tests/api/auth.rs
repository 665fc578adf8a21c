//! The authentication story over real HTTP, on SQLite and on PostgreSQL.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relay::store::{NewUser, Store};
use serde_json::{Value, json};

use crate::support::{Db, SECRET, TestApp, TestDb, on_both_databases, spawn_app, spawn_app_on};

on_both_databases!(
    register_returns_the_user,
    duplicate_email_in_any_case_is_409,
    concurrent_registrations_of_one_email_give_one_201,
    registration_is_validated,
    login_with_json_and_with_the_oauth2_form,
    wrong_password_and_unknown_email_look_the_same,
    me_needs_a_valid_access_token,
    refresh_rotates_and_detects_reuse,
    token_kinds_cannot_be_swapped,
    logout_revokes_the_refresh_token,
    bad_tokens_are_401_with_www_authenticate,
    passlib_bcrypt_hash_logs_in_and_is_rehashed,
    inactive_users_are_refused,
    deactivated_and_deleted_users_lose_access_within_seconds,
    database_down_is_503,
    expired_refresh_tokens_are_purged,
    purge_removes_families_left_without_tokens,
    concurrent_refreshes_of_one_token_leave_no_token_alive,
    revocations_racing_a_refresh_leave_no_token_alive,
    upgrade_kills_tokens_that_slipped_into_revoked_families,
);

/// A user with a live session and a second, expired refresh token in a family of its own;
/// returns the live refresh token.
async fn live_and_expired_tokens(app: &TestApp, email: &str) -> String {
    let (_, live) = app.user_tokens(email).await;
    let user = app.stored_user(email).await;
    app.store
        .insert_refresh_token(relay::store::NewRefreshToken {
            id: uuid::Uuid::new_v4(),
            user_id: user.id,
            family_id: uuid::Uuid::new_v4(),
            token_hash: format!("{:064x}", user.id.as_u128()),
            expires_at: chrono::Utc::now() - chrono::Duration::hours(1),
        })
        .await
        .unwrap();
    live
}

async fn expired_refresh_tokens_are_purged(db: Db) {
    let app = spawn_app(db).await;
    let live = live_and_expired_tokens(&app, "purge@example.com").await;
    let purged = app.store.purge_expired_tokens(chrono::Utc::now()).await;
    assert_eq!(purged.unwrap(), 1);
    assert_eq!(app.refresh(&live).await.status(), 200, "live tokens stay");
}

/// One number from `sql` (a `SELECT COUNT(*)`), read straight from the database.
async fn count(store: &Store, sql: &str) -> i64 {
    match store {
        Store::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Store::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

async fn purge_removes_families_left_without_tokens(db: Db) {
    let app = spawn_app(db).await;
    let live = live_and_expired_tokens(&app, "purge-families@example.com").await;
    let families = "SELECT COUNT(*) FROM refresh_families";
    assert_eq!(count(&app.store, families).await, 2);
    let purged = app.store.purge_expired_tokens(chrono::Utc::now()).await;
    assert_eq!(purged.unwrap(), 1);
    assert_eq!(
        count(&app.store, families).await,
        1,
        "the emptied family is gone"
    );
    assert_eq!(app.refresh(&live).await.status(), 200, "live sessions stay");
}

/// The refresh token of a fresh login of `email` (password `password-123`), with its access
/// token: `(access, refresh)`.
async fn login_pair(app: &TestApp, email: &str) -> (String, String) {
    let resp = app.login(email, "password-123").await;
    assert_eq!(resp.status(), 200);
    let pair: Value = resp.json().await.unwrap();
    let token = |name: &str| pair[name].as_str().unwrap().to_owned();
    (token("access_token"), token("refresh_token"))
}

/// The refresh token a `/auth/refresh` answer carries, if it was a 200; anything else must be
/// a 401.
async fn issued_refresh_token(resp: reqwest::Response) -> Option<String> {
    let status = resp.status();
    if status == 200 {
        let pair: Value = resp.json().await.unwrap();
        return Some(pair["refresh_token"].as_str().unwrap().to_owned());
    }
    assert_eq!(status, 401, "{:?}", resp.text().await);
    None
}

/// Which of `tokens` `/auth/refresh` still accepts, as "token i gave STATUS" (checked in order;
/// a token that is accepted is spent by the check).
async fn still_working(app: &TestApp, tokens: &[String]) -> Vec<String> {
    let mut working = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let status = app.refresh(token).await.status();
        if status != 401 {
            working.push(format!("token {i} gave {status}"));
        }
    }
    working
}

/// Two to five refreshes of one token at once: one wins, the others are replays that revoke the
/// family, and that must include the token the winner was just given. A hundred rounds, because
/// whether the interleaving that let the winner's token survive (its successor stored after the
/// revocation) happens at all depends on timing.
async fn concurrent_refreshes_of_one_token_leave_no_token_alive(db: Db) {
    const ROUNDS: usize = 100;
    let app = spawn_app(db).await;
    let email = "racer@example.com";
    app.register(email, "password-123").await;
    let mut leaked = Vec::new();
    for round in 0..ROUNDS {
        let racers = 2 + round % 4;
        let (_, original) = login_pair(&app, email).await;
        let answers =
            futures_util::future::join_all((0..racers).map(|_| app.refresh(&original))).await;
        let mut family = Vec::new();
        for answer in answers {
            family.extend(issued_refresh_token(answer).await);
        }
        assert_eq!(
            family.len(),
            1,
            "round {round}: exactly one of {racers} racers wins"
        );
        // The original last: replaying it revokes the family again, which would hide a leak.
        family.push(original);
        let working = still_working(&app, &family).await;
        if !working.is_empty() {
            leaked.push((round, racers, working));
        }
    }
    assert!(
        leaked.is_empty(),
        "{} of {ROUNDS} rounds left a token of the family working: {leaked:#?}",
        leaked.len()
    );
}

/// A revocation of a family (a replay of its spent token, or a logout) racing a refresh of its
/// newest token: whichever order they take, no token of the family works afterwards.
async fn revocations_racing_a_refresh_leave_no_token_alive(db: Db) {
    const ROUNDS: usize = 50;
    let app = spawn_app(db).await;
    let email = "revoker@example.com";
    app.register(email, "password-123").await;
    let mut leaked = Vec::new();
    for round in 0..ROUNDS {
        let (access, first) = login_pair(&app, email).await;
        let second = issued_refresh_token(app.refresh(&first).await)
            .await
            .unwrap();
        let replay = round % 2 == 0;
        let revoke = async {
            if replay {
                let (status, err) = error_of(app.refresh(&first).await).await;
                assert_eq!((status, err["code"].as_str()), (401, Some("token_reused")));
            } else {
                assert_eq!(logout(&app, &access, &second).await.status(), 204);
            }
        };
        let ((), rotated) = futures_util::future::join(revoke, app.refresh(&second)).await;
        // The new token first and the replayable one last: replaying revokes the family again,
        // which would hide a leak.
        let mut family: Vec<String> = issued_refresh_token(rotated).await.into_iter().collect();
        family.extend([second, first]);
        let working = still_working(&app, &family).await;
        if !working.is_empty() {
            leaked.push((round, if replay { "replay" } else { "logout" }, working));
        }
    }
    assert!(
        leaked.is_empty(),
        "{} of {ROUNDS} rounds left a token of the family working: {leaked:#?}",
        leaked.len()
    );
}

/// A database from before refresh families, holding a token that a refresh race left live in a
/// revoked family: after the upgrade that token is dead, and a sound session still works.
async fn upgrade_kills_tokens_that_slipped_into_revoked_families(db: Db) {
    let test_db = std::sync::Arc::new(TestDb::new(db).await);
    let engine = match db {
        Db::Sqlite => "sqlite",
        Db::Postgres => "postgres",
    };
    // The first migration alone is the schema before families.
    let first = "20261127000001_users_and_refresh_tokens.sql";
    let old_schema = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(engine)
            .join(first),
        old_schema.path().join(first),
    )
    .unwrap();
    let migrator = sqlx::migrate::Migrator::new(old_schema.path())
        .await
        .unwrap();
    let database = relay::config::Database::from_url(&test_db.url).unwrap();
    let store = Store::connect(&database).await.unwrap();
    match &store {
        Store::Sqlite(pool) => migrator.run(pool).await.unwrap(),
        Store::Postgres(pool) => migrator.run(pool).await.unwrap(),
    }
    // The user as the old schema holds it (today's columns are not there yet).
    let user_id = uuid::Uuid::new_v4();
    let now = chrono::Utc::now();
    let sql = "INSERT INTO users (id, email, password_hash, full_name, is_active, is_admin, \
               created_at, updated_at) VALUES ($1, 'old-session@example.com', 'unused', NULL, \
               TRUE, FALSE, $2, $2)";
    match &store {
        Store::Sqlite(pool) => {
            sqlx::query(sql)
                .bind(user_id)
                .bind(now)
                .execute(pool)
                .await
                .unwrap();
        }
        Store::Postgres(pool) => {
            sqlx::query(sql)
                .bind(user_id)
                .bind(now)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    let claims = json!({"sub": user_id, "exp": now.timestamp() + 3600, "iat": now.timestamp(),
        "typ": "refresh", "iss": "relay"});
    // Each token: (family, spent, revoked), as the old code left them.
    let (sound, raced) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let rows = [
        (sound, true, false),  // spent by a refresh…
        (sound, false, false), // …whose successor is the live end of a sound session
        (raced, true, true),   // spent, then replayed: the family was revoked…
        (raced, false, false), // …but the winner's successor was stored afterwards
    ];
    let mut tokens = Vec::new();
    for (family, spent, revoked) in rows {
        let id = uuid::Uuid::new_v4();
        let mut claims = claims.clone();
        claims["jti"] = json!(id);
        let token = forge(&claims, SECRET.as_bytes());
        let sql = "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, expires_at, \
                   created_at, used_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        let used_at = spent.then_some(now);
        let revoked_at = revoked.then_some(now);
        let hash = relay::auth::jwt::token_hash(&token);
        let expires_at = now + chrono::Duration::hours(1);
        // One statement, type-checked for each engine's pool.
        macro_rules! insert_on {
            ($pool:expr) => {
                sqlx::query(sql)
                    .bind(id)
                    .bind(user_id)
                    .bind(family)
                    .bind(&hash)
                    .bind(expires_at)
                    .bind(now)
                    .bind(used_at)
                    .bind(revoked_at)
                    .execute($pool)
                    .await
                    .unwrap();
            };
        }
        match &store {
            Store::Sqlite(pool) => {
                insert_on!(pool);
            }
            Store::Postgres(pool) => {
                insert_on!(pool);
            }
        }
        tokens.push(token);
    }
    store.close().await;

    // Starting the new relay migrates the database.
    let app = spawn_app_on(test_db, &[], relay::config::Mode::Serve).await;
    assert_eq!(
        app.refresh(&tokens[3]).await.status(),
        401,
        "the slipped-in token is dead"
    );
    assert_eq!(
        app.refresh(&tokens[1]).await.status(),
        200,
        "the sound session works"
    );
    let (status, err) = error_of(app.refresh(&tokens[0]).await).await;
    assert_eq!((status, err["code"].as_str()), (401, Some("token_reused")));
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "error responses are JSON"
    );
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    (status, body["error"].clone())
}

async fn me(app: &TestApp, token: &str) -> reqwest::Response {
    app.get_authed("/auth/me", token).await
}

async fn logout(app: &TestApp, token: &str, refresh_token: &str) -> reqwest::Response {
    let body = json!({ "refresh_token": refresh_token });
    app.post_json_authed("/auth/logout", token, &body).await
}

async fn register_returns_the_user(db: Db) {
    let app = spawn_app(db).await;
    let body =
        json!({"email": "  Ann@Example.COM", "password": "password-123", "full_name": "Ann"});
    let resp = app.post_json("/auth/register", &body).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let user: Value = resp.json().await.unwrap();
    assert_eq!(user["email"], "ann@example.com");
    assert_eq!(user["full_name"], "Ann");
    assert_eq!(user["is_active"], true);
    assert_eq!(user["is_admin"], false);
    assert!(uuid::Uuid::parse_str(user["id"].as_str().unwrap()).is_ok());
    assert!(chrono::DateTime::parse_from_rfc3339(user["created_at"].as_str().unwrap()).is_ok());
    assert!(user.get("password_hash").is_none() && user.get("password").is_none());
    let stored = app.stored_user("ann@example.com").await;
    assert!(
        stored.password_hash.starts_with("$argon2id$"),
        "{}",
        stored.password_hash
    );
}

async fn duplicate_email_in_any_case_is_409(db: Db) {
    let app = spawn_app(db).await;
    app.register("bob@example.com", "password-123").await;
    for email in ["bob@example.com", "BOB@Example.com", " Bob@EXAMPLE.COM "] {
        let body = json!({"email": email, "password": "password-456"});
        let resp = app.post_json("/auth/register", &body).await;
        let (status, err) = error_of(resp).await;
        assert_eq!(status, 409, "{email}");
        assert_eq!(err["type"], "conflict_error");
    }
}

async fn concurrent_registrations_of_one_email_give_one_201(db: Db) {
    let app = spawn_app(db).await;
    let app = &app;
    let attempts = (0..8).map(|i| {
        let email = if i % 2 == 0 {
            "race@example.com"
        } else {
            "RACE@example.com"
        };
        let body = json!({"email": email, "password": "password-123"});
        async move {
            app.post_json("/auth/register", &body)
                .await
                .status()
                .as_u16()
        }
    });
    let mut statuses = futures_util::future::join_all(attempts).await;
    statuses.sort_unstable();
    assert_eq!(statuses, vec![201, 409, 409, 409, 409, 409, 409, 409]);
}

async fn registration_is_validated(db: Db) {
    let app = spawn_app(db).await;
    let cases = [
        (
            json!({"email": "not-an-email", "password": "password-123"}),
            "email",
        ),
        (
            json!({"email": "Ann <ann@example.com>", "password": "password-123"}),
            "email",
        ),
        (
            json!({"email": "a@example.com", "password": "password-123", "full_name": "a\u{0}b"}),
            "full_name",
        ),
        (
            json!({"email": "a@example.com", "password": "short"}),
            "password",
        ),
        (
            json!({"email": "a@example.com", "password": "x".repeat(129)}),
            "password",
        ),
        (json!({"email": "a@example.com"}), "password"),
        (json!({"email": 42, "password": "password-123"}), "email"),
        (
            json!({"email": "a@example.com", "password": "password-123", "full_name": "n".repeat(201)}),
            "full_name",
        ),
    ];
    for (body, param) in cases {
        let (status, err) = error_of(app.post_json("/auth/register", &body).await).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(err["param"], param, "{body}");
        assert_eq!(err["type"], "invalid_request_error");
    }
    // Broken JSON is a 400, a wrong content type a 415.
    let resp = app
        .post_raw("/auth/register", "application/json", "{\"email\": ")
        .await;
    let (status, err) = error_of(resp).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid_json")));
    let resp = app
        .post_raw("/auth/register", "text/plain", "email=a")
        .await;
    assert_eq!(error_of(resp).await.0, 415);
    // Nothing was stored by any of these.
    assert!(
        app.store
            .user_by_email("a@example.com")
            .await
            .unwrap()
            .is_none()
    );
}

async fn login_with_json_and_with_the_oauth2_form(db: Db) {
    let app = spawn_app(db).await;
    app.register("cat@example.com", "password-123").await;
    let resp = app.login("CAT@example.com", "password-123").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let pair: Value = resp.json().await.unwrap();
    assert_eq!(pair["token_type"], "bearer");
    assert_eq!(pair["expires_in"], 1800);
    assert_eq!(
        me(&app, pair["access_token"].as_str().unwrap())
            .await
            .status(),
        200
    );

    let resp = app
        .client
        .post(app.api("/auth/login"))
        .form(&[
            ("username", "cat@example.com"),
            ("password", "password-123"),
            ("grant_type", "password"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let pair: Value = resp.json().await.unwrap();
    let user: Value = me(&app, pair["access_token"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(user["email"], "cat@example.com");
}

async fn wrong_password_and_unknown_email_look_the_same(db: Db) {
    let app = spawn_app(db).await;
    app.register("dan@example.com", "password-123").await;
    let wrong = app.login("dan@example.com", "password-999").await;
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    let unknown = app.login("nobody@example.com", "password-123").await;
    assert_eq!(unknown.headers()["www-authenticate"], "Bearer");
    let (s1, e1) = error_of(wrong).await;
    let (s2, e2) = error_of(unknown).await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(e1, e2);
    assert_eq!(e1["code"], "invalid_credentials");
}

async fn me_needs_a_valid_access_token(db: Db) {
    let app = spawn_app(db).await;
    let (access, _) = app.user_tokens("eve@example.com").await;
    let user: Value = me(&app, &access).await.json().await.unwrap();
    assert_eq!(user["email"], "eve@example.com");
    let resp = app.get("/auth/me").await;
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let (status, err) = error_of(resp).await;
    assert_eq!(
        (status, err["type"].as_str()),
        (401, Some("authentication_error"))
    );
    let resp = app
        .client
        .get(app.api("/auth/me"))
        .header("authorization", format!("Basic {access}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

async fn refresh_rotates_and_detects_reuse(db: Db) {
    let app = spawn_app(db).await;
    let (_, first) = app.user_tokens("fay@example.com").await;
    let resp = app.refresh(&first).await;
    assert_eq!(resp.status(), 200);
    let second: Value = resp.json().await.unwrap();
    let second_refresh = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, first);
    assert_eq!(
        me(&app, second["access_token"].as_str().unwrap())
            .await
            .status(),
        200
    );
    let resp = app.refresh(&second_refresh).await;
    assert_eq!(resp.status(), 200);
    let third: Value = resp.json().await.unwrap();
    let third_refresh = third["refresh_token"].as_str().unwrap().to_owned();

    // Replaying a spent token is refused, and revokes its whole family…
    let (status, err) = error_of(app.refresh(&first).await).await;
    assert_eq!((status, err["code"].as_str()), (401, Some("token_reused")));
    // …including the newest descendant, which was still live.
    assert_eq!(app.refresh(&third_refresh).await.status(), 401);

    // Another session of the same user is untouched.
    let resp = app.login("fay@example.com", "password-123").await;
    let other: Value = resp.json().await.unwrap();
    let other_refresh = other["refresh_token"].as_str().unwrap();
    assert_eq!(app.refresh(other_refresh).await.status(), 200);
}

async fn token_kinds_cannot_be_swapped(db: Db) {
    let app = spawn_app(db).await;
    let (access, refresh_token) = app.user_tokens("gus@example.com").await;
    let resp = me(&app, &refresh_token).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    assert_eq!(app.refresh(&access).await.status(), 401);
    // The refresh token was not spent by those attempts.
    assert_eq!(app.refresh(&refresh_token).await.status(), 200);
}

async fn logout_revokes_the_refresh_token(db: Db) {
    let app = spawn_app(db).await;
    let (access, refresh_token) = app.user_tokens("hal@example.com").await;
    let (_, other_refresh) = {
        let resp = app.login("hal@example.com", "password-123").await;
        let v: Value = resp.json().await.unwrap();
        ((), v["refresh_token"].as_str().unwrap().to_owned())
    };
    // Needs a Bearer token.
    let body = json!({ "refresh_token": refresh_token });
    let resp = app.post_json("/auth/logout", &body).await;
    assert_eq!(resp.status(), 401);
    // Another user cannot log this session out.
    let (intruder, _) = app.user_tokens("ivy@example.com").await;
    let resp = logout(&app, &intruder, &refresh_token).await;
    assert_eq!(resp.status(), 401);

    let resp = logout(&app, &access, &refresh_token).await;
    assert_eq!(resp.status(), 204);
    let (status, err) = error_of(app.refresh(&refresh_token).await).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (401, Some("invalid_token")),
        "logged out, not reused"
    );
    // Only that session ended.
    assert_eq!(app.refresh(&other_refresh).await.status(), 200);
}

fn forge(claims: &Value, key: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

async fn bad_tokens_are_401_with_www_authenticate(db: Db) {
    let app = spawn_app(db).await;
    let user = app.register("ike@example.com", "password-123").await;
    let sub = user["id"].as_str().unwrap();
    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64, typ: &str| json!({"sub": sub, "exp": exp, "iat": now - 10, "jti": uuid::Uuid::new_v4(), "typ": typ, "iss": "relay"});
    // A forged token with the right key and claims works: the cases below differ in one thing.
    let good = forge(&claims(now + 600, "access"), SECRET.as_bytes());
    assert_eq!(me(&app, &good).await.status(), 200);

    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let mut payload: Value = serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
    payload["adm"] = json!(true);
    parts[1] = b64.encode(payload.to_string());
    let tampered = parts.join(".");
    let alg_none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        good.split('.').nth(1).unwrap()
    );
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims(now + 600, "access"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let cases = [
        (
            "expired",
            forge(&claims(now - 3600, "access"), SECRET.as_bytes()),
        ),
        ("tampered", tampered),
        (
            "other key",
            forge(
                &claims(now + 600, "access"),
                b"some-other-key-some-other-key-0123",
            ),
        ),
        ("alg none", alg_none),
        ("alg HS512", hs512),
        (
            "wrong typ",
            forge(&claims(now + 600, "refresh"), SECRET.as_bytes()),
        ),
        (
            "no iss",
            forge(
                &json!({"sub": sub, "exp": now + 600, "iat": now, "jti": uuid::Uuid::new_v4(), "typ": "access"}),
                SECRET.as_bytes(),
            ),
        ),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (name, token) in cases {
        let resp = me(&app, &token).await;
        assert_eq!(resp.status(), 401, "{name}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer", "{name}");
        let (_, err) = error_of(resp).await;
        assert_eq!(err["type"], "authentication_error", "{name}");
    }
}

async fn passlib_bcrypt_hash_logs_in_and_is_rehashed(db: Db) {
    let app = spawn_app(db).await;
    let hash = include_str!("../fixtures/passlib_bcrypt.txt")
        .trim()
        .to_owned();
    assert!(hash.starts_with("$2b$12$"));
    app.store
        .create_user(NewUser {
            email: "old@example.com".into(),
            password_hash: hash.clone(),
            full_name: None,
            is_admin: false,
        })
        .await
        .unwrap();
    let login = |password| app.login("old@example.com", password);
    assert_eq!(login("legacy-password-2").await.status(), 401);
    let stored = app.stored_user("old@example.com").await;
    assert_eq!(stored.password_hash, hash, "a failed login changes nothing");

    assert_eq!(login("legacy-password-1").await.status(), 200);
    let stored = app.stored_user("old@example.com").await;
    assert!(
        stored.password_hash.starts_with("$argon2id$"),
        "{}",
        stored.password_hash
    );
    assert_eq!(login("legacy-password-1").await.status(), 200);
    assert_eq!(login("legacy-password-2").await.status(), 401);
}

async fn inactive_users_are_refused(db: Db) {
    let app = spawn_app(db).await;
    let (access, refresh_token) = app.user_tokens("jon@example.com").await;
    let user = app.stored_user("jon@example.com").await;
    app.store.set_active(user.id, false).await.unwrap();
    let (status, err) = error_of(app.login("jon@example.com", "password-123").await).await;
    assert_eq!(
        (status, err["type"].as_str()),
        (403, Some("permission_error"))
    );
    assert_eq!(me(&app, &access).await.status(), 403);
    assert_eq!(app.refresh(&refresh_token).await.status(), 403);
}

/// Polls `request` until it answers `want`, for at most 5 s; returns how long that took.
async fn within_five_seconds<F, Fut>(want: u16, request: F) -> std::time::Duration
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = reqwest::Response>,
{
    let start = std::time::Instant::now();
    loop {
        let status = request().await.status().as_u16();
        if status == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "still {status} after 5 s, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn deactivated_and_deleted_users_lose_access_within_seconds(db: Db) {
    let app = spawn_app(db).await;
    let chat = json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]});
    // Deactivated: chat and models refused (403), with the access token still unexpired.
    let (access, _) = app.user_tokens("gone-quiet@example.com").await;
    assert_eq!(app.chat(&access, &chat).await.status(), 200);
    assert_eq!(app.models(&access).await.status(), 200);
    let user = app.stored_user("gone-quiet@example.com").await;
    app.store.set_active(user.id, false).await.unwrap();
    within_five_seconds(403, || app.chat(&access, &chat)).await;
    assert_eq!(app.models(&access).await.status(), 403);
    // Active again: let in again.
    app.store.set_active(user.id, true).await.unwrap();
    within_five_seconds(200, || app.chat(&access, &chat)).await;

    // Deleted: 401, the token's user no longer exists.
    let (access, _) = app.user_tokens("gone@example.com").await;
    assert_eq!(app.chat(&access, &chat).await.status(), 200);
    let user = app.stored_user("gone@example.com").await;
    let delete = "DELETE FROM users WHERE id = $1";
    match &app.store {
        relay::store::Store::Sqlite(pool) => {
            sqlx::query(delete)
                .bind(user.id)
                .execute(pool)
                .await
                .unwrap();
        }
        relay::store::Store::Postgres(pool) => {
            sqlx::query(delete)
                .bind(user.id)
                .execute(pool)
                .await
                .unwrap();
        }
    }
    within_five_seconds(401, || app.chat(&access, &chat)).await;
    assert_eq!(app.models(&access).await.status(), 401);
}

async fn database_down_is_503(db: Db) {
    let app = spawn_app(db).await;
    app.register("kim@example.com", "password-123").await;
    app.store.close().await;
    let (status, err) = error_of(app.login("kim@example.com", "password-123").await).await;
    assert_eq!((status, err["type"].as_str()), (503, Some("server_error")));
    let (status, health) = app.health_detailed().await;
    assert_eq!(status, 503);
    assert_eq!(health["status"], "down");
    assert_eq!(health["checks"]["database"]["status"], "down");
    // Liveness touches no dependency.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_take_the_same_time_whatever_the_hash() {
    // Wrong passwords for an unknown email, an argon2 account and a legacy bcrypt account
    // (several times slower to verify) must not be told apart by their answer time.
    let app = spawn_app(Db::Sqlite).await;
    app.register("argon@example.com", "password-123").await;
    app.store
        .create_user(NewUser {
            email: "bcrypt@example.com".into(),
            password_hash: include_str!("../fixtures/passlib_bcrypt.txt")
                .trim()
                .to_owned(),
            full_name: None,
            is_admin: false,
        })
        .await
        .unwrap();
    let kinds = [
        "nobody@example.com",
        "argon@example.com",
        "bcrypt@example.com",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for _ in 0..5 {
        for (i, email) in kinds.iter().enumerate() {
            let start = std::time::Instant::now();
            let resp = app.login(email, "wrong-password").await;
            times[i].push(start.elapsed().as_secs_f64());
            assert_eq!(resp.status(), 401, "{email}");
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    let (low, high) = (
        medians.iter().copied().fold(f64::MAX, f64::min),
        medians.iter().copied().fold(0.0, f64::max),
    );
    assert!(
        high <= low * 1.10,
        "failed-login medians differ by more than 10 %: {kinds:?} {medians:?}"
    );
}

#[tokio::test]
async fn overlong_login_passwords_are_refused_before_hashing() {
    let app = spawn_app(Db::Sqlite).await;
    app.register("long@example.com", "password-123").await;
    // A wrong password would be a 401 after the hash: a 422 names the rule instead.
    let (status, error) = error_of(app.login("long@example.com", &"x".repeat(129)).await).await;
    assert_eq!(status, 422);
    assert_eq!(error["param"], "password");
    let (status, _) = error_of(app.login("long@example.com", &"x".repeat(128)).await).await;
    assert_eq!(status, 401);
}
