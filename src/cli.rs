//! Command-line definitions (clap derive only; the work happens in `main.rs` and `app.rs`).

use clap::{Args, Parser, Subcommand};

/// relay: an OpenAI API relay with users, JWTs, streaming and shared rate limits.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then run the server (the default).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Run the built-in OpenAI-compatible mock upstream (for development and benchmarks).
    MockUpstream(MockArgs),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Ask a running relay for `GET /api/v1/health`: exit 0 on a 200, 1 otherwise. The
    /// container image's health check, so that the image needs no curl.
    Health(HealthArgs),
}

/// Options of `relay health`.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The URL to ask (default: `http://127.0.0.1:$PORT/api/v1/health`, with `PORT` and `HOST`
    /// read as `relay serve` reads them, from the environment and `.env`).
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
}

/// Options of `relay serve`.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Zero-setup mode for a fresh machine: SQLite at ./app.db, in-memory rate limits, an
    /// ephemeral SECRET_KEY, docs on. Not for production.
    #[arg(long)]
    pub dev: bool,
}

/// `relay user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read from standard input (never from argv).
    Create(UserCreateArgs),
    /// Change a user: active, admin, own token limit. Prints the user afterwards.
    Set(UserSetArgs),
    /// List users (one JSON object a line), optionally those whose email or name contains a text.
    List(UserListArgs),
    /// End every session and API key of a user (running relays refuse them within seconds).
    Revoke(UserRevokeArgs),
}

/// Options of `relay user list`.
#[derive(Debug, Args)]
pub struct UserListArgs {
    /// Only users whose email or name contains this text (any case).
    #[arg(long)]
    pub query: Option<String>,
}

/// Options of `relay user revoke`.
#[derive(Debug, Args)]
pub struct UserRevokeArgs {
    /// The user's email address.
    #[arg(long)]
    pub email: String,
}

/// Options of `relay user set`.
#[derive(Debug, Args)]
pub struct UserSetArgs {
    /// The user's email address.
    #[arg(long)]
    pub email: String,
    /// Activate (`true`) or deactivate (`false`) the user.
    #[arg(long)]
    pub active: Option<bool>,
    /// Make the user an admin (`true`) or not (`false`).
    #[arg(long)]
    pub admin: Option<bool>,
    /// The user's own token limit (tokens per window); 0 returns to `TOKEN_LIMIT`.
    #[arg(long)]
    pub token_limit: Option<u64>,
    /// The window of the user's own token limit, in seconds; 0 returns to
    /// `TOKEN_LIMIT_WINDOW`.
    #[arg(long)]
    pub token_limit_window: Option<u64>,
}

/// Options of `relay user create`.
#[derive(Debug, Args)]
pub struct UserCreateArgs {
    /// The user's email address.
    #[arg(long)]
    pub email: String,
    /// Read the password from standard input (first line). Required: passwords on the command
    /// line leak into shell history and `ps`.
    #[arg(long, required = true)]
    pub password_stdin: bool,
    /// Display name.
    #[arg(long)]
    pub full_name: Option<String>,
    /// Make the user an admin.
    #[arg(long)]
    pub admin: bool,
}

/// Options of `relay mock-upstream`.
#[derive(Debug, Args)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8001)]
    pub port: u16,
    /// Delay before the first byte of every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Content chunks per streamed answer (default: one per word of the echoed message).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Delay between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub chunk_delay_ms: u64,
}
