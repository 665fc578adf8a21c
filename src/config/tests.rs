//! Loading settings: defaults, every problem at once, lists, overrides, dev mode, `.env`.

use super::*;

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const KEY: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn defaults_apply_when_secrets_are_given() {
    let c = Config::from_vars(
        &vars(&[("SECRET_KEY", KEY), ("OPENAI_API_KEY", "sk-test")]),
        Mode::Serve,
    )
    .unwrap();
    assert_eq!(c.server.host, "127.0.0.1");
    assert_eq!(c.server.port, 8000);
    assert_eq!(c.upstream.base_url.as_str(), "https://api.openai.com/v1");
    assert_eq!(c.upstream.default_model, "gpt-4o-mini");
    assert_eq!(
        c.server.allowed_origins,
        Origins::List(vec!["http://localhost:3000".into()])
    );
    assert_eq!(c.rate_limits.global.requests, 100);
    assert_eq!(c.rate_limits.global.window, Duration::from_secs(3600));
    assert!(matches!(&c.database, Database::Sqlite(p) if p == Path::new("./app.db")));
    assert_eq!(c.auth.access_token_ttl, Duration::from_secs(1800));
    assert_eq!(c.auth.refresh_token_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.server.max_request_bytes, 8_388_608);
    assert_eq!(c.server.request_body_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.log.format, LogFormat::Json);
    assert!(!c.docs_enabled());
    assert!(!c.playground_enabled());
}

#[test]
fn every_problem_is_named_at_once_and_no_secret_is_printed() {
    let err = Config::from_vars(
        &vars(&[
            ("SECRET_KEY", "short-secret-value"),
            ("PORT", "eighty"),
            ("ALLOWED_ORIGINS", "[not json"),
            ("OPENAI_BASE_URL", "api.openai.com"),
        ]),
        Mode::Serve,
    )
    .unwrap_err();
    let text = err.to_string();
    for name in [
        "SECRET_KEY",
        "OPENAI_API_KEY",
        "PORT",
        "ALLOWED_ORIGINS",
        "OPENAI_BASE_URL",
    ] {
        assert!(text.contains(name), "{name} missing from: {text}");
    }
    assert!(!text.contains("short-secret-value"));
    assert_eq!(err.problems.len(), 5, "{text}");
}

#[test]
fn origins_accept_json_and_comma_lists() {
    for raw in [
        r#"["https://a.example", "http://localhost:5173"]"#,
        "https://a.example, http://localhost:5173",
    ] {
        let c = Config::from_vars(&vars(&[("ALLOWED_ORIGINS", raw)]), Mode::Dev).unwrap();
        assert_eq!(
            c.server.allowed_origins,
            Origins::List(vec![
                "https://a.example".into(),
                "http://localhost:5173".into()
            ])
        );
    }
}

#[test]
fn endpoint_overrides_inherit_the_global_values() {
    let c = Config::from_vars(
        &vars(&[
            ("RATE_LIMIT_REQUESTS", "50"),
            ("RATE_LIMIT_WINDOW", "60"),
            ("RATE_LIMIT_LOGIN_REQUESTS", "5"),
        ]),
        Mode::Dev,
    )
    .unwrap();
    let login = c.rate_limits.for_endpoint(Endpoint::Login);
    assert_eq!(login.requests, 5);
    assert_eq!(login.window, Duration::from_secs(60));
    assert_eq!(c.rate_limits.for_endpoint(Endpoint::Chat).requests, 50);
}

#[test]
fn connection_settings_are_checked() {
    let c = Config::from_vars(
        &vars(&[
            ("REQUEST_BODY_TIMEOUT_SECONDS", "2.5"),
            ("MAX_CONNECTIONS", "200"),
            ("RATE_LIMIT_ACCOUNT_REQUESTS", "2"),
        ]),
        Mode::Dev,
    )
    .unwrap();
    assert_eq!(c.server.request_body_timeout, Duration::from_millis(2500));
    assert_eq!(c.server.max_connections, 200);
    assert_eq!(c.rate_limits.for_endpoint(Endpoint::Account).requests, 2);
    for (name, bad) in [
        ("REQUEST_BODY_TIMEOUT_SECONDS", "0"),
        ("REQUEST_BODY_TIMEOUT_SECONDS", "soon"),
        ("REQUEST_BODY_TIMEOUT_SECONDS", "1e300"),
        ("MAX_CONNECTIONS", "0"),
        ("MAX_CONNECTIONS", "-1"),
        ("MAX_CONNECTIONS", "99999999999"),
    ] {
        let err = Config::from_vars(&vars(&[(name, bad)]), Mode::Dev).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{name}={bad}: {err}");
        assert!(err.problems[0].starts_with(name), "{name}={bad}: {err}");
    }
}

#[test]
fn dev_mode_needs_nothing() {
    let c = Config::from_vars(&HashMap::new(), Mode::Dev).unwrap();
    assert!(c.auth.secret_key_ephemeral);
    assert!(c.auth.secret_key_bytes().len() >= MIN_SECRET_BYTES);
    assert!(c.upstream.api_key.is_none());
    assert!(c.rate_limits.redis_url.is_none());
    assert!(c.docs_enabled());
    assert!(c.playground_enabled());
    assert_eq!(c.log.format, LogFormat::Pretty);
}

#[test]
fn dotenv_is_read_and_the_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(&path, "PORT=9001\nDEFAULT_MODEL=from-dotenv\n").unwrap();
    let c = Config::load_from(&path, [("PORT".to_owned(), "9002".to_owned())], Mode::Dev).unwrap();
    assert_eq!(c.server.port, 9002);
    assert_eq!(c.upstream.default_model, "from-dotenv");
}

#[test]
fn admin_commands_need_no_secrets() {
    assert!(Config::from_vars(&HashMap::new(), Mode::Admin).is_ok());
}

#[test]
fn debug_output_redacts_secrets() {
    let c = Config::from_vars(
        &vars(&[
            ("SECRET_KEY", KEY),
            ("OPENAI_API_KEY", "sk-very-secret"),
            ("DATABASE_URL", "postgres://u:hunter2@db/relay"),
        ]),
        Mode::Serve,
    )
    .unwrap();
    let text = format!("{c:?}");
    assert!(!text.contains(KEY));
    assert!(!text.contains("sk-very-secret"));
    assert!(!text.contains("hunter2"));
}

#[test]
fn a_short_secret_key_is_refused_in_debug_and_dev_too() {
    for (mode, debug) in [(Mode::Serve, "true"), (Mode::Dev, "false")] {
        let err = Config::from_vars(
            &vars(&[("SECRET_KEY", "too-short"), ("DEBUG", debug)]),
            mode,
        )
        .unwrap_err();
        assert!(err.to_string().contains("SECRET_KEY"), "{mode:?}: {err}");
    }
    // Only a missing key is replaced (for this process only).
    let c = Config::from_vars(&vars(&[("DEBUG", "true")]), Mode::Serve).unwrap();
    assert!(c.auth.secret_key_ephemeral);
}

#[test]
fn the_playground_is_on_in_dev_mode_or_when_asked_for() {
    let secrets = [("SECRET_KEY", KEY), ("OPENAI_API_KEY", "sk-test")];
    for (value, on) in [
        ("true", true),
        ("1", true),
        ("false", false),
        ("off", false),
    ] {
        let mut v = vars(&secrets);
        v.insert("PLAYGROUND".to_owned(), value.to_owned());
        let c = Config::from_vars(&v, Mode::Serve).unwrap();
        assert_eq!(c.playground_enabled(), on, "PLAYGROUND={value}");
        // The playground does not bring the docs with it.
        assert!(!c.docs_enabled());
    }
    let mut v = vars(&secrets);
    v.insert("PLAYGROUND".to_owned(), "sometimes".to_owned());
    let err = Config::from_vars(&v, Mode::Serve).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(err.problems[0].starts_with("PLAYGROUND"), "{err}");
}

#[test]
fn secrets_can_be_read_from_files_without_their_trailing_newline() {
    use secrecy::ExposeSecret as _;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret_key");
    let api_file = dir.path().join("openai_api_key");
    // `echo key > file` leaves one newline; a second one would be part of the secret.
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    std::fs::write(&api_file, "sk-from-a-file\r\n").unwrap();
    let c = Config::from_vars(
        &vars(&[
            ("SECRET_KEY_FILE", key_file.to_str().unwrap()),
            ("OPENAI_API_KEY_FILE", api_file.to_str().unwrap()),
        ]),
        Mode::Serve,
    )
    .unwrap();
    assert_eq!(c.auth.secret_key.expose_secret(), KEY);
    assert!(!c.auth.secret_key_ephemeral);
    assert_eq!(
        c.upstream.api_key.as_ref().unwrap().expose_secret(),
        "sk-from-a-file"
    );
}

#[test]
fn a_secret_set_twice_or_in_an_unreadable_file_is_named_without_its_value() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secret_key");
    std::fs::write(&key_file, KEY).unwrap();
    let missing = dir.path().join("no-such-file");
    let err = Config::from_vars(
        &vars(&[
            ("SECRET_KEY", KEY),
            ("SECRET_KEY_FILE", key_file.to_str().unwrap()),
            ("OPENAI_API_KEY_FILE", missing.to_str().unwrap()),
        ]),
        Mode::Serve,
    )
    .unwrap_err();
    assert_eq!(
        err.problems.len(),
        2,
        "one problem each, nothing about a missing key: {err}"
    );
    assert!(
        err.problems[0].starts_with("SECRET_KEY_FILE")
            && err.problems[0].contains("SECRET_KEY and SECRET_KEY_FILE are both set"),
        "{err}"
    );
    assert!(
        err.problems[1].starts_with("OPENAI_API_KEY_FILE")
            && err.problems[1].contains("no-such-file"),
        "{err}"
    );
    assert!(!err.to_string().contains(KEY), "{err}");
}

#[test]
fn a_weak_or_empty_secret_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let weak = dir.path().join("weak");
    let empty = dir.path().join("empty");
    std::fs::write(&weak, "weak-file-secret\n").unwrap();
    std::fs::write(&empty, "\n").unwrap();
    let err = Config::from_vars(
        &vars(&[
            ("SECRET_KEY_FILE", weak.to_str().unwrap()),
            ("OPENAI_API_KEY_FILE", empty.to_str().unwrap()),
        ]),
        Mode::Serve,
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 2, "{err}");
    assert!(
        err.problems[0].starts_with("SECRET_KEY_FILE: is too weak"),
        "{err}"
    );
    assert!(
        err.problems[1].starts_with("OPENAI_API_KEY_FILE") && err.problems[1].contains("empty")
    );
    assert!(!err.to_string().contains("weak-file-secret"), "{err}");
}
