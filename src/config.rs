//! Settings: read from the environment and a `.env` file, validated all at once.
//!
//! Loading never stops at the first problem: every bad or missing setting is collected so that
//! an operator fixes them in one go. Secret values are kept in [`SecretString`] and never appear
//! in an error message or a log line.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

/// The smallest `SECRET_KEY` accepted outside dev mode, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// How start-up should treat missing secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `relay serve`: secrets are required unless `DEBUG=true`.
    Serve,
    /// `relay serve --dev`: zero setup, ephemeral secrets, in-memory limits.
    Dev,
    /// `relay migrate`, `relay user create`: no secrets needed.
    Admin,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

/// The endpoints that can have their own rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /auth/login`
    Login,
    /// `POST /auth/register`
    Register,
    /// `POST /auth/refresh`
    Refresh,
    /// `POST /chat/completions` and `/chat/completions/stream`
    Chat,
    /// `GET /models` and `/chat/models`
    Models,
}

impl Endpoint {
    /// Every endpoint, in a fixed order.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::Login,
        Endpoint::Register,
        Endpoint::Refresh,
        Endpoint::Chat,
        Endpoint::Models,
    ];

    /// The name used in `RATE_LIMIT_<NAME>_REQUESTS` and in rate-limit keys.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Login => "LOGIN",
            Endpoint::Register => "REGISTER",
            Endpoint::Refresh => "REFRESH",
            Endpoint::Chat => "CHAT",
            Endpoint::Models => "MODELS",
        }
    }
}

/// One token bucket's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Bucket capacity (requests).
    pub requests: u32,
    /// Seconds in which an empty bucket refills completely.
    pub window: Duration,
}

/// The rate-limit settings: a global limit and per-endpoint overrides.
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// `RATE_LIMIT_REQUESTS` / `RATE_LIMIT_WINDOW`.
    pub global: Limit,
    /// Endpoints with their own `RATE_LIMIT_<ENDPOINT>_*` settings.
    pub overrides: HashMap<Endpoint, Limit>,
    /// `RATE_LIMIT_REDIS_TIMEOUT_MS`: how long a decision waits for Redis before memory decides.
    pub redis_budget: Duration,
}

impl RateLimits {
    /// The limit that applies to `endpoint`.
    pub fn for_endpoint(&self, endpoint: Endpoint) -> Limit {
        self.overrides
            .get(&endpoint)
            .copied()
            .unwrap_or(self.global)
    }
}

/// CORS origins.
#[derive(Debug, Clone, PartialEq)]
pub enum Origins {
    /// `*`: any origin (no credentials are used, so this is safe but broad).
    Any,
    /// Exactly these origins.
    List(Vec<String>),
}

/// Where the upstream is and how to reach it.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// `OPENAI_BASE_URL`, without a trailing slash.
    pub base_url: Url,
    /// `OPENAI_API_KEY`; `None` only in dev/debug mode, where the built-in mock answers.
    pub api_key: Option<SecretString>,
    /// `UPSTREAM_TIMEOUT_SECONDS`: first byte, and between stream chunks.
    pub timeout: Duration,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Every setting relay reads. Built once at start-up and passed down.
#[derive(Clone)]
pub struct Config {
    /// `HOST`.
    pub host: String,
    /// `PORT` (0 picks a free port, which tests use).
    pub port: u16,
    /// `DEBUG`.
    pub debug: bool,
    /// `--dev` was given.
    pub dev: bool,
    /// `SECRET_KEY`: the HS256 key.
    pub secret_key: SecretString,
    /// Whether `secret_key` was generated for this process only (dev/debug without a key).
    pub secret_key_ephemeral: bool,
    /// Whether a `SECRET_KEY` under 32 bytes was accepted (dev/debug only; warned at start-up).
    pub secret_key_weak: bool,
    /// Upstream settings.
    pub upstream: UpstreamConfig,
    /// `DEFAULT_MODEL`.
    pub default_model: String,
    /// `ALLOWED_MODELS`; `None` allows every model.
    pub allowed_models: Option<Vec<String>>,
    /// `ALLOWED_ORIGINS`.
    pub allowed_origins: Origins,
    /// `RATE_LIMIT_*`.
    pub rate_limits: RateLimits,
    /// `RATE_LIMIT_KEY_PREFIX`: namespace of relay's keys in a shared Redis.
    pub rate_limit_prefix: String,
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `REDIS_URL`; `None` in dev mode (memory limits only).
    pub redis_url: Option<String>,
    /// `ACCESS_TOKEN_EXPIRE_MINUTES`.
    pub access_token_ttl: Duration,
    /// `REFRESH_TOKEN_EXPIRE_DAYS`.
    pub refresh_token_ttl: Duration,
    /// `MAX_REQUEST_BYTES`.
    pub max_request_bytes: usize,
    /// `TRUST_PROXY_HEADERS`.
    pub trust_proxy_headers: bool,
    /// `LOG_LEVEL` (an `EnvFilter` directive).
    pub log_level: String,
    /// `LOG_FORMAT`.
    pub log_format: LogFormat,
    /// `SHUTDOWN_GRACE_SECONDS`.
    pub shutdown_grace: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("debug", &self.debug)
            .field("dev", &self.dev)
            .field("secret_key", &"[redacted]")
            .field("upstream", &self.upstream)
            .field("default_model", &self.default_model)
            .field("allowed_models", &self.allowed_models)
            .field("allowed_origins", &self.allowed_origins)
            .field("rate_limits", &self.rate_limits)
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .finish_non_exhaustive()
    }
}

/// Every problem found while loading settings, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `VARIABLE: what is wrong`, one per problem.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "relay cannot start: the configuration has problems:")?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        write!(
            f,
            "Set them in the environment or in .env (see .env.example), or run `relay serve --dev`."
        )
    }
}

impl std::error::Error for ConfigError {}

/// Replaces a URL's password with `***` so that it can be logged.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}

impl Config {
    /// Loads settings from the process environment over `./.env` over defaults.
    pub fn load(mode: Mode) -> Result<Config, ConfigError> {
        // Variables that are not UTF-8 cannot be relay's settings; skip them instead of
        // panicking as `std::env::vars` would.
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        Self::load_from(Path::new(".env"), env, mode)
    }

    /// Loads settings from `env` over the dotenv file at `dotenv_path` (if it exists).
    pub fn load_from(
        dotenv_path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
        mode: Mode,
    ) -> Result<Config, ConfigError> {
        let mut vars = HashMap::new();
        if dotenv_path.exists() {
            let iter = dotenvy::from_path_iter(dotenv_path).map_err(|e| ConfigError {
                problems: vec![dotenv_problem(dotenv_path, &e)],
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| ConfigError {
                    problems: vec![dotenv_problem(dotenv_path, &e)],
                })?;
                vars.insert(k, v);
            }
        }
        vars.extend(env);
        Self::from_vars(&vars, mode)
    }

    /// Builds a configuration from a map of variables (tests call this directly).
    pub fn from_vars(vars: &HashMap<String, String>, mode: Mode) -> Result<Config, ConfigError> {
        let mut p = Parser {
            vars,
            problems: Vec::new(),
        };
        let dev = mode == Mode::Dev;

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
        let debug = p.boolean("DEBUG", false);
        let relaxed = dev || debug;

        let mut weak_secret_allowed = false;
        let (secret_key, secret_key_ephemeral) = match p.get("SECRET_KEY") {
            Some(key) if key.len() >= MIN_SECRET_BYTES => {
                (SecretString::from(key.to_owned()), false)
            }
            Some(key) if relaxed => {
                weak_secret_allowed = true;
                (SecretString::from(key.to_owned()), false)
            }
            Some(key) => {
                if mode != Mode::Admin {
                    p.problem(
                        "SECRET_KEY",
                        format!(
                            "is too weak: {} bytes, at least {MIN_SECRET_BYTES} are required \
                             (generate one with `openssl rand -base64 48`)",
                            key.len()
                        ),
                    );
                }
                (SecretString::from(String::new()), false)
            }
            None => {
                if mode == Mode::Serve && !relaxed {
                    p.problem(
                        "SECRET_KEY",
                        "is required (at least 32 bytes; generate one with `openssl rand -base64 48`)",
                    );
                }
                (random_secret(), true)
            }
        };

        let api_key = p
            .get("OPENAI_API_KEY")
            .map(|k| SecretString::from(k.to_owned()));
        if api_key.is_none() && mode == Mode::Serve && !relaxed {
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
        let rate_limit_prefix = p.string("RATE_LIMIT_KEY_PREFIX", "relay");
        if !rate_limit_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            p.problem(
                "RATE_LIMIT_KEY_PREFIX",
                "may only hold letters, digits and - _ . :",
            );
        }
        let database_url = p.string("DATABASE_URL", "sqlite://./app.db");
        match crate::store::DatabaseKind::of_url(&database_url) {
            Err(why) => p.problem("DATABASE_URL", why),
            Ok(crate::store::DatabaseKind::Postgres) => {
                if let Err(e) = database_url.parse::<sqlx::postgres::PgConnectOptions>() {
                    p.problem(
                        "DATABASE_URL",
                        format!(
                            "is not a valid PostgreSQL URL ({})",
                            redact_url(&e.to_string())
                        ),
                    );
                }
            }
            Ok(crate::store::DatabaseKind::Sqlite(_)) => {}
        }
        // Set but empty means "no Redis": in-memory limits only.
        let redis_url = match vars.get("REDIS_URL").map(|v| v.trim()) {
            Some("") => String::new(),
            _ => p.string("REDIS_URL", "redis://localhost:6379/0"),
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
        let redis_url = (!dev && !redis_url.is_empty()).then_some(redis_url);

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
        let max_request_bytes = p.parse(
            "MAX_REQUEST_BYTES",
            8_388_608usize,
            "is not a whole number of bytes",
        );
        if max_request_bytes == 0 {
            p.problem("MAX_REQUEST_BYTES", "must be at least 1");
        }
        let trust_proxy_headers = p.boolean("TRUST_PROXY_HEADERS", false);
        let log_level = p.string("LOG_LEVEL", "info");
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            p.problem(
                "LOG_LEVEL",
                format!("{log_level:?} is not a level (trace, debug, info, warn, error) or filter"),
            );
        }
        let log_format = match p.get("LOG_FORMAT").map(str::to_ascii_lowercase).as_deref() {
            None => {
                if debug || dev {
                    LogFormat::Pretty
                } else {
                    LogFormat::Json
                }
            }
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
        let grace = p.parse(
            "SHUTDOWN_GRACE_SECONDS",
            30u64,
            "is not a whole number of seconds",
        );

        if !p.problems.is_empty() {
            return Err(ConfigError {
                problems: p.problems,
            });
        }
        Ok(Config {
            host,
            port,
            debug,
            dev,
            secret_key,
            secret_key_ephemeral,
            secret_key_weak: weak_secret_allowed,
            upstream: UpstreamConfig {
                base_url,
                api_key,
                timeout: Duration::from_secs_f64(timeout_secs.clamp(0.001, 86_400.0)),
            },
            default_model,
            allowed_models,
            allowed_origins,
            rate_limits: RateLimits {
                global,
                overrides,
                redis_budget: Duration::from_millis(redis_budget_ms),
            },
            rate_limit_prefix,
            database_url,
            redis_url,
            access_token_ttl: Duration::from_secs(access_minutes.clamp(1, 525_600) * 60),
            refresh_token_ttl: Duration::from_secs(refresh_days.clamp(1, 3650) * 86_400),
            max_request_bytes,
            trust_proxy_headers,
            log_level,
            log_format,
            shutdown_grace: Duration::from_secs(grace),
        })
    }

    /// Whether interactive docs (`/docs`, `/openapi.json`) are served.
    pub fn docs_enabled(&self) -> bool {
        self.debug || self.dev
    }

    /// The secret key's bytes, for the JWT module only.
    pub fn secret_key_bytes(&self) -> &[u8] {
        self.secret_key.expose_secret().as_bytes()
    }
}

/// Describes a `.env` error without quoting the file: its lines may hold secrets.
fn dotenv_problem(path: &Path, err: &dotenvy::Error) -> String {
    match err {
        dotenvy::Error::LineParse(_, _) => format!(
            "{}: cannot be parsed (a malformed line, e.g. an unclosed quote; its content is not \
             shown because it may hold a secret)",
            path.display()
        ),
        dotenvy::Error::Io(e) => format!("{}: cannot be read: {e}", path.display()),
        _ => format!("{}: cannot be read", path.display()),
    }
}

fn random_secret() -> SecretString {
    let mut bytes = [0u8; 48];
    rand::rng().fill_bytes(&mut bytes);
    SecretString::from(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Parses a JSON list (`["a","b"]`) or a comma list (`a, b`); blanks are dropped.
pub fn parse_list(raw: &str) -> Result<Vec<String>, String> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        let list: Vec<String> = serde_json::from_str(trimmed)
            .map_err(|e| format!("is not a JSON list of strings ({e})"))?;
        Ok(list
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect())
    } else {
        Ok(trimmed
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect())
    }
}

fn check_origin(origin: &str) -> Result<(), &'static str> {
    let url = Url::parse(origin).map_err(|_| "is not an origin like https://app.example.com")?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("is not an http(s) origin");
    }
    if url.path() != "/" || origin.ends_with('/') || url.query().is_some() {
        return Err("must be scheme://host[:port] with no path or trailing slash");
    }
    Ok(())
}

struct Parser<'a> {
    vars: &'a HashMap<String, String>,
    problems: Vec<String>,
}

impl<'a> Parser<'a> {
    /// A set, non-blank value.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn problem(&mut self, name: &str, why: impl fmt::Display) {
        self.problems.push(format!("{name}: {why}"));
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_owned()
    }

    fn parse<T: std::str::FromStr>(&mut self, name: &str, default: T, why: &str) -> T {
        match self.get(name) {
            None => default,
            Some(raw) => match raw.parse() {
                Ok(v) => v,
                Err(_) => {
                    self.problem(name, format!("{raw:?} {why}"));
                    default
                }
            },
        }
    }

    fn boolean(&mut self, name: &str, default: bool) -> bool {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(other) => {
                self.problem(name, format!("{other:?} is not a boolean (true or false)"));
                default
            }
        }
    }

    fn url(&mut self, name: &str, default: &str) -> Url {
        let raw = self.get(name).unwrap_or(default).trim_end_matches('/');
        match Url::parse(raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
            Ok(url) => {
                self.problem(
                    name,
                    format!(
                        "{raw:?} has scheme {:?}; expected http or https",
                        url.scheme()
                    ),
                );
                Url::parse(default).unwrap_or(url)
            }
            Err(e) => {
                self.problem(name, format!("{raw:?} is not a URL with a scheme ({e})"));
                #[allow(clippy::expect_used)]
                Url::parse("http://invalid.invalid").expect("static URL parses")
            }
        }
    }

    fn limit(&mut self, req_name: &str, win_name: &str, fallback: Option<Limit>) -> Limit {
        let fallback = fallback.unwrap_or(Limit {
            requests: 100,
            window: Duration::from_secs(3600),
        });
        let requests = self.parse(
            req_name,
            fallback.requests,
            "is not a whole number of requests",
        );
        let window = self.parse(
            win_name,
            fallback.window.as_secs(),
            "is not a whole number of seconds",
        );
        if requests == 0 {
            self.problem(req_name, "must be at least 1");
        }
        if window == 0 {
            self.problem(win_name, "must be at least 1 second");
        }
        if u128::from(requests) * u128::from(window) * 1000
            > u128::from(crate::ratelimit::bucket::MAX_UNITS)
        {
            self.problem(
                req_name,
                format!("× {win_name} is too large (requests × window in ms must stay under 2^53)"),
            );
        }
        Limit {
            requests,
            window: Duration::from_secs(window.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.port, 8000);
        assert_eq!(c.upstream.base_url.as_str(), "https://api.openai.com/v1");
        assert_eq!(c.default_model, "gpt-4o-mini");
        assert_eq!(
            c.allowed_origins,
            Origins::List(vec!["http://localhost:3000".into()])
        );
        assert_eq!(c.rate_limits.global.requests, 100);
        assert_eq!(c.rate_limits.global.window, Duration::from_secs(3600));
        assert_eq!(c.database_url, "sqlite://./app.db");
        assert_eq!(c.access_token_ttl, Duration::from_secs(1800));
        assert_eq!(c.refresh_token_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(c.max_request_bytes, 8_388_608);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(!c.docs_enabled());
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
                c.allowed_origins,
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
    fn dev_mode_needs_nothing() {
        let c = Config::from_vars(&HashMap::new(), Mode::Dev).unwrap();
        assert!(c.secret_key_ephemeral);
        assert!(c.secret_key_bytes().len() >= MIN_SECRET_BYTES);
        assert!(c.upstream.api_key.is_none());
        assert!(c.redis_url.is_none());
        assert!(c.docs_enabled());
        assert_eq!(c.log_format, LogFormat::Pretty);
    }

    #[test]
    fn dotenv_is_read_and_the_environment_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "PORT=9001\nDEFAULT_MODEL=from-dotenv\n").unwrap();
        let c =
            Config::load_from(&path, [("PORT".to_owned(), "9002".to_owned())], Mode::Dev).unwrap();
        assert_eq!(c.port, 9002);
        assert_eq!(c.default_model, "from-dotenv");
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
}
