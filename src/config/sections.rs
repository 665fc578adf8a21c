//! One function per section of the settings; each reads its variables and records its
//! problems on the shared [`Parser`].

use std::collections::HashMap;
use std::time::Duration;

use secrecy::SecretString;
use url::Url;

use super::parse::{Parser, check_origin, parse_list, random_secret};
use super::{
    AuthConfig, Database, Endpoint, Limit, LogConfig, LogFormat, MIN_SECRET_BYTES, MetricsConfig,
    Mode, Origins, RateLimits, ServerConfig, UpstreamConfig, UsageConfig,
};

/// The largest `MAX_CONNECTIONS` accepted: more than a process can have files open on Linux
/// by default (`fs.nr_open`, 1,048,576).
const MAX_CONNECTIONS_CEILING: usize = 1 << 20;

/// `HOST`, `PORT`, `ALLOWED_ORIGINS`, `MAX_REQUEST_BYTES`, `TRUST_PROXY_HEADERS`,
/// `SHUTDOWN_GRACE_SECONDS`, `REQUEST_BODY_TIMEOUT_SECONDS`, `MAX_CONNECTIONS`.
pub(super) fn server(p: &mut Parser<'_>) -> ServerConfig {
    let host = p.string("HOST", "127.0.0.1");
    if host.parse::<std::net::IpAddr>().is_err()
        && !host.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
    {
        p.problem(
            "HOST",
            format!("{host:?} is not an IP address or host name"),
        );
    }
    let port = p.parse("PORT", 8000u16, "is not a port number (0-65535)");
    let allowed_origins = match p.get("ALLOWED_ORIGINS") {
        None => Origins::List(vec!["http://localhost:3000".to_owned()]),
        Some(raw) => match parse_list(raw) {
            Ok(list) if list.iter().any(|o| o == "*") => Origins::Any,
            Ok(list) => {
                for origin in &list {
                    if let Err(why) = check_origin(origin) {
                        p.problem("ALLOWED_ORIGINS", format!("{origin:?} {why}"));
                    }
                }
                Origins::List(list)
            }
            Err(why) => {
                p.problem("ALLOWED_ORIGINS", why);
                Origins::List(Vec::new())
            }
        },
    };
    let max_request_bytes = p.parse(
        "MAX_REQUEST_BYTES",
        8_388_608usize,
        "is not a whole number of bytes",
    );
    if max_request_bytes == 0 {
        p.problem("MAX_REQUEST_BYTES", "must be at least 1");
    }
    let trust_proxy_headers = p.boolean("TRUST_PROXY_HEADERS", false);
    let grace = p.parse(
        "SHUTDOWN_GRACE_SECONDS",
        30u64,
        "is not a whole number of seconds",
    );
    let body_timeout = p.parse(
        "REQUEST_BODY_TIMEOUT_SECONDS",
        30.0f64,
        "is not a number of seconds",
    );
    if !(body_timeout > 0.0 && body_timeout <= 86_400.0) {
        p.problem(
            "REQUEST_BODY_TIMEOUT_SECONDS",
            "must be greater than 0 and at most 86400",
        );
    }
    let max_connections = p.parse(
        "MAX_CONNECTIONS",
        10_000usize,
        "is not a whole number of connections",
    );
    if !(1..=MAX_CONNECTIONS_CEILING).contains(&max_connections) {
        p.problem(
            "MAX_CONNECTIONS",
            format!("must be between 1 and {MAX_CONNECTIONS_CEILING}"),
        );
    }
    ServerConfig {
        host,
        port,
        allowed_origins,
        max_request_bytes,
        trust_proxy_headers,
        shutdown_grace: Duration::from_secs(grace),
        request_body_timeout: Duration::from_secs_f64(body_timeout.clamp(0.001, 86_400.0)),
        max_connections: max_connections.clamp(1, MAX_CONNECTIONS_CEILING),
    }
}

/// `SECRET_KEY` (or `SECRET_KEY_FILE`), `ACCESS_TOKEN_EXPIRE_MINUTES`, `REFRESH_TOKEN_EXPIRE_DAYS`. `relaxed` is dev or
/// debug mode, where a missing key is generated for the process; a key that is set but short
/// is refused in every mode that signs tokens (a weak key set by mistake must not go live).
pub(super) fn auth(p: &mut Parser<'_>, mode: Mode, relaxed: bool) -> AuthConfig {
    let file_problems = p.problems.len();
    let (secret_key, secret_key_ephemeral) = match p.secret("SECRET_KEY") {
        Some((key, _)) if key.len() >= MIN_SECRET_BYTES => (SecretString::from(key), false),
        Some((key, from)) => {
            if mode != Mode::Admin {
                p.problem(
                    &from,
                    format!(
                        "is too weak: {} bytes, at least {MIN_SECRET_BYTES} are required \
                         (generate one with `openssl rand -base64 48`)",
                        key.len()
                    ),
                );
            }
            (SecretString::from(String::new()), false)
        }
        // A broken SECRET_KEY_FILE was reported already: no second message for the same key.
        None if p.problems.len() > file_problems => (SecretString::from(String::new()), false),
        None => {
            if mode == Mode::Serve && !relaxed {
                p.problem(
                    "SECRET_KEY",
                    "is required (at least 32 bytes; generate one with `openssl rand -base64 48`; \
                     or name a file holding it in SECRET_KEY_FILE)",
                );
            }
            (random_secret(), true)
        }
    };
    let access_minutes = p.parse(
        "ACCESS_TOKEN_EXPIRE_MINUTES",
        30u64,
        "is not a whole number of minutes",
    );
    let refresh_days = p.parse(
        "REFRESH_TOKEN_EXPIRE_DAYS",
        7u64,
        "is not a whole number of days",
    );
    if !(1..=525_600).contains(&access_minutes) {
        p.problem(
            "ACCESS_TOKEN_EXPIRE_MINUTES",
            "must be between 1 and 525600 (a year)",
        );
    }
    if !(1..=3650).contains(&refresh_days) {
        p.problem(
            "REFRESH_TOKEN_EXPIRE_DAYS",
            "must be between 1 and 3650 (ten years)",
        );
    }
    let registration_open = match p
        .get("REGISTRATION")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("open") => true,
        Some("closed") => false,
        Some(_) => {
            p.problem("REGISTRATION", "must be open or closed");
            false
        }
    };
    let registration_domains =
        p.get("REGISTRATION_EMAIL_DOMAINS")
            .and_then(|raw| match parse_list(raw) {
                Ok(list) if list.is_empty() => None,
                Ok(list) => {
                    let list: Vec<String> = list
                        .iter()
                        .map(|d| d.trim().trim_start_matches('@').to_ascii_lowercase())
                        .collect();
                    if let Some(bad) = list
                        .iter()
                        .find(|d| d.is_empty() || !d.contains('.') || d.contains(['@', ' ', '/']))
                    {
                        p.problem(
                            "REGISTRATION_EMAIL_DOMAINS",
                            format!("{bad:?} is not a domain like example.com"),
                        );
                    }
                    Some(list)
                }
                Err(why) => {
                    p.problem("REGISTRATION_EMAIL_DOMAINS", why);
                    None
                }
            });
    AuthConfig {
        secret_key,
        secret_key_ephemeral,
        access_token_ttl: Duration::from_secs(access_minutes.clamp(1, 525_600) * 60),
        refresh_token_ttl: Duration::from_secs(refresh_days.clamp(1, 3650) * 86_400),
        registration_open,
        registration_domains,
    }
}

/// `OPENAI_API_KEY` (or `OPENAI_API_KEY_FILE`), `OPENAI_BASE_URL`, `UPSTREAM_TIMEOUT_SECONDS`, `DEFAULT_MODEL`,
/// `ALLOWED_MODELS`.
pub(super) fn upstream(p: &mut Parser<'_>, mode: Mode, relaxed: bool) -> UpstreamConfig {
    let file_problems = p.problems.len();
    let api_key = p
        .secret("OPENAI_API_KEY")
        .map(|(key, _)| SecretString::from(key));
    // A broken OPENAI_API_KEY_FILE was reported already.
    if api_key.is_none() && p.problems.len() == file_problems && mode == Mode::Serve && !relaxed {
        p.problem("OPENAI_API_KEY", "is required (the upstream API key)");
    }
    let base_url = p.url("OPENAI_BASE_URL", "https://api.openai.com/v1");
    let timeout_secs = p.parse(
        "UPSTREAM_TIMEOUT_SECONDS",
        60.0f64,
        "is not a number of seconds",
    );
    if !(timeout_secs > 0.0 && timeout_secs <= 86_400.0) {
        p.problem(
            "UPSTREAM_TIMEOUT_SECONDS",
            "must be greater than 0 and at most 86400",
        );
    }
    let default_model = p.string("DEFAULT_MODEL", "gpt-4o-mini");
    let allowed_models = p
        .get("ALLOWED_MODELS")
        .and_then(|raw| match parse_list(raw) {
            Ok(list) if list.is_empty() => None,
            Ok(list) => Some(list),
            Err(why) => {
                p.problem("ALLOWED_MODELS", why);
                None
            }
        });
    UpstreamConfig {
        base_url,
        api_key,
        timeout: Duration::from_secs_f64(timeout_secs.clamp(0.001, 86_400.0)),
        default_model,
        allowed_models,
    }
}

/// `RATE_LIMIT_*` and `REDIS_URL` (unused in dev mode: memory limits only).
pub(super) fn limits(p: &mut Parser<'_>, dev: bool) -> RateLimits {
    let global = p.limit("RATE_LIMIT_REQUESTS", "RATE_LIMIT_WINDOW", None);
    let mut overrides = HashMap::new();
    for endpoint in Endpoint::ALL {
        let req = format!("RATE_LIMIT_{}_REQUESTS", endpoint.name());
        let win = format!("RATE_LIMIT_{}_WINDOW", endpoint.name());
        if p.get(&req).is_some() || p.get(&win).is_some() {
            overrides.insert(endpoint, p.limit(&req, &win, Some(global)));
        }
    }
    let redis_budget_ms = p.parse(
        "RATE_LIMIT_REDIS_TIMEOUT_MS",
        50u64,
        "is not a whole number of milliseconds",
    );
    if !(1..=10_000).contains(&redis_budget_ms) {
        p.problem("RATE_LIMIT_REDIS_TIMEOUT_MS", "must be between 1 and 10000");
    }
    let key_prefix = p.string("RATE_LIMIT_KEY_PREFIX", "relay");
    if !key_prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        p.problem(
            "RATE_LIMIT_KEY_PREFIX",
            "may only hold letters, digits and - _ . :",
        );
    }
    // Set but empty means "no Redis": in-memory limits only.
    let redis_url = if p.set_but_empty("REDIS_URL") {
        String::new()
    } else {
        p.string("REDIS_URL", "redis://localhost:6379/0")
    };
    if !redis_url.is_empty() {
        match Url::parse(&redis_url) {
            Ok(u) if matches!(u.scheme(), "redis" | "rediss" | "redis+unix" | "unix") => {}
            Ok(u) => p.problem(
                "REDIS_URL",
                format!(
                    "has scheme {:?}; expected redis:// or rediss://",
                    u.scheme()
                ),
            ),
            Err(e) => p.problem("REDIS_URL", format!("is not a URL ({e})")),
        }
    }
    let token_limit: u32 = p.parse("TOKEN_LIMIT", 0, "is not a whole number of tokens");
    let tokens = (token_limit > 0).then(|| {
        p.limit(
            "TOKEN_LIMIT",
            "TOKEN_LIMIT_WINDOW",
            Some(Limit {
                requests: token_limit,
                window: Duration::from_secs(86_400),
            }),
        )
    });
    let max_output_tokens: u32 =
        p.parse("MAX_OUTPUT_TOKENS", 4096, "is not a whole number of tokens");
    if max_output_tokens == 0 {
        p.problem("MAX_OUTPUT_TOKENS", "must be at least 1");
    }
    RateLimits {
        global,
        overrides,
        redis_budget: Duration::from_millis(redis_budget_ms),
        key_prefix,
        redis_url: (!dev && !redis_url.is_empty()).then_some(redis_url),
        tokens,
        max_output_tokens,
    }
}

/// `DATABASE_URL`. A broken URL still yields a value (so that other problems are collected).
pub(super) fn database(p: &mut Parser<'_>) -> Database {
    let url = p.string("DATABASE_URL", "sqlite://./app.db");
    Database::from_url(&url).unwrap_or_else(|why| {
        p.problem("DATABASE_URL", why);
        Database::Sqlite("./app.db".into())
    })
}

/// `LOG_LEVEL`, `LOG_FORMAT` (pretty by default in dev/debug mode, JSON otherwise).
pub(super) fn logging(p: &mut Parser<'_>, relaxed: bool) -> LogConfig {
    let level = p.string("LOG_LEVEL", "info");
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        p.problem(
            "LOG_LEVEL",
            format!("{level:?} is not a level (trace, debug, info, warn, error) or filter"),
        );
    }
    let format = match p.get("LOG_FORMAT").map(str::to_ascii_lowercase).as_deref() {
        None if relaxed => LogFormat::Pretty,
        None => LogFormat::Json,
        Some("json") => LogFormat::Json,
        Some("pretty") | Some("text") => LogFormat::Pretty,
        Some(other) => {
            p.problem(
                "LOG_FORMAT",
                format!("{other:?} is not a format; use json or pretty"),
            );
            LogFormat::Json
        }
    };
    LogConfig { level, format }
}

/// The longest retention that is not "forever" (a century).
const MAX_RETENTION_DAYS: u32 = 36_500;

/// `USAGE_RETENTION_DAYS` (default 400: a year and a bit, for year-over-year bills).
pub(super) fn usage(p: &mut Parser<'_>) -> UsageConfig {
    let retention_days = p.parse(
        "USAGE_RETENTION_DAYS",
        400,
        "must be a whole number of days (0 keeps records forever)",
    );
    if retention_days > MAX_RETENTION_DAYS {
        p.problem(
            "USAGE_RETENTION_DAYS",
            format!("{retention_days} is more than {MAX_RETENTION_DAYS} days; use 0 to keep records forever"),
        );
    }
    UsageConfig { retention_days }
}

/// `METRICS_ENABLED`, `METRICS_TOKEN`.
pub(super) fn metrics(p: &mut Parser<'_>) -> MetricsConfig {
    let enabled = p.boolean("METRICS_ENABLED", true);
    let token = p.get("METRICS_TOKEN").filter(|t| !t.is_empty()).map(|t| {
        if t.len() < 16 {
            p.problem(
                "METRICS_TOKEN",
                "is too short: at least 16 characters (or unset for an open /metrics)",
            );
        }
        SecretString::from(t.to_owned())
    });
    MetricsConfig { enabled, token }
}
