//! Test support: start a whole relay on 127.0.0.1:0 with its own database, and talk HTTP to it.

pub mod fake_upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use relay::app::App;
use relay::config::{Config, Mode};
use relay::mock::MockOptions;
use relay::store::{Store, UserRecord};
use serde_json::{Value, json};
use sqlx::Connection as _;

/// The PostgreSQL server tests create their databases in.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Which engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A database made for one test and removed after it.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(db: Db) -> TestDb {
        match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("relay.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Db::Postgres => {
                let name = format!("relay_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&postgres_admin_url())
                    .await
                    .expect("PostgreSQL must be running on 127.0.0.1:5432 for the tests");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let mut url = url::Url::parse(&postgres_admin_url()).unwrap();
                url.set_path(&name);
                TestDb {
                    url: url.to_string(),
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Drop runs outside async; a helper thread with its own runtime removes the database.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// The signing key every test app uses (tests forge tokens with it).
pub const SECRET: &str = "test-secret-key-test-secret-key-0123456789";

/// Settings for a test app; `extra` overrides or adds variables.
pub fn test_vars(database_url: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
    let mut vars: HashMap<String, String> = [
        ("HOST", "127.0.0.1"),
        ("PORT", "0"),
        ("SECRET_KEY", SECRET),
        ("OPENAI_API_KEY", "sk-test-upstream-key"),
        ("DATABASE_URL", database_url),
        ("LOG_LEVEL", "warn"),
        ("ALLOWED_ORIGINS", "https://app.example.com"),
        ("SHUTDOWN_GRACE_SECONDS", "1"),
        // Generous limits and a namespace of its own, so that tests sharing the local Redis
        // never limit each other; the rate-limit tests set their own.
        ("RATE_LIMIT_REQUESTS", "100000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    vars.insert(
        "RATE_LIMIT_KEY_PREFIX".to_owned(),
        format!("test-{}", uuid::Uuid::new_v4().simple()),
    );
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    vars
}

/// A running relay.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub store: Store,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub db: Arc<TestDb>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn api(&self, path: &str) -> String {
        self.url(&format!("/api/v1{path}"))
    }

    /// `GET /api/v1{path}` without credentials.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        send(self.client.get(self.api(path))).await
    }

    /// `GET /api/v1{path}` with one extra request header.
    pub async fn get_with_header(&self, path: &str, name: &str, value: &str) -> reqwest::Response {
        send(self.client.get(self.api(path)).header(name, value)).await
    }

    /// `GET /api/v1{path}` with `token` as the Bearer token.
    pub async fn get_authed(&self, path: &str, token: &str) -> reqwest::Response {
        send(self.client.get(self.api(path)).bearer_auth(token)).await
    }

    /// `POST /api/v1{path}` with a JSON body, without credentials.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        send(self.client.post(self.api(path)).json(body)).await
    }

    /// `POST /api/v1{path}` with a JSON body and `token` as the Bearer token.
    pub async fn post_json_authed(
        &self,
        path: &str,
        token: &str,
        body: &Value,
    ) -> reqwest::Response {
        let request = self.client.post(self.api(path)).bearer_auth(token);
        send(request.json(body)).await
    }

    /// `POST /api/v1{path}` with `body` as it is, labelled `content_type` (for broken JSON and
    /// wrong content types).
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let request = self.client.post(self.api(path));
        send(request.header("content-type", content_type).body(body)).await
    }

    /// `POST /api/v1/chat/completions` with `token` and the JSON `body`.
    pub async fn chat(&self, token: &str, body: &Value) -> reqwest::Response {
        self.post_json_authed("/chat/completions", token, body)
            .await
    }

    /// `GET /api/v1/models` with `token`.
    pub async fn models(&self, token: &str) -> reqwest::Response {
        self.get_authed("/models", token).await
    }

    /// Registers `email` with `password`; panics unless 201.
    pub async fn register(&self, email: &str, password: &str) -> Value {
        let creds = json!({"email": email, "password": password});
        let resp = self.post_json("/auth/register", &creds).await;
        assert_eq!(resp.status(), 201, "register {email}");
        resp.json().await.unwrap()
    }

    /// Logs in with JSON; returns the response.
    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        let creds = json!({"email": email, "password": password});
        self.post_json("/auth/login", &creds).await
    }

    /// `POST /api/v1/auth/refresh` with `refresh_token`.
    pub async fn refresh(&self, refresh_token: &str) -> reqwest::Response {
        let body = json!({ "refresh_token": refresh_token });
        self.post_json("/auth/refresh", &body).await
    }

    /// `GET /api/v1/health/detailed`: the status and the body.
    pub async fn health_detailed(&self) -> (u16, Value) {
        let resp = self.get("/health/detailed").await;
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// Registers and logs in a fresh user; returns (access, refresh).
    pub async fn user_tokens(&self, email: &str) -> (String, String) {
        self.register(email, "password-123").await;
        let resp = self.login(email, "password-123").await;
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        (
            body["access_token"].as_str().unwrap().to_owned(),
            body["refresh_token"].as_str().unwrap().to_owned(),
        )
    }

    /// The stored user with `email`, read from the database; panics if there is none.
    pub async fn stored_user(&self, email: &str) -> UserRecord {
        self.store.user_by_email(email).await.unwrap().unwrap()
    }
}

/// Sends `request`; panics if no response came.
async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    request.send().await.unwrap()
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the built-in mock upstream on a free port for the rest of the test; returns its base
/// URL (`OPENAI_BASE_URL`).
pub async fn spawn_mock(options: MockOptions) -> String {
    let addr = relay::mock::spawn(options).await.unwrap();
    format!("http://{addr}/v1")
}

/// Starts relay on a random port with a fresh database of kind `db`.
pub async fn spawn_app(db: Db) -> TestApp {
    spawn_app_with(db, &[]).await
}

/// Same, with extra settings.
pub async fn spawn_app_with(db: Db, extra: &[(&str, &str)]) -> TestApp {
    let test_db = Arc::new(TestDb::new(db).await);
    spawn_app_on(test_db, extra, Mode::Serve).await
}

/// Starts relay on an existing test database.
pub async fn spawn_app_on(test_db: Arc<TestDb>, extra: &[(&str, &str)], mode: Mode) -> TestApp {
    let mut vars = test_vars(&test_db.url, extra);
    if !vars.contains_key("OPENAI_BASE_URL") {
        // Never the real OpenAI: each app gets its own built-in mock upstream.
        let base = spawn_mock(MockOptions::default()).await;
        vars.insert("OPENAI_BASE_URL".to_owned(), base);
    }
    let config = Config::from_vars(&vars, mode).unwrap();
    static LOG_GUARD: std::sync::OnceLock<Option<relay::telemetry::LogGuard>> =
        std::sync::OnceLock::new();
    LOG_GUARD.get_or_init(|| relay::telemetry::init(&config.log.level, config.log.format));
    let app = App::build(config).await.unwrap();
    let addr = app.local_addr().unwrap();
    let store = app.state().store.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        client: reqwest::Client::new(),
        store,
        shutdown: Some(tx),
        db: test_db,
    }
}

/// Runs each named `async fn name(db: Db)` on SQLite and on PostgreSQL, as tests
/// `sqlite::name` and `postgres::name` of the calling module.
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Db::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Db::Postgres).await
                }
            )*
        }
    };
}
pub(crate) use on_both_databases;

/// A command running the built `relay` binary in `dir` with a clean environment (only PATH and
/// `vars`) and no stdin.
pub fn relay_command(
    dir: &std::path::Path,
    args: &[&str],
    vars: &[(&str, &str)],
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args(args);
    clean_environment(&mut cmd, dir, vars);
    cmd
}

/// [`relay_command`] under a file limit: `nofile` is `SOFT:HARD` for util-linux's `prlimit`,
/// which sets it and then runs relay in its own process (so the child's id is relay's).
pub fn relay_command_with_file_limit(
    nofile: &str,
    dir: &std::path::Path,
    args: &[&str],
    vars: &[(&str, &str)],
) -> std::process::Command {
    let mut cmd = std::process::Command::new("prlimit");
    cmd.arg(format!("--nofile={nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_relay"))
        .args(args);
    clean_environment(&mut cmd, dir, vars);
    cmd
}

fn clean_environment(
    cmd: &mut std::process::Command,
    dir: &std::path::Path,
    vars: &[(&str, &str)],
) {
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(vars.iter().copied())
        .stdin(std::process::Stdio::null());
}

/// Runs `relay user create --email <email> --password-stdin [--admin]` in `dir` with `vars`,
/// writing `password` to its standard input; returns its output (status, the user on stdout).
pub fn relay_user_create(
    dir: &std::path::Path,
    email: &str,
    password: &str,
    admin: bool,
    vars: &[(&str, &str)],
) -> std::process::Output {
    use std::io::Write as _;
    let mut args = vec!["user", "create", "--email", email, "--password-stdin"];
    if admin {
        args.push("--admin");
    }
    let mut child = relay_command(dir, &args, vars)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A `relay` process started from the built binary in `dir`, with a clean environment (only
/// PATH and `vars`), on a free port; killed when dropped.
pub struct RelayProcess {
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Every line it has written to stderr so far.
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Runs `relay <args>` and waits for its "listening" log line.
    pub fn start(dir: &std::path::Path, args: &[&str], vars: &[(&str, &str)]) -> RelayProcess {
        Self::spawn(relay_command(dir, args, vars))
    }

    /// Runs `command` (a `relay serve`, from [`relay_command`] or
    /// [`relay_command_with_file_limit`]) on a free port, with JSON logs, and waits for its
    /// "listening" log line.
    pub fn spawn(mut command: std::process::Command) -> RelayProcess {
        use std::io::BufRead as _;
        let mut child = command
            .envs([("PORT", "0"), ("LOG_FORMAT", "json")])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && let Some(addr) = v["address"].as_str()
                {
                    let _ = tx.send(addr.to_owned());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(e) => {
                // Not left running behind a failed test.
                let _ = child.kill();
                let _ = child.wait();
                let logs = logs.lock().unwrap().join("\n");
                panic!("relay did not start ({e}); it logged:\n{logs}");
            }
        };
        RelayProcess {
            child,
            base: format!("http://{addr}"),
            logs,
        }
    }

    /// The first line logged so far that contains `needle`.
    pub fn logged(&self, needle: &str) -> Option<String> {
        let logs = self.logs.lock().unwrap();
        logs.iter().find(|line| line.contains(needle)).cloned()
    }

    /// Waits up to `limit` for a line containing `needle` to be logged.
    pub fn wait_for_log(&self, needle: &str, limit: std::time::Duration) -> Option<String> {
        let start = std::time::Instant::now();
        loop {
            if let Some(line) = self.logged(needle) {
                return Some(line);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl RelayProcess {
    /// Registers `email` (password `password-123`) and returns an access token.
    pub async fn access_token(&self, client: &reqwest::Client, email: &str) -> String {
        let creds = json!({"email": email, "password": "password-123"});
        let post = |path: &str| {
            client
                .post(format!("{}/api/v1{path}", self.base))
                .json(&creds)
        };
        let resp = send(post("/auth/register")).await;
        assert_eq!(resp.status(), 201);
        let pair: Value = send(post("/auth/login")).await.json().await.unwrap();
        pair["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` (`TERM`, `STOP`, `CONT`, …) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Waits for `child` to exit, at most `limit`; returns its exit code.
pub fn wait_for_exit(child: &mut std::process::Child, limit: std::time::Duration) -> Option<i32> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            start.elapsed() < limit,
            "the process did not exit within {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
