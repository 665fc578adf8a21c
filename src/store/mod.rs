//! Users and refresh tokens, on SQLite or PostgreSQL behind one interface.
//!
//! Every query is written once, with `$n` placeholders that both engines accept, and run on
//! whichever pool `DATABASE_URL` chose (the `on_pool!` macro type-checks it for each). This is
//! deliberately not sqlx's `Any` driver, which loses types such as UUIDs and timestamps.
//! Nothing here is on the chat request path: JWTs are verified in memory.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use uuid::Uuid;

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

/// A user as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRecord {
    /// Primary key.
    pub id: Uuid,
    /// Lower-cased, unique.
    pub email: String,
    /// argon2id PHC string, or a bcrypt hash from the Python original.
    pub password_hash: String,
    /// Display name.
    pub full_name: Option<String>,
    /// Inactive users cannot log in or refresh.
    pub is_active: bool,
    /// Admins may use admin-only endpoints.
    pub is_admin: bool,
    /// When the user registered.
    pub created_at: DateTime<Utc>,
}

/// What `create_user` needs.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Already lower-cased and validated.
    pub email: String,
    /// Already hashed.
    pub password_hash: String,
    /// Display name.
    pub full_name: Option<String>,
    /// Admin flag.
    pub is_admin: bool,
}

/// A refresh token about to be stored (only its hash).
#[derive(Debug, Clone)]
pub struct NewRefreshToken {
    /// The token's `jti`.
    pub id: Uuid,
    /// Its owner.
    pub user_id: Uuid,
    /// The rotation family it belongs to.
    pub family_id: Uuid,
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// The result of trying to spend a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spend {
    /// It was live and is now spent.
    Spent {
        /// Its owner.
        user_id: Uuid,
        /// Its family, which the new token joins.
        family_id: Uuid,
    },
    /// It had been spent or revoked already: a replay. The family has been revoked.
    Reused {
        /// Its owner.
        user_id: Uuid,
    },
    /// Revoked (by logout, or with its family) without having been used.
    Revoked,
    /// No such token.
    Unknown,
}

#[derive(sqlx::FromRow)]
struct SpentToken {
    user_id: Uuid,
    family_id: Uuid,
    used: bool,
}

#[derive(sqlx::FromRow)]
struct TokenOwner {
    user_id: Uuid,
    family_id: Uuid,
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

const USER_COLUMNS: &str = "id, email, password_hash, full_name, is_active, is_admin, created_at";

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

    /// Inserts a user; an email that exists gives [`StoreError::Conflict`].
    pub async fn create_user(&self, new: NewUser) -> Result<UserRecord, StoreError> {
        let now = Utc::now();
        let sql = format!(
            "INSERT INTO users (id, email, password_hash, full_name, is_active, is_admin, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, TRUE, $5, $6, $6) \
             RETURNING {USER_COLUMNS}"
        );
        let user = on_pool!(self, pool => {
            sqlx::query_as::<_, UserRecord>(&sql)
                .bind(Uuid::new_v4())
                .bind(&new.email)
                .bind(&new.password_hash)
                .bind(&new.full_name)
                .bind(new.is_admin)
                .bind(now)
                .fetch_one(pool)
                .await?
        });
        Ok(user)
    }

    /// The user with this (lower-cased) email.
    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE email = $1");
        let user = on_pool!(self, pool => {
            sqlx::query_as::<_, UserRecord>(&sql)
                .bind(email)
                .fetch_optional(pool)
                .await?
        });
        Ok(user)
    }

    /// The user with this id.
    pub async fn user_by_id(&self, id: Uuid) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        let user = on_pool!(self, pool => {
            sqlx::query_as::<_, UserRecord>(&sql)
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(user)
    }

    /// Replaces a user's password hash (bcrypt → argon2id on login).
    pub async fn set_password_hash(&self, id: Uuid, hash: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            sqlx::query("UPDATE users SET password_hash = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(hash)
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Activates or deactivates a user.
    pub async fn set_active(&self, id: Uuid, active: bool) -> Result<(), StoreError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            sqlx::query("UPDATE users SET is_active = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(active)
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Records a newly issued refresh token.
    pub async fn insert_refresh_token(&self, token: NewRefreshToken) -> Result<(), StoreError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO refresh_tokens (id, user_id, family_id, token_hash, expires_at, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(token.id)
            .bind(token.user_id)
            .bind(token.family_id)
            .bind(&token.token_hash)
            .bind(token.expires_at)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Spends a refresh token exactly once. The conditional `UPDATE` makes two concurrent
    /// spends of one token race safely: one wins, the other sees a replay. A replay revokes
    /// the token's whole family, so a stolen token dies together with its legitimate copy.
    pub async fn spend_refresh_token(&self, token_hash: &str) -> Result<Spend, StoreError> {
        let now = Utc::now();
        let spent = on_pool!(self, pool => {
            sqlx::query_as::<_, TokenOwner>(
                "UPDATE refresh_tokens SET used_at = $2 \
                 WHERE token_hash = $1 AND used_at IS NULL AND revoked_at IS NULL \
                 RETURNING user_id, family_id",
            )
            .bind(token_hash)
            .bind(now)
            .fetch_optional(pool)
            .await?
        });
        if let Some(owner) = spent {
            return Ok(Spend::Spent {
                user_id: owner.user_id,
                family_id: owner.family_id,
            });
        }
        let known = on_pool!(self, pool => {
            sqlx::query_as::<_, SpentToken>(
                "SELECT user_id, family_id, used_at IS NOT NULL AS used \
                 FROM refresh_tokens WHERE token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await?
        });
        match known {
            None => Ok(Spend::Unknown),
            // Revoked (logout, or an earlier replay) but never used: nothing new to revoke.
            Some(token) if !token.used => Ok(Spend::Revoked),
            Some(token) => {
                self.revoke_family(token.family_id).await?;
                Ok(Spend::Reused {
                    user_id: token.user_id,
                })
            }
        }
    }

    /// Revokes every token of a rotation family.
    pub async fn revoke_family(&self, family_id: Uuid) -> Result<u64, StoreError> {
        let now = Utc::now();
        let done = on_pool!(self, pool => {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $2 \
                 WHERE family_id = $1 AND revoked_at IS NULL",
            )
            .bind(family_id)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done)
    }

    /// The family of a token owned by `user_id`, if it exists.
    pub async fn refresh_token_family(
        &self,
        token_hash: &str,
        user_id: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        let owner = on_pool!(self, pool => {
            sqlx::query_as::<_, TokenOwner>(
                "SELECT user_id, family_id FROM refresh_tokens \
                 WHERE token_hash = $1 AND user_id = $2",
            )
            .bind(token_hash)
            .bind(user_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(owner.map(|o| o.family_id))
    }

    /// Deletes refresh tokens that expired before `before`; returns how many.
    pub async fn purge_expired_tokens(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = on_pool!(self, pool => {
            sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done)
    }
}
