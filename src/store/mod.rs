//! Users, refresh tokens and their rotation families, on SQLite or PostgreSQL behind one
//! interface.
//!
//! Every query is written once, with `$n` placeholders that both engines accept, and run on
//! whichever pool `DATABASE_URL` chose (the `on_pool!` macro type-checks it for each). This is
//! deliberately not sqlx's `Any` driver, which loses types such as UUIDs and timestamps. The
//! engines differ only in how a transaction that reads then writes begins and locks a row
//! (`Store::begin_write`, `Store::row_lock`), which the refresh-token rotation relies on.
//! The chat request path reaches it only through `auth::status`, a cache that asks for each
//! user's state at most every few seconds: JWTs are verified in memory.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::Database;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (e.g. an email that exists).
    #[error("already exists")]
    Conflict,
    /// The database could not be reached or did not answer in time.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else: a bug or a broken database.
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            // SQLITE_BUSY / SQLITE_LOCKED: another writer held the file past the busy timeout.
            sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("5" | "6")) => {
                StoreError::Unavailable(err)
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => StoreError::Unavailable(err),
            _ => StoreError::Other(err),
        }
    }
}

/// The database, whichever engine it is.
#[derive(Debug, Clone)]
pub enum Store {
    /// An SQLite file (WAL mode, foreign keys on).
    Sqlite(SqlitePool),
    /// A PostgreSQL server.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the concrete pool, type-checking it once per engine.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Sqlite($pool) => $body,
            Store::Postgres($pool) => $body,
        }
    };
}

mod api_keys;
mod responses;
mod tokens;
mod usage;
mod users;

pub use api_keys::{ApiKeyRecord, KeyCreation, NewApiKey};
pub use tokens::{NewRefreshToken, Spend, SuccessorToken};
pub use usage::{GroupBy, SESSION_KEY, UsageRecord, UsageSums};
pub use users::{AdminChange, NewUser, UserPatch, UserRecord};

impl Store {
    /// Opens a pool for `database`. SQLite files are created if missing. Connections are made
    /// lazily, so a database that is down does not stop start-up; it shows in health checks.
    pub async fn connect(database: &Database) -> anyhow::Result<Store> {
        match database {
            Database::Sqlite(path) => {
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // WAL's usual setting: a commit does not wait for the disk (a power cut may
                    // lose the last commits; a crash of relay loses nothing).
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5));
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await?;
                Ok(Store::Sqlite(pool))
            }
            Database::Postgres(options) => {
                let options = PgConnectOptions::clone(options);
                let pool = PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with(options);
                Ok(Store::Postgres(pool))
            }
        }
    }

    /// Applies pending migrations; running it twice is harmless.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        match self {
            Store::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
            Store::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// A trivial round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Closes every connection (at shutdown, and in tests before dropping a database).
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }
}
