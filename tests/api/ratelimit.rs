//! Rate limits over real HTTP, on the memory backend and on the real Redis, plus the Redis
//! outage story with a `redis-server` of the test's own.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{self, Db, TestApp, spawn_app_with};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    Redis,
}

fn redis_url(backend: Backend) -> &'static str {
    match backend {
        Backend::Memory => "",
        Backend::Redis => "redis://127.0.0.1:6379/0",
    }
}

async fn app(backend: Backend, extra: &[(&str, &str)]) -> TestApp {
    // A generous Redis budget: under a loaded test machine a 50 ms budget could send a decision
    // to memory and make exact counts flaky. The outage tests set the default back.
    let mut vars = vec![
        ("REDIS_URL", redis_url(backend)),
        ("RATE_LIMIT_REDIS_TIMEOUT_MS", "2000"),
    ];
    vars.extend_from_slice(extra);
    spawn_app_with(Db::Sqlite, &vars).await
}

fn hello() -> Value {
    json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]})
}

fn header(resp: &reqwest::Response, name: &str) -> u64 {
    resp.headers()[name].to_str().unwrap().parse().unwrap()
}

/// Sends one chat request to each URL, all at once; returns the statuses.
async fn chats_at_once(
    client: &reqwest::Client,
    urls: impl Iterator<Item = String>,
    token: &str,
) -> Vec<u16> {
    let requests = urls.map(|url| {
        let request = client.post(url).bearer_auth(token).json(&hello());
        async move { request.send().await.unwrap().status().as_u16() }
    });
    futures_util::future::join_all(requests).await
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Memory).await }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Redis).await }
            )*
        }
    };
}

on_both_backends!(
    headers_count_down_then_429,
    buckets_refill_continuously,
    two_hundred_at_once_against_twenty,
    login_guessing_is_stopped_by_ip_and_by_email,
    register_and_refresh_are_limited_by_ip,
    every_answer_of_a_limited_endpoint_carries_the_headers,
    forwarded_for_cannot_pick_a_bucket,
    only_failed_logins_count_against_an_email,
    me_and_logout_are_limited_per_user,
);

async fn every_answer_of_a_limited_endpoint_carries_the_headers(backend: Backend) {
    let app = app(backend, &[]).await;
    let cases = [
        app.client.post(app.api("/chat/completions")).json(&hello()),
        app.client
            .post(app.api("/chat/completions"))
            .bearer_auth("not-a-token")
            .json(&hello()),
        app.client.get(app.api("/models")),
        app.client.get(app.api("/auth/me")),
        app.client
            .post(app.api("/auth/logout"))
            .json(&json!({"refresh_token": "x"})),
        app.client
            .post(app.api("/auth/register"))
            .json(&json!({"email": "bad"})),
        app.client
            .post(app.api("/auth/register"))
            .header("content-type", "application/json")
            .body("{"),
        app.client
            .post(app.api("/auth/refresh"))
            .json(&json!({"refresh_token": "x"})),
        app.client
            .post(app.api("/auth/login"))
            .json(&json!({"email": "a@example.com"})),
        app.client
            .post(app.api("/auth/login"))
            .json(&json!({"email": "a@example.com", "password": "wrong-password"})),
    ];
    for request in cases {
        let resp = request.send().await.unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
        assert!(
            resp.headers().contains_key("x-ratelimit-limit"),
            "{} {:?}",
            resp.url(),
            resp.status()
        );
        assert!(resp.headers().contains_key("x-ratelimit-remaining"));
        assert!(resp.headers().contains_key("x-ratelimit-reset"));
    }
}

async fn headers_count_down_then_429(backend: Backend) {
    let app = app(backend, &[("RATE_LIMIT_CHAT_REQUESTS", "3")]).await;
    let health = app.health_detailed().await.1;
    assert_eq!(
        health["rate_limiter"],
        match backend {
            Backend::Memory => "memory",
            Backend::Redis => "redis",
        }
    );
    assert_eq!(
        health["checks"]["redis"]["status"],
        match backend {
            Backend::Memory => "not_configured",
            Backend::Redis => "ok",
        }
    );

    let (token, _) = app.user_tokens("limits@example.com").await;
    for left in [2, 1, 0] {
        let resp = app.chat(&token, &hello()).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit"), 3);
        assert_eq!(header(&resp, "x-ratelimit-remaining"), left);
        assert!(header(&resp, "x-ratelimit-reset") >= 1);
    }
    let resp = app.chat(&token, &hello()).await;
    assert_eq!(resp.status(), 429);
    let retry = header(&resp, "retry-after");
    assert!((1..=1200).contains(&retry), "{retry}");
    assert_eq!(header(&resp, "x-ratelimit-remaining"), 0);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    // Another user has a bucket of their own; models (no override) use the global bucket.
    let (other, _) = app.user_tokens("other@example.com").await;
    assert_eq!(app.chat(&other, &hello()).await.status(), 200);
    let resp = app.models(&token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-ratelimit-limit"), 100_000);
    // Health is never limited and carries no rate-limit headers.
    let resp = app.get("/health").await;
    assert!(resp.headers().get("x-ratelimit-limit").is_none());
}

async fn me_and_logout_are_limited_per_user(backend: Backend) {
    let app = app(backend, &[("RATE_LIMIT_ACCOUNT_REQUESTS", "2")]).await;
    let (token, refresh) = app.user_tokens("account@example.com").await;
    for left in [1, 0] {
        let resp = app.get_authed("/auth/me", &token).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit"), 2);
        assert_eq!(header(&resp, "x-ratelimit-remaining"), left);
        assert!(header(&resp, "x-ratelimit-reset") >= 1);
    }
    let resp = app.get_authed("/auth/me", &token).await;
    assert_eq!(resp.status(), 429);
    assert!(header(&resp, "retry-after") >= 1);
    assert_eq!(header(&resp, "x-ratelimit-limit"), 2);
    assert_eq!(header(&resp, "x-ratelimit-remaining"), 0);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // Logout takes from the same bucket.
    let logout = json!({ "refresh_token": refresh });
    let resp = app.post_json_authed("/auth/logout", &token, &logout).await;
    assert_eq!(resp.status(), 429);
    assert!(header(&resp, "retry-after") >= 1);
    // The user's other endpoints (no override) are not affected.
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);

    // Another user has a bucket of their own; a successful logout carries the headers too.
    let (other, other_refresh) = app.user_tokens("account-2@example.com").await;
    let resp = app.get_authed("/auth/me", &other).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-ratelimit-remaining"), 1);
    let logout = json!({ "refresh_token": other_refresh });
    let resp = app.post_json_authed("/auth/logout", &other, &logout).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(header(&resp, "x-ratelimit-limit"), 2);
    assert_eq!(header(&resp, "x-ratelimit-remaining"), 0);
}

async fn buckets_refill_continuously(backend: Backend) {
    let app = app(
        backend,
        &[
            ("RATE_LIMIT_CHAT_REQUESTS", "2"),
            ("RATE_LIMIT_CHAT_WINDOW", "2"),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("refill@example.com").await;
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    let resp = app.chat(&token, &hello()).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), 1, "one token a second");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    assert_eq!(app.chat(&token, &hello()).await.status(), 429);
}

async fn two_hundred_at_once_against_twenty(backend: Backend) {
    let app = app(backend, &[("RATE_LIMIT_CHAT_REQUESTS", "20")]).await;
    let (token, _) = app.user_tokens("burst@example.com").await;
    let urls = (0..200).map(|_| app.api("/chat/completions"));
    let statuses = chats_at_once(&app.client, urls, &token).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 20);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 180);
}

async fn login_guessing_is_stopped_by_ip_and_by_email(backend: Backend) {
    let login = |app: &TestApp, email: &'static str, forwarded: Option<String>| {
        let mut req = app
            .client
            .post(app.api("/auth/login"))
            .json(&json!({"email": email, "password": "wrong-password"}));
        if let Some(ip) = forwarded {
            req = req.header("x-forwarded-for", ip);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // From one IP.
    let app1 = app(backend, &[("RATE_LIMIT_LOGIN_REQUESTS", "5")]).await;
    app1.register("victim@example.com", "password-123").await;
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(login(&app1, "victim@example.com", None).await);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429]);

    // From many (spoofed) IPs, proxy headers trusted: the email's bucket stops it.
    let app2 = app(
        backend,
        &[
            ("RATE_LIMIT_LOGIN_REQUESTS", "5"),
            ("TRUST_PROXY_HEADERS", "true"),
        ],
    )
    .await;
    let mut statuses = Vec::new();
    for i in 0..7 {
        statuses.push(login(&app2, "victim@example.com", Some(format!("203.0.113.{i}"))).await);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429]);
    // Other emails from those IPs are still fine: it was the email that was limited.
    assert_eq!(
        login(&app2, "someone@example.com", Some("203.0.113.1".into())).await,
        401
    );

    // Not trusted: the header is ignored, so many "IPs" are one IP, stopped by its bucket even
    // across different emails.
    let app3 = app(backend, &[("RATE_LIMIT_LOGIN_REQUESTS", "5")]).await;
    let emails = [
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "d@example.com",
        "e@example.com",
        "f@example.com",
    ];
    let mut statuses = Vec::new();
    for (i, email) in emails.iter().enumerate() {
        statuses.push(login(&app3, email, Some(format!("198.51.100.{i}"))).await);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429]);
}

async fn only_failed_logins_count_against_an_email(backend: Backend) {
    let app = app(
        backend,
        &[
            ("RATE_LIMIT_LOGIN_REQUESTS", "3"),
            ("TRUST_PROXY_HEADERS", "true"),
        ],
    )
    .await;
    app.register("owner@example.com", "password-123").await;
    let login = |password: &'static str, ip: String| {
        let req = app
            .client
            .post(app.api("/auth/login"))
            .header("x-forwarded-for", ip)
            .json(&json!({"email": "owner@example.com", "password": password}));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Five good logins (more than the limit), from five addresses: all let in.
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(login("password-123", format!("203.0.113.{i}")).await);
    }
    assert_eq!(statuses, [200; 5]);
    // Failed attempts do count: three, then the email is locked, for the owner too.
    let mut statuses = Vec::new();
    for i in 10..14 {
        statuses.push(login("wrong-password", format!("203.0.113.{i}")).await);
    }
    assert_eq!(statuses, [401, 401, 401, 429]);
    assert_eq!(login("password-123", "203.0.113.20".into()).await, 429);
}

async fn forwarded_for_cannot_pick_a_bucket(backend: Backend) {
    // Behind a trusted proxy, a client that writes its own X-Forwarded-For entries and makes
    // the right-most one unparsable must still land in one bucket: the socket peer's.
    let app = app(
        backend,
        &[
            ("RATE_LIMIT_REGISTER_REQUESTS", "2"),
            ("TRUST_PROXY_HEADERS", "true"),
        ],
    )
    .await;
    let mut statuses = Vec::new();
    for (i, last) in ["10.9.9.9:4711", "unknown", "", "not-an-ip"]
        .iter()
        .enumerate()
    {
        let body = json!({"email": format!("xff{i}@example.com"), "password": "password-123"});
        let resp = app
            .client
            .post(app.api("/auth/register"))
            .header("x-forwarded-for", format!("203.0.113.{i}, {last}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [201, 201, 429, 429]);
}

async fn register_and_refresh_are_limited_by_ip(backend: Backend) {
    let app = app(
        backend,
        &[
            ("RATE_LIMIT_REGISTER_REQUESTS", "2"),
            ("RATE_LIMIT_REFRESH_REQUESTS", "1"),
        ],
    )
    .await;
    app.register("r1@example.com", "password-123").await;
    app.register("r2@example.com", "password-123").await;
    let body = json!({"email": "r3@example.com", "password": "password-123"});
    let resp = app.post_json("/auth/register", &body).await;
    assert_eq!(resp.status(), 429);
    assert!(
        app.store
            .user_by_email("r3@example.com")
            .await
            .unwrap()
            .is_none(),
        "nothing done when limited"
    );
    let pair: Value = app
        .login("r1@example.com", "password-123")
        .await
        .json()
        .await
        .unwrap();
    let refresh_token = pair["refresh_token"].as_str().unwrap();
    let resp = app.refresh(refresh_token).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-ratelimit-limit"), 1);
    assert_eq!(app.refresh(refresh_token).await.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_share_one_limit() {
    let prefix = format!("shared-{}", uuid::Uuid::new_v4().simple());
    let vars = [
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("RATE_LIMIT_CHAT_REQUESTS", "10"),
        ("RATE_LIMIT_REDIS_TIMEOUT_MS", "2000"),
        ("RATE_LIMIT_KEY_PREFIX", prefix.as_str()),
    ];
    let a = spawn_app_with(Db::Postgres, &vars).await;
    let b = support::spawn_app_on(a.db.clone(), &vars, relay::config::Mode::Serve).await;
    let (token, _) = a.user_tokens("shared@example.com").await;
    let urls = (0..60).map(|i| if i % 2 == 0 { &a } else { &b }.api("/chat/completions"));
    let statuses = chats_at_once(&a.client, urls, &token).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
}

/// A `redis-server` of the test's own, on a free port.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        OwnRedis::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> OwnRedis {
        let child = Command::new("redis-server")
            .args(extra)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis { port, child }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An app whose limits live in a redis-server of the test's own (on a free port), and a token.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn app_on_own_redis(email: &str) -> (OwnRedis, TestApp, String) {
    let port = free_port();
    let redis = OwnRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}/0");
    let app = app(
        Backend::Redis,
        &[
            ("REDIS_URL", url.as_str()),
            ("RATE_LIMIT_CHAT_REQUESTS", "1000"),
            ("RATE_LIMIT_REDIS_TIMEOUT_MS", "50"),
        ],
    )
    .await;
    let (token, _) = app.user_tokens(email).await;
    (redis, app, token)
}

async fn backend_of(app: &TestApp) -> String {
    let health = app.health_detailed().await.1;
    health["rate_limiter"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_costs_no_stall_and_is_taken_back_when_it_wakes() {
    let (redis, app, token) = app_on_own_redis("paused@example.com").await;
    assert_eq!(backend_of(&app).await, "redis");
    let pid = redis.child.id();
    // A paused Redis accepts connections and never answers: the worst kind of outage.
    support::send_signal(pid, "STOP");
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let start = Instant::now();
        assert_eq!(app.chat(&token, &hello()).await.status(), 200);
        slowest = slowest.max(start.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    assert_eq!(app.get("/health").await.status(), 200);
    support::send_signal(pid, "CONT");
    let start = Instant::now();
    while backend_of(&app).await != "redis" {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "relay did not go back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_back_to_memory_and_recovers() {
    let (mut redis, app, token) = app_on_own_redis("outage@example.com").await;
    let port = redis.port;
    assert_eq!(backend_of(&app).await, "redis");
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);

    redis.stop();
    // Requests keep being answered, none of them stalled by the dead Redis.
    let mut slowest = Duration::ZERO;
    for _ in 0..30 {
        let start = Instant::now();
        let resp = app.chat(&token, &hello()).await;
        slowest = slowest.max(start.elapsed());
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("x-ratelimit-remaining"));
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    assert_eq!(backend_of(&app).await, "memory");

    // Redis comes back on the same port: relay returns to it by itself.
    let _redis = OwnRedis::start(port);
    let start = Instant::now();
    loop {
        // Decisions are what notice the way back only through the probe, not requests.
        if backend_of(&app).await == "redis" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "relay did not go back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
}

async fn redis_command(url: &str, command: &[&str]) -> ::redis::RedisResult<::redis::Value> {
    let client = ::redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = ::redis::cmd(command[0]);
    for arg in &command[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_with_a_password_and_a_database_keeps_deciding_after_a_script_flush() {
    let port = free_port();
    let socket = std::env::temp_dir().join(format!("relay-test-redis-{port}.sock"));
    let socket = socket.to_str().unwrap();
    let _redis = OwnRedis::start_with(
        port,
        &["--requirepass", "s3cret pass", "--unixsocket", socket],
    );
    let url = format!("redis://:s3cret%20pass@127.0.0.1:{port}/5");
    let app = app(
        Backend::Redis,
        &[
            ("REDIS_URL", url.as_str()),
            ("RATE_LIMIT_CHAT_REQUESTS", "3"),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("flush@example.com").await;
    assert_eq!(backend_of(&app).await, "redis");
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    // The buckets are in database 5, none in 0.
    let keys = |db: u8| {
        let url = format!("redis://:s3cret%20pass@127.0.0.1:{port}/{db}");
        async move { redis_command(&url, &["DBSIZE"]).await.unwrap() }
    };
    assert_ne!(keys(5).await, ::redis::Value::Int(0));
    assert_eq!(keys(0).await, ::redis::Value::Int(0));
    // Redis forgets the script (as after a restart): the next decision loads it again and
    // the count goes on where it was.
    redis_command(&url, &["SCRIPT", "FLUSH"]).await.unwrap();
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    assert_eq!(app.chat(&token, &hello()).await.status(), 200);
    assert_eq!(app.chat(&token, &hello()).await.status(), 429);
    assert_eq!(backend_of(&app).await, "redis");

    // The wrong password is no connection: relay decides in memory, and says so.
    let wrong = format!("redis://:wrong@127.0.0.1:{port}/5");
    let refused = app_with_redis(&wrong).await;
    assert_eq!(backend_of(&refused).await, "memory");
    assert!(redis_command(&wrong, &["PING"]).await.is_err());

    // A Unix socket works too.
    let unix = format!("redis+unix://{socket}?db=5&pass=s3cret%20pass");
    let local = app_with_redis(&unix).await;
    assert_eq!(backend_of(&local).await, "redis");
    let (token, _) = local.user_tokens("unix@example.com").await;
    assert_eq!(local.chat(&token, &hello()).await.status(), 200);
}

async fn app_with_redis(url: &str) -> TestApp {
    app(Backend::Redis, &[("REDIS_URL", url)]).await
}

/// A chat that the mock answers with 40 tokens of usage (20 words in, echoed).
fn forty_token_chat() -> Value {
    let words = "one two three four five six seven eight nine ten ".repeat(2);
    json!({"model": "mock-echo", "max_tokens": 25,
        "messages": [{"role": "user", "content": words.trim()}]})
}

/// Script calls (`EVALSHA` and `EVAL`) the Redis on `port` has served so far.
async fn script_calls(port: u16) -> u64 {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = ::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Waits until the Redis on `port` has served `calls` script calls, then a little longer to
/// see that no more come; returns how many it served.
async fn settled_script_calls(port: u16, calls: u64) -> u64 {
    let start = Instant::now();
    while script_calls(port).await < calls && start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    script_calls(port).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limited_chat_costs_one_script_call_to_admit_and_one_to_settle() {
    let port = free_port();
    let _redis = OwnRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}/0");
    for (limit, per_request) in [("0", 1), ("100000", 2)] {
        let app = app(
            Backend::Redis,
            &[("REDIS_URL", url.as_str()), ("TOKEN_LIMIT", limit)],
        )
        .await;
        assert_eq!(backend_of(&app).await, "redis");
        let (token, _) = app.user_tokens(&format!("calls{limit}@example.com")).await;
        for round in 1..=3 {
            let before = script_calls(port).await;
            let resp = app.chat(&token, &forty_token_chat()).await;
            assert_eq!(resp.status(), 200);
            let tokens = resp.headers().get("x-ratelimit-remaining-tokens").is_some();
            assert_eq!(tokens, limit != "0");
            let after = settled_script_calls(port, before + per_request).await;
            assert_eq!(
                after - before,
                per_request,
                "TOKEN_LIMIT={limit}, request {round}: the request check and the token \
                 reservation are one call, the settlement a second"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_fall_back_to_memory_when_redis_dies_mid_run() {
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}/0");
    let app = app(
        Backend::Redis,
        &[
            ("REDIS_URL", url.as_str()),
            ("RATE_LIMIT_REDIS_TIMEOUT_MS", "50"),
            ("RATE_LIMIT_CHAT_REQUESTS", "1000"),
            ("TOKEN_LIMIT", "1000"),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("tokens-outage@example.com").await;
    let mut admitted = 0;
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for i in 0..60 {
        if i == 5 {
            assert_eq!(backend_of(&app).await, "redis");
            redis.stop();
        }
        let start = Instant::now();
        let resp = app.chat(&token, &forty_token_chat()).await;
        slowest = slowest.max(start.elapsed());
        match resp.status().as_u16() {
            200 => admitted += 1,
            429 => {
                let err: Value = resp.json().await.unwrap();
                assert_eq!(err["error"]["code"], "token_limit_exceeded");
                refused += 1;
            }
            other => panic!("request {i}: {other}"),
        }
    }
    assert_eq!(backend_of(&app).await, "memory");
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?}"
    );
    // Memory starts a full bucket of its own (each backend bounds what it saw): 5 requests on
    // Redis, then as many as fit 1,000 tokens in memory, each using 40 once settled and
    // reserving its worst case (the body's bytes plus 25) first.
    let worst = serde_json::to_vec(&forty_token_chat()).unwrap().len() + 25;
    let in_memory = (1000 - worst) / 40 + 1;
    assert!(
        (in_memory..=5 + in_memory).contains(&admitted) && refused == 60 - admitted,
        "{admitted} admitted ({in_memory} fit in memory), {refused} refused"
    );
    let usage: Value = app.get_authed("/usage", &token).await.json().await.unwrap();
    let total = usage["total"]["total_tokens"].as_u64().unwrap();
    assert!(total <= 5 * 40 + 1000, "used {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_processes_sharing_redis_let_the_capacity_through_in_total() {
    // Two real processes sharing a database, as replicas do: the token is checked in memory
    // with the shared SECRET_KEY, and the user's bucket lives in the shared Redis.
    let base = support::spawn_mock(Default::default()).await;
    let db = support::TestDb::new(Db::Postgres).await;
    let prefix = format!("procs-{}", uuid::Uuid::new_v4().simple());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let vars = [
        ("SECRET_KEY", support::SECRET),
        ("OPENAI_API_KEY", "sk-test"),
        ("OPENAI_BASE_URL", base.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:6379/0"),
        ("RATE_LIMIT_KEY_PREFIX", prefix.as_str()),
        ("RATE_LIMIT_CHAT_REQUESTS", "15"),
        ("RATE_LIMIT_REDIS_TIMEOUT_MS", "2000"),
        ("DATABASE_URL", db.url.as_str()),
    ];
    let a = support::RelayProcess::start(dir_a.path(), &["serve"], &vars);
    let b = support::RelayProcess::start(dir_b.path(), &["serve"], &vars);
    let client = reqwest::Client::new();
    let token = a.access_token(&client, "procs@example.com").await;
    let urls = (0..80).map(|i| {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        format!("{base}/api/v1/chat/completions")
    });
    let statuses = chats_at_once(&client, urls, &token).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 65);
}

/// A bucket of `capacity` under `key`, one token taken.
fn take_one(key: &str, capacity: u64) -> relay::ratelimit::Step<'_> {
    relay::ratelimit::Step {
        key,
        shape: relay::ratelimit::Shape {
            capacity,
            window_ms: 60_000,
        },
        op: relay::ratelimit::Op::Take(1),
        pool: relay::ratelimit::Pool::Requests,
    }
}

// One worker, as relay has on one core: a task woken by another runs right after it, which is
// what the driver's yield is for.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn decisions_made_at_once_share_writes_and_each_gets_its_own_answer() {
    use relay::ratelimit::redis::RedisLimiter;
    let port = free_port();
    let _redis = OwnRedis::start(port);
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let limiter = RedisLimiter::connect(client).await.unwrap();
    // The script loaded first, so that each call below is one `EVALSHA`.
    limiter.run(&[take_one("t:{warm}", 10)]).await.unwrap();
    let before = limiter.batches();
    // 300 requests' tasks, each deciding on its own bucket with its own capacity (so that each
    // answer says whose it is), all ready in the same turn of the runtime, as under load.
    let spawner = limiter.clone();
    let decisions = tokio::spawn(async move {
        let calls: Vec<_> = (0..300u64)
            .map(|i| {
                let limiter = spawner.clone();
                tokio::spawn(async move {
                    let key = format!("t:rl:all:{{batch{i}}}");
                    limiter.run(&[take_one(&key, i + 2)]).await.unwrap()
                })
            })
            .collect();
        let mut decisions = Vec::new();
        for call in calls {
            decisions.push(call.await.unwrap());
        }
        decisions
    })
    .await
    .unwrap();
    for (i, decisions) in decisions.iter().enumerate() {
        let decision = decisions[0];
        assert!(decision.allowed, "call {i}");
        assert_eq!(
            decision.limit,
            i as u64 + 2,
            "call {i} got another's answer"
        );
        assert_eq!(
            decision.remaining,
            i as u64 + 1,
            "call {i} got another's answer"
        );
    }
    // Written one by one, they would be about 300 batches; together, a batch is what the
    // worker ran before it next looked at its sockets (tokio looks every 61 polls).
    let batches = limiter.batches() - before;
    assert!(batches <= 10, "300 decisions took {batches} writes");
}

#[tokio::test]
async fn an_answer_nobody_asked_for_is_never_taken_for_the_next_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A "Redis" that answers PING, then sends a decision nobody asked for (allowed, 5 left),
    // then answers the next call with a refusal.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = socket.read(&mut buf).await.unwrap(); // PING
        socket.write_all(b"+PONG\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        socket.write_all(b"*2\r\n:1\r\n$1\r\n5\r\n").await.unwrap();
        if socket.read(&mut buf).await.unwrap_or(0) > 0 {
            let _ = socket.write_all(b"*2\r\n:0\r\n$1\r\n0\r\n").await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let limiter = relay::ratelimit::redis::RedisLimiter::connect(client)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let decided = limiter.run(&[take_one("t:{unasked}", 10)]).await;
    assert!(
        decided.is_err(),
        "the unasked answer was taken for the call's: {decided:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_short_before_it_was_sent_is_never_sent() {
    use relay::ratelimit::redis::{MAX_IN_FLIGHT, RedisLimiter};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A "Redis" that counts the script calls it receives and answers none until told to.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(AtomicUsize::new(0));
    let (answer_now, mut answer) = tokio::sync::mpsc::channel::<usize>(4);
    let seen = received.clone();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = socket.read(&mut buf).await.unwrap();
        assert!(buf[..n].windows(4).any(|w| w == b"PING"));
        socket.write_all(b"+PONG\r\n").await.unwrap();
        let mut carry = Vec::new();
        loop {
            tokio::select! {
                n = socket.read(&mut buf) => {
                    let n = n.unwrap();
                    if n == 0 {
                        return;
                    }
                    carry.extend_from_slice(&buf[..n]);
                    let calls = carry.windows(7).filter(|w| *w == b"EVALSHA").count();
                    seen.fetch_add(calls, Ordering::SeqCst);
                    // Keep a tail that may hold the start of a cut name.
                    let keep = carry.len().saturating_sub(6);
                    carry.drain(..keep);
                }
                Some(count) = answer.recv() => {
                    let answers = b"*2\r\n:1\r\n:0\r\n".repeat(count);
                    socket.write_all(&answers).await.unwrap();
                }
            }
        }
    });
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let limiter = RedisLimiter::connect(client).await.unwrap();
    // As many calls in flight as the driver allows, all waiting for their answers.
    let waiting: Vec<_> = (0..MAX_IN_FLIGHT)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.run(&[take_one("t:{stall}", 5000)]).await })
        })
        .collect();
    let start = Instant::now();
    while received.load(Ordering::SeqCst) < MAX_IN_FLIGHT {
        assert!(start.elapsed() < Duration::from_secs(10), "calls not sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One more is queued, not sent; it gives up (its request is decided in memory).
    let steps = [take_one("t:{stall}", 5000)];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), limiter.run(&steps))
            .await
            .is_err()
    );
    // Redis wakes: the calls in flight get their answers, and the one that gave up is dropped.
    answer_now.send(MAX_IN_FLIGHT).await.unwrap();
    for call in waiting {
        assert!(call.await.unwrap().is_ok());
    }
    // The next call is the next one Redis receives.
    let next = tokio::spawn(async move { limiter.run(&[take_one("t:{stall}", 5000)]).await });
    let start = Instant::now();
    while received.load(Ordering::SeqCst) <= MAX_IN_FLIGHT {
        assert!(start.elapsed() < Duration::from_secs(10), "call not sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        received.load(Ordering::SeqCst),
        MAX_IN_FLIGHT + 1,
        "the call that gave up before it was sent was sent all the same"
    );
    answer_now.send(1).await.unwrap();
    assert!(next.await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_short_leaves_no_answer_for_the_next_one() {
    use relay::ratelimit::redis::RedisLimiter;
    let port = free_port();
    let redis = OwnRedis::start(port);
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let limiter = RedisLimiter::connect(client).await.unwrap();
    // The script loaded, so the calls below are one `EVALSHA` each.
    limiter.run(&[take_one("t:{warm}", 10)]).await.unwrap();
    support::send_signal(redis.child.id(), "STOP");
    // Cut short while Redis sleeps: their commands are written, their answers owed.
    for _ in 0..3 {
        let steps = [take_one("t:{first}", 100)];
        let call = limiter.run(&steps);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err()
        );
    }
    support::send_signal(redis.child.id(), "CONT");
    // The owed answers arrive first and go nowhere; each next call gets its own.
    for expected in [6, 5, 4] {
        let decision = limiter.run(&[take_one("t:{second}", 7)]).await.unwrap()[0];
        assert_eq!((decision.limit, decision.remaining), (7, expected));
    }
    let decision = limiter.run(&[take_one("t:{first}", 100)]).await.unwrap()[0];
    assert_eq!(
        decision.remaining, 96,
        "the three calls cut short were applied"
    );
}

#[tokio::test]
async fn the_lua_script_and_the_rust_bucket_agree_step_by_step() {
    use relay::ratelimit::bucket::{self, Shape};
    let client = ::redis::Client::open("redis://127.0.0.1:6379/0").unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = ::redis::Script::new(relay::ratelimit::redis::SCRIPT);
    // A small deterministic generator: the same sequences every run, no extra crate.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    for case in 0..16 {
        // Odd cases refill a whole token every `tick` ms and step in whole ticks, so that the
        // bucket often lands exactly on a token boundary; even cases step at random.
        let capacity = 1 + next(40);
        let tick = 1 + next(500);
        let shape = if case % 2 == 1 {
            Shape {
                capacity,
                window_ms: capacity * tick,
            }
        } else {
            Shape {
                capacity,
                window_ms: 1 + next(10_000),
            }
        };
        let key = format!("lua-check-{}-{case}", uuid::Uuid::new_v4().simple());
        let mut now = 1_700_000_000_000 + next(1_000_000);
        let mut rust_bucket = None;
        for step in 0..150 {
            now += if case % 2 == 1 {
                tick * next(3)
            } else {
                next(3) * next(700)
            };
            // Some steps give tokens back (as login does for a right password, and a token
            // limit's settlement) or charge what a request used beyond its reservation; takes
            // are of one to three tokens (a worst case).
            let op = match step % 7 {
                4 => bucket::Op::Refund(1 + next(3)),
                6 => bucket::Op::Charge(1 + next(3)),
                _ => bucket::Op::Take(1 + next(3)),
            };
            let answer: Vec<u64> = script
                .key(&key)
                .arg(now)
                .arg(shape.capacity)
                .arg(shape.window_ms)
                .arg(op.name())
                .arg(op.amount())
                .invoke_async(&mut conn)
                .await
                .unwrap();
            let (allowed, level) = (answer[0], answer[1]);
            let (b, d) = bucket::apply(rust_bucket, now, shape, op);
            rust_bucket = Some(b);
            assert_eq!(
                (allowed == 1, level),
                (d.allowed, b.level),
                "case {case} {shape:?} step {step} at {now} {op:?}"
            );
        }
        let _: () = ::redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
