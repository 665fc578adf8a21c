//! Settings: read from the environment and a `.env` file, validated all at once, kept as plain
//! data that the layers above receive (this module imports nothing from them).
//!
//! Loading never stops at the first problem: every bad or missing setting is collected so that
//! an operator fixes them in one go. Secret values are kept in [`SecretString`] and never appear
//! in an error message or a log line. `sections.rs` reads one section each; `parse.rs` holds the
//! shared parsing helpers; `database.rs` parses `DATABASE_URL` once, for the store.

mod database;
mod parse;
mod sections;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

pub use database::Database;
pub use parse::{parse_list, redact_url};

/// The largest `requests × window in ms` of a limit: the bucket arithmetic (in Rust and in the
/// Redis Lua script, whose numbers are doubles) is exact below 2^53.
pub const MAX_LIMIT_UNITS: u64 = 1 << 53;

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
    /// `GET /auth/me` and `POST /auth/logout`: the caller's own account
    Account,
}

impl Endpoint {
    /// Every endpoint, in a fixed order.
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Login,
        Endpoint::Register,
        Endpoint::Refresh,
        Endpoint::Chat,
        Endpoint::Models,
        Endpoint::Account,
    ];

    /// The name used in `RATE_LIMIT_<NAME>_REQUESTS` and in rate-limit keys.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Login => "LOGIN",
            Endpoint::Register => "REGISTER",
            Endpoint::Refresh => "REFRESH",
            Endpoint::Chat => "CHAT",
            Endpoint::Models => "MODELS",
            Endpoint::Account => "ACCOUNT",
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

/// The rate-limit settings: a global limit, per-endpoint overrides, and where buckets live.
#[derive(Debug, Clone)]
pub struct RateLimits {
    /// `RATE_LIMIT_REQUESTS` / `RATE_LIMIT_WINDOW`.
    pub global: Limit,
    /// Endpoints with their own `RATE_LIMIT_<ENDPOINT>_*` settings.
    pub overrides: HashMap<Endpoint, Limit>,
    /// `RATE_LIMIT_REDIS_TIMEOUT_MS`: how long a decision waits for Redis before memory decides.
    pub redis_budget: Duration,
    /// `RATE_LIMIT_KEY_PREFIX`: namespace of relay's keys in a shared Redis.
    pub key_prefix: String,
    /// `REDIS_URL`; `None` in dev mode or when set empty (memory limits only).
    pub redis_url: Option<String>,
    /// `TOKEN_LIMIT` tokens per `TOKEN_LIMIT_WINDOW` seconds, per user; `None` when
    /// `TOKEN_LIMIT` is 0 (the default: no token limit).
    pub tokens: Option<Limit>,
    /// `MAX_OUTPUT_TOKENS`: the output cap relay sets on a request that names none, when a
    /// token limit applies (its worst case must be bounded).
    pub max_output_tokens: u32,
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

/// Where the upstream is, how to reach it, and which models clients may ask for.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// `OPENAI_BASE_URL`, without a trailing slash.
    pub base_url: Url,
    /// `OPENAI_API_KEY`; `None` only in dev/debug mode, where the built-in mock answers.
    pub api_key: Option<SecretString>,
    /// `UPSTREAM_TIMEOUT_SECONDS`: first byte, and between stream chunks.
    pub timeout: Duration,
    /// `DEFAULT_MODEL`: used when a request names none.
    pub default_model: String,
    /// `ALLOWED_MODELS`; `None` allows every model.
    pub allowed_models: Option<Vec<String>>,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("timeout", &self.timeout)
            .field("default_model", &self.default_model)
            .field("allowed_models", &self.allowed_models)
            .finish()
    }
}

/// The listener and what every HTTP request shares.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `HOST`.
    pub host: String,
    /// `PORT` (0 picks a free port, which tests use).
    pub port: u16,
    /// `ALLOWED_ORIGINS`.
    pub allowed_origins: Origins,
    /// `MAX_REQUEST_BYTES`.
    pub max_request_bytes: usize,
    /// `TRUST_PROXY_HEADERS`.
    pub trust_proxy_headers: bool,
    /// `SHUTDOWN_GRACE_SECONDS`.
    pub shutdown_grace: Duration,
    /// `REQUEST_BODY_TIMEOUT_SECONDS`: how long a request's whole body may take to arrive.
    pub request_body_timeout: Duration,
    /// `MAX_CONNECTIONS`: client connections served at once (the accept loop may lower it
    /// to fit the process's file limit).
    pub max_connections: usize,
}

impl ServerConfig {
    /// Where a process on this machine reaches this listener's `GET /api/v1/health`: the
    /// loopback address when relay listens on every address (`0.0.0.0`, `::`), else `HOST`.
    pub fn health_url(&self) -> String {
        let host = match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
            Ok(ip) if ip.is_unspecified() => "[::1]".to_owned(),
            Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        format!("http://{host}:{}/api/v1/health", self.port)
    }
}

/// The token signing key and token lifetimes.
#[derive(Clone)]
pub struct AuthConfig {
    /// `SECRET_KEY`: the HS256 key.
    pub secret_key: SecretString,
    /// Whether `secret_key` was generated for this process only (dev/debug without a key).
    pub secret_key_ephemeral: bool,
    /// `ACCESS_TOKEN_EXPIRE_MINUTES`.
    pub access_token_ttl: Duration,
    /// `REFRESH_TOKEN_EXPIRE_DAYS`.
    pub refresh_token_ttl: Duration,
    /// `REGISTRATION`: whether anyone may register (`open`) or only admins create users.
    pub registration_open: bool,
    /// `REGISTRATION_EMAIL_DOMAINS`: if set, the only email domains that may register
    /// (lower-cased; sub-domains are not implied).
    pub registration_domains: Option<Vec<String>>,
}

impl AuthConfig {
    /// The secret key's bytes, for the JWT module only.
    pub fn secret_key_bytes(&self) -> &[u8] {
        self.secret_key.expose_secret().as_bytes()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret_key", &"[redacted]")
            .field("secret_key_ephemeral", &self.secret_key_ephemeral)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("refresh_token_ttl", &self.refresh_token_ttl)
            .field("registration_open", &self.registration_open)
            .field("registration_domains", &self.registration_domains)
            .finish_non_exhaustive()
    }
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `LOG_LEVEL` (an `EnvFilter` directive).
    pub level: String,
    /// `LOG_FORMAT`.
    pub format: LogFormat,
}

/// Usage records.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// `USAGE_RETENTION_DAYS`: records older than this are purged (hourly); 0 keeps them all.
    pub retention_days: u32,
}

/// `GET /metrics`.
#[derive(Clone)]
pub struct MetricsConfig {
    /// `METRICS_ENABLED`: record metrics and serve `/metrics` (`false`: neither).
    pub enabled: bool,
    /// `METRICS_TOKEN`: when set, `/metrics` needs `Authorization: Bearer <token>`.
    pub token: Option<SecretString>,
}

impl fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("enabled", &self.enabled)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

/// Every setting relay reads. Built once at start-up and passed down, a section to each part.
#[derive(Clone)]
pub struct Config {
    /// `DEBUG`.
    pub debug: bool,
    /// `--dev` was given.
    pub dev: bool,
    /// `PLAYGROUND`: serve the playground page at `/` (always on in dev mode).
    pub playground: bool,
    /// Listener, CORS, body size, proxy headers, shutdown.
    pub server: ServerConfig,
    /// Signing key and token lifetimes.
    pub auth: AuthConfig,
    /// The upstream and its models.
    pub upstream: UpstreamConfig,
    /// `RATE_LIMIT_*` and `REDIS_URL`.
    pub rate_limits: RateLimits,
    /// `DATABASE_URL`, parsed.
    pub database: Database,
    /// `LOG_LEVEL`, `LOG_FORMAT`.
    pub log: LogConfig,
    /// `USAGE_RETENTION_DAYS`.
    pub usage: UsageConfig,
    /// `METRICS_ENABLED`, `METRICS_TOKEN`.
    pub metrics: MetricsConfig,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("debug", &self.debug)
            .field("dev", &self.dev)
            .field("playground", &self.playground)
            .field("server", &self.server)
            .field("auth", &self.auth)
            .field("upstream", &self.upstream)
            .field("rate_limits.global", &self.rate_limits.global)
            .field(
                "redis_url",
                &self.rate_limits.redis_url.as_deref().map(redact_url),
            )
            .field("database", &self.database)
            .field("log", &self.log)
            .field("usage", &self.usage)
            .field("metrics", &self.metrics)
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
                problems: vec![parse::dotenv_problem(dotenv_path, &e)],
            })?;
            for item in iter {
                let (k, v) = item.map_err(|e| ConfigError {
                    problems: vec![parse::dotenv_problem(dotenv_path, &e)],
                })?;
                vars.insert(k, v);
            }
        }
        vars.extend(env);
        Self::from_vars(&vars, mode)
    }

    /// Builds a configuration from a map of variables (tests call this directly).
    pub fn from_vars(vars: &HashMap<String, String>, mode: Mode) -> Result<Config, ConfigError> {
        let mut p = parse::Parser::new(vars);
        let dev = mode == Mode::Dev;
        let debug = p.boolean("DEBUG", false);
        let relaxed = dev || debug;
        let config = Config {
            debug,
            dev,
            playground: p.boolean("PLAYGROUND", false),
            server: sections::server(&mut p),
            auth: sections::auth(&mut p, mode, relaxed),
            upstream: sections::upstream(&mut p, mode, relaxed),
            rate_limits: sections::limits(&mut p, dev),
            database: sections::database(&mut p),
            log: sections::logging(&mut p, relaxed),
            usage: sections::usage(&mut p),
            metrics: sections::metrics(&mut p),
        };
        if p.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: p.problems,
            })
        }
    }

    /// Whether interactive docs (`/docs`, `/openapi.json`) are served.
    pub fn docs_enabled(&self) -> bool {
        self.debug || self.dev
    }

    /// Whether the playground page (`/`, `/playground.js`, `/playground.css`) is served.
    pub fn playground_enabled(&self) -> bool {
        self.playground || self.dev
    }
}

#[cfg(test)]
mod tests;
