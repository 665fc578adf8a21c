//! Users, refresh tokens and their rotation families, on SQLite or PostgreSQL behind one
//! interface.
//!
//! Every query is written once, with `$n` placeholders that both engines accept, and run on
//! whichever pool `DATABASE_URL` chose (the `on_pool!` macro type-checks it for each). This is
//! deliberately not sqlx's `Any` driver, which loses types such as UUIDs and timestamps. The
//! engines differ only in how a transaction that reads then writes begins and locks a row
//! (`Store::begin_write`, `Store::row_lock`), which the refresh-token rotation relies on.
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

/// The first refresh token of a new rotation family (a login), about to be stored (only its
/// hash).
#[derive(Debug, Clone)]
pub struct NewRefreshToken {
    /// The token's `jti`.
    pub id: Uuid,
    /// Its owner.
    pub user_id: Uuid,
    /// The rotation family it starts.
    pub family_id: Uuid,
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// The refresh token that replaces a spent one; it joins the spent token's family and owner.
#[derive(Debug, Clone)]
pub struct SuccessorToken {
    /// The token's `jti`.
    pub id: Uuid,
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// The result of trying to spend a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spend {
    /// It was live: it is now spent, and its successor is stored in the same family.
    Spent {
        /// Its family, which the successor joined.
        family_id: Uuid,
    },
    /// It had been spent already: a replay. Its family has been revoked, every token with it.
    Reused {
        /// The family that was revoked.
        family_id: Uuid,
    },
    /// Revoked (by logout, or with its family) without having been used.
    Revoked,
    /// No such token (or not the given user's).
    Unknown,
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

/// Revokes family `$family` and every token in it on `$tx`, an open write transaction (whose
/// type differs per engine, hence a macro); evaluates to the number of tokens revoked. The
/// family's `UPDATE` comes first: on PostgreSQL it takes the family row lock that rotation
/// takes too, before any token row is touched.
macro_rules! revoke_family_in {
    ($tx:ident, $family:expr, $now:expr) => {{
        sqlx::query(
            "UPDATE refresh_families SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind($family)
        .bind($now)
        .execute(&mut *$tx)
        .await?;
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = $2 \
             WHERE family_id = $1 AND revoked_at IS NULL",
        )
        .bind($family)
        .bind($now)
        .execute(&mut *$tx)
        .await?
        .rows_affected()
    }};
}

const INSERT_TOKEN: &str = "INSERT INTO refresh_tokens \
     (id, user_id, family_id, token_hash, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6)";

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

    /// The statement that opens a transaction which reads, then writes, refresh tokens.
    ///
    /// SQLite: `BEGIN IMMEDIATE` takes the database's single write lock up front (waiting for
    /// it up to the busy timeout), so such transactions run one after another and every read in
    /// them sees the latest commit. (A deferred `BEGIN` would take the lock only at its first
    /// write, and fail with `SQLITE_BUSY` if another writer committed since its first read.)
    /// PostgreSQL: a plain `BEGIN` (READ COMMITTED), serialised per family by the row lock of
    /// [`Store::row_lock`] on the family's row.
    fn begin_write(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "BEGIN IMMEDIATE",
            Store::Postgres(_) => "BEGIN",
        }
    }

    /// What makes a `SELECT` lock the rows it reads until the transaction ends: `FOR UPDATE` on
    /// PostgreSQL; nothing on SQLite, whose write transactions hold the whole database already.
    fn row_lock(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "",
            Store::Postgres(_) => " FOR UPDATE",
        }
    }

    /// Starts a session (a login): records the family `token.family_id` and its first token in
    /// one transaction. A family that exists already is a [`StoreError::Conflict`]; later tokens
    /// join a family only through [`Store::rotate_refresh_token`].
    pub async fn insert_refresh_token(&self, token: NewRefreshToken) -> Result<(), StoreError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            sqlx::query(
                "INSERT INTO refresh_families (id, user_id, created_at) VALUES ($1, $2, $3)",
            )
            .bind(token.family_id)
            .bind(token.user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(INSERT_TOKEN)
                .bind(token.id)
                .bind(token.user_id)
                .bind(token.family_id)
                .bind(&token.token_hash)
                .bind(token.expires_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Spends `user_id`'s refresh token and stores its successor in the same family, or
    /// detects a replay and revokes the family: one transaction either way.
    ///
    /// A token is live while it is neither used nor revoked *and its family is not revoked*;
    /// the family row is the one place a revocation is final. The transaction (1) finds the
    /// token's family, (2) locks the family row (PostgreSQL `SELECT … FOR UPDATE`; on SQLite
    /// the `BEGIN IMMEDIATE` write lock already excludes every other writer), (3) spends the
    /// token with a conditional `UPDATE` that also requires the family to be live, and then
    /// either (4) inserts the successor, or, if the token had been used, (5) revokes the
    /// family and all its tokens. Revocation ([`Store::revoke_family`]) takes the same family
    /// row lock, so a rotation and a revocation of one family never interleave: whichever comes
    /// second sees everything the first did. A revocation after a rotation therefore reaches the
    /// successor, and a rotation after a revocation stores nothing; of two concurrent spends
    /// of one token exactly one wins and the others see a replay. Even a token that got into a
    /// revoked family some other way (e.g. before this design) is dead, by step (3).
    pub async fn rotate_refresh_token(
        &self,
        token_hash: &str,
        user_id: Uuid,
        successor: &SuccessorToken,
    ) -> Result<Spend, StoreError> {
        let now = Utc::now();
        let lock_family = format!(
            "SELECT 1 FROM refresh_families WHERE id = $1{}",
            self.row_lock()
        );
        let spend = on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            // (1) A token never changes family, so this read needs no lock.
            let family_id = sqlx::query_scalar::<_, Uuid>(
                "SELECT family_id FROM refresh_tokens WHERE token_hash = $1 AND user_id = $2",
            )
            .bind(token_hash)
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(family_id) = family_id else {
                return Ok(Spend::Unknown);
            };
            // (2) From here to commit, no other rotation or revocation of this family runs.
            sqlx::query(&lock_family)
                .bind(family_id)
                .execute(&mut *tx)
                .await?;
            // (3)
            let spent = sqlx::query(
                "UPDATE refresh_tokens SET used_at = $2 \
                 WHERE token_hash = $1 AND used_at IS NULL AND revoked_at IS NULL \
                 AND EXISTS (SELECT 1 FROM refresh_families f \
                             WHERE f.id = refresh_tokens.family_id AND f.revoked_at IS NULL)",
            )
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if spent == 1 {
                // (4)
                sqlx::query(INSERT_TOKEN)
                    .bind(successor.id)
                    .bind(user_id)
                    .bind(family_id)
                    .bind(&successor.token_hash)
                    .bind(successor.expires_at)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Spend::Spent { family_id }
            } else {
                let used = sqlx::query_scalar::<_, bool>(
                    "SELECT used_at IS NOT NULL FROM refresh_tokens WHERE token_hash = $1",
                )
                .bind(token_hash)
                .fetch_optional(&mut *tx)
                .await?;
                match used {
                    // Purged (expired) since step (1).
                    None => Spend::Unknown,
                    // Revoked (logout, or with its family) but never used: nothing new to do.
                    Some(false) => Spend::Revoked,
                    // (5) A replay: a stolen token dies together with its legitimate copy.
                    Some(true) => {
                        revoke_family_in!(tx, family_id, now);
                        tx.commit().await?;
                        Spend::Reused { family_id }
                    }
                }
            }
        });
        Ok(spend)
    }

    /// Revokes a rotation family: marks its row (which makes every token of it dead, including
    /// one stored later) and every token in it, in one transaction that takes the family row's
    /// lock, so that it serialises with [`Store::rotate_refresh_token`]. Returns how many tokens
    /// were revoked.
    pub async fn revoke_family(&self, family_id: Uuid) -> Result<u64, StoreError> {
        let now = Utc::now();
        let done = on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            let done = revoke_family_in!(tx, family_id, now);
            tx.commit().await?;
            done
        });
        Ok(done)
    }

    /// The family of a token owned by `user_id`, if it exists.
    pub async fn refresh_token_family(
        &self,
        token_hash: &str,
        user_id: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        let family = on_pool!(self, pool => {
            sqlx::query_scalar::<_, Uuid>(
                "SELECT family_id FROM refresh_tokens WHERE token_hash = $1 AND user_id = $2",
            )
            .bind(token_hash)
            .bind(user_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(family)
    }

    /// Deletes refresh tokens that expired before `before`, then the families left without a
    /// token; returns how many tokens. Each `DELETE` is a transaction of its own, so that the
    /// purge never holds token row locks while it waits for a family row (a rotation holds them
    /// the other way round). A family loses its last token only here, and a login stores a
    /// family together with its first token, so no family in use is ever empty.
    pub async fn purge_expired_tokens(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let tokens = on_pool!(self, pool => {
            sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        });
        on_pool!(self, pool => {
            sqlx::query(
                "DELETE FROM refresh_families WHERE NOT EXISTS \
                 (SELECT 1 FROM refresh_tokens t WHERE t.family_id = refresh_families.id)",
            )
            .execute(pool)
            .await?;
        });
        Ok(tokens)
    }
}
