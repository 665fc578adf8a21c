//! The `relay` binary as an operator meets it: start-up checks, migrate, user create, signals.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{self, Db, TestDb, relay_command};

/// Runs `relay serve` in a fresh directory whose `.env` file holds `dotenv`, with nothing else
/// set; returns the exit code and what it wrote to stderr.
fn serve_with_dotenv(dotenv: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), dotenv).unwrap();
    let out = relay_command(dir.path(), &["serve"], &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code(), err)
}

#[test]
fn serve_refuses_to_start_without_secrets_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = relay_command(dir.path(), &["serve"], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SECRET_KEY") && err.contains("OPENAI_API_KEY"),
        "{err}"
    );
    // No subcommand means serve.
    let out = relay_command(dir.path(), &[], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !dir.path().join("app.db").exists(),
        "nothing is created before the checks pass"
    );
}

#[test]
fn malformed_settings_are_all_named_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let weak = "weak-secret-value";
    let out = relay_command(
        dir.path(),
        &["serve"],
        &[
            ("SECRET_KEY", weak),
            ("OPENAI_API_KEY", "sk-live-should-not-print"),
            ("PORT", "http"),
            ("RATE_LIMIT_REQUESTS", "-5"),
            ("ALLOWED_ORIGINS", "[\"https://a.example\""),
            ("OPENAI_BASE_URL", "localhost:9999"),
            ("LOG_FORMAT", "xml"),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "SECRET_KEY",
        "PORT",
        "RATE_LIMIT_REQUESTS",
        "ALLOWED_ORIGINS",
        "OPENAI_BASE_URL",
        "LOG_FORMAT",
    ] {
        assert!(err.contains(name), "{name} not named in: {err}");
    }
    assert!(
        !err.contains(weak) && !err.contains("sk-live-should-not-print"),
        "{err}"
    );
}

#[test]
fn out_of_range_and_unparsable_values_exit_2_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
        ("OPENAI_API_KEY", "sk-x"),
    ];
    for (name, value) in [
        ("UPSTREAM_TIMEOUT_SECONDS", "1e300"),
        ("ACCESS_TOKEN_EXPIRE_MINUTES", "1000000000000"),
        ("REFRESH_TOKEN_EXPIRE_DAYS", "99999999"),
        ("DATABASE_URL", "postgres://u:p@h:port/db"),
        ("HOST", "not a host"),
    ] {
        let mut vars = base.to_vec();
        vars.push((name, value));
        let out = relay_command(dir.path(), &["serve"], &vars)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {err}");
        assert!(err.contains(name), "{name} not named: {err}");
    }
}

#[test]
fn a_broken_dotenv_line_is_reported_without_its_content() {
    let (code, err) = serve_with_dotenv(
        "SECRET_KEY=\"s3cr3t-s3cr3t-s3cr3t-s3cr3t-s3cr3t\nOPENAI_API_KEY=sk-hidden-value\n",
    );
    assert_eq!(code, Some(2));
    assert!(err.contains(".env"), "{err}");
    assert!(
        !err.contains("s3cr3t") && !err.contains("sk-hidden-value"),
        "{err}"
    );
}

#[test]
fn a_non_utf8_environment_variable_does_not_crash_start_up() {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = tempfile::tempdir().unwrap();
    let out = relay_command(dir.path(), &["serve"], &[])
        .env("UNRELATED_JUNK", std::ffi::OsStr::from_bytes(b"\xff\xfe"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("SECRET_KEY"), "{err}");
}

#[tokio::test]
async fn env_example_with_its_secrets_filled_in_starts_relay() {
    let example = include_str!("../../.env.example");
    let filled = example
        .replace(
            "\nSECRET_KEY=\n",
            &format!("\nSECRET_KEY={}\n", support::SECRET),
        )
        .replace("\nOPENAI_API_KEY=\n", "\nOPENAI_API_KEY=sk-test-example\n");
    assert!(
        filled.contains(support::SECRET) && filled.contains("sk-test-example"),
        ".env.example lost its SECRET_KEY= or OPENAI_API_KEY= line"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), filled).unwrap();
    let server = support::RelayProcess::start(dir.path(), &["serve"], &[]);
    // Its CORS origin is the one the example names.
    let resp = reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/v1/health", server.base),
        )
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
}

#[tokio::test]
async fn the_request_log_line_names_the_client_ip() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/relay.db", dir.path().display());
    let vars = support::test_vars(
        &db,
        &[
            ("LOG_LEVEL", "info"),
            ("REDIS_URL", ""),
            ("TRUST_PROXY_HEADERS", "true"),
        ],
    );
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = support::RelayProcess::start(dir.path(), &["serve"], &vars);
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/health", server.base))
        .header("x-forwarded-for", "203.0.113.9, 198.51.100.23")
        .header("x-request-id", "ip-on-the-log-line")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let line = server
        .wait_for_log("ip-on-the-log-line", Duration::from_secs(5))
        .expect("the request's log line");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["client_ip"], "198.51.100.23", "{line}");
    assert_eq!(line["route"], "/api/v1/health", "{line}");
    assert!(line.get("path").is_none(), "{line}");
    // No route matched: the path is on the line.
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/no/such/thing", server.base))
        .header("x-request-id", "no-route-on-the-log-line")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let line = server
        .wait_for_log("no-route-on-the-log-line", Duration::from_secs(5))
        .expect("the request's log line");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["route"], "-", "{line}");
    assert_eq!(line["path"], "/api/v1/no/such/thing", "{line}");
    assert_eq!(line["status"], 404, "{line}");
}

#[test]
fn dotenv_file_is_read_and_environment_wins() {
    let (code, err) = serve_with_dotenv("SECRET_KEY=short\nOPENAI_API_KEY=sk-x\n");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("SECRET_KEY") && !err.contains("OPENAI_API_KEY"),
        "{err}"
    );
}

#[tokio::test]
async fn migrate_twice_and_create_a_user_on_both_databases() {
    for db in [Db::Sqlite, Db::Postgres] {
        let test_db = TestDb::new(db).await;
        let dir = tempfile::tempdir().unwrap();
        let vars = [("DATABASE_URL", test_db.url.as_str())];
        for _ in 0..2 {
            let out = relay_command(dir.path(), &["migrate"], &vars)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{db:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = support::relay_user_create(
            dir.path(),
            "Root@Example.com",
            "admin-password-1",
            true,
            &vars,
        );
        assert!(
            out.status.success(),
            "{db:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let user: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(user["email"], "root@example.com");
        assert_eq!(user["is_admin"], true);
        let out = relay_command(
            dir.path(),
            &["user", "create", "--email", "x@example.com"],
            &vars,
        )
        .output()
        .unwrap();
        assert!(!out.status.success(), "--password-stdin is required");

        // The user can log in to a server on that database.
        let app = support::spawn_app_on(
            std::sync::Arc::new(test_db),
            &[],
            relay::config::Mode::Serve,
        )
        .await;
        let resp = app.login("root@example.com", "admin-password-1").await;
        assert_eq!(resp.status(), 200, "{db:?}");
    }
}

#[tokio::test]
async fn dev_mode_runs_on_a_fresh_directory_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = support::RelayProcess::start(
        dir.path(),
        &["serve", "--dev"],
        &[("SHUTDOWN_GRACE_SECONDS", "5")],
    );
    assert!(dir.path().join("app.db").exists(), "dev mode uses ./app.db");
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/api/v1/auth/register", server.base))
        .json(&serde_json::json!({"email": "dev@example.com", "password": "password-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let docs = client
        .get(format!("{}/docs/", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 200, "docs are on in dev mode");

    let pid = server.child.id();
    if cfg!(target_os = "linux") {
        // Huge pages would make each touched connection buffer cost 2 MiB of resident memory.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.contains("THP_enabled:\t0"),
            "transparent huge pages are off for relay"
        );
    }
    support::send_signal(pid, "TERM");
    let code = support::wait_for_exit(&mut server.child, Duration::from_secs(10));
    assert_eq!(code, Some(0));
}

/// Starts a stream, sends SIGTERM after its first bytes, and returns what the client read, how
/// long the process took to exit after the signal, and its exit code.
async fn sigterm_mid_stream(grace_seconds: &str, chunks: usize) -> (String, Duration, i32) {
    let upstream = support::spawn_mock(relay::mock::MockOptions {
        latency: Duration::ZERO,
        chunks: Some(chunks),
        chunk_delay: Duration::from_millis(100),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/relay.db", dir.path().display());
    let vars = support::test_vars(
        &db,
        &[
            ("OPENAI_BASE_URL", &upstream),
            ("SHUTDOWN_GRACE_SECONDS", grace_seconds),
            ("LOG_LEVEL", "info"),
            ("REDIS_URL", ""),
        ],
    );
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut server = support::RelayProcess::start(dir.path(), &["serve"], &vars);
    let client = reqwest::Client::new();
    let token = server.access_token(&client, "drain@example.com").await;
    let mut resp = client
        .post(format!("{}/api/v1/chat/completions", server.base))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "model": "mock-echo", "stream": true,
            "messages": [{"role": "user", "content": "hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::from_utf8(resp.chunk().await.unwrap().unwrap().to_vec()).unwrap();

    let pid = server.child.id();
    support::send_signal(pid, "TERM");
    let signalled = Instant::now();
    // New connections are refused once the listener is closed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        client
            .get(format!("{}/api/v1/health", server.base))
            .send()
            .await
            .is_err(),
        "no new connections while draining"
    );
    while let Ok(Some(chunk)) = resp.chunk().await {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let code = support::wait_for_exit(&mut server.child, Duration::from_secs(15));
    (seen, signalled.elapsed(), code.unwrap_or(-1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_stream_finish_within_the_grace_period() {
    // A one-second stream, five seconds of grace: the stream ends normally, then relay exits.
    let (seen, took, code) = sigterm_mid_stream("5", 10).await;
    assert!(seen.contains("data: [DONE]"), "the stream finished: {seen}");
    assert_eq!(code, 0);
    assert!(
        took < Duration::from_secs(4),
        "relay exited once drained ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_streams_that_outlast_the_grace_period() {
    // A six-second stream, one second of grace: relay exits after the grace, cutting it.
    let (seen, took, code) = sigterm_mid_stream("1", 60).await;
    assert!(!seen.contains("[DONE]"), "the stream was cut: {seen}");
    assert_eq!(code, 0);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "relay waited for the grace period, then exited ({took:?})"
    );
}

#[tokio::test]
async fn relay_health_exits_0_while_relay_answers_and_1_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/relay.db", dir.path().display());
    let vars = support::test_vars(&db, &[("REDIS_URL", ""), ("LOG_LEVEL", "info")]);
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = support::RelayProcess::start(dir.path(), &["serve"], &vars);
    let port = server.base.rsplit(':').next().unwrap().to_owned();
    let health = |args: &[&str], vars: &[(&str, &str)]| {
        let started = Instant::now();
        let out = relay_command(dir.path(), args, vars).output().unwrap();
        (out.status.code(), started.elapsed())
    };
    let url = format!("{}/api/v1/health", server.base);
    assert_eq!(health(&["health", "--url", &url], &[]).0, Some(0));
    // Without --url it asks PORT on this machine, as serve reads it: from the environment…
    let everywhere = [("HOST", "0.0.0.0"), ("PORT", port.as_str())];
    assert_eq!(health(&["health"], &everywhere).0, Some(0));
    // …or from .env, and needs no secret for it.
    std::fs::write(dir.path().join(".env"), format!("PORT={port}\n")).unwrap();
    assert_eq!(health(&["health"], &[]).0, Some(0));
    std::fs::remove_file(dir.path().join(".env")).unwrap();

    // Not 200 is unhealthy; so is nobody listening, at once.
    let not_found = format!("{}/api/v1/no-such-health", server.base);
    assert_eq!(health(&["health", "--url", &not_found], &[]).0, Some(1));
    drop(server);
    let (code, took) = health(&["health", "--url", &url, "--timeout", "2"], &[]);
    assert_eq!(code, Some(1));
    assert!(took < Duration::from_secs(3), "{took:?}");
    // A broken setting is unhealthy too (1, not serve's 2: Docker reserves 2).
    assert_eq!(health(&["health"], &[("PORT", "eighty")]).0, Some(1));
}

#[tokio::test]
async fn secrets_can_come_from_files_and_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let key_file = secrets.path().join("secret_key");
    let api_file = secrets.path().join("openai_api_key");
    std::fs::write(&key_file, format!("{}\n", support::SECRET)).unwrap();
    std::fs::write(&api_file, "sk-file-secret-never-printed\n").unwrap();
    let db = format!("sqlite://{}/relay.db", dir.path().display());
    let mut vars = support::test_vars(&db, &[("REDIS_URL", ""), ("LOG_LEVEL", "info")]);
    vars.remove("SECRET_KEY");
    vars.remove("OPENAI_API_KEY");
    vars.insert("SECRET_KEY_FILE".into(), key_file.display().to_string());
    vars.insert("OPENAI_API_KEY_FILE".into(), api_file.display().to_string());
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    // The key from the file signs tokens: a user can register, log in and be recognised.
    let server = support::RelayProcess::start(dir.path(), &["serve"], &pairs);
    let client = reqwest::Client::new();
    let token = server.access_token(&client, "files@example.com").await;
    let me = client
        .get(format!("{}/api/v1/auth/me", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    drop(server);

    // Both a variable and its file: exit 2, naming both, quoting neither.
    let mut both = pairs.clone();
    both.push(("SECRET_KEY", support::SECRET));
    both.push(("OPENAI_API_KEY", "sk-env-secret-never-printed"));
    let out = relay_command(dir.path(), &["serve"], &both)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for name in [
        "SECRET_KEY and SECRET_KEY_FILE",
        "OPENAI_API_KEY and OPENAI_API_KEY_FILE",
    ] {
        assert!(err.contains(name), "{name} not named: {err}");
    }
    // A file that cannot be read (here: a directory) names the variable and the path.
    let mut unreadable = pairs.clone();
    let dir_path = secrets.path().display().to_string();
    unreadable.retain(|(k, _)| *k != "SECRET_KEY_FILE");
    unreadable.push(("SECRET_KEY_FILE", &dir_path));
    let out = relay_command(dir.path(), &["serve"], &unreadable)
        .output()
        .unwrap();
    let err2 = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err2}");
    assert!(
        err2.contains("SECRET_KEY_FILE: cannot read the file") && err2.contains(&dir_path),
        "{err2}"
    );
    for text in [&err, &err2] {
        assert!(
            !text.contains(support::SECRET)
                && !text.contains("sk-file-secret-never-printed")
                && !text.contains("sk-env-secret-never-printed"),
            "{text}"
        );
    }
}
