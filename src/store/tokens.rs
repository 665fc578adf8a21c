//! Refresh tokens and their rotation families: a login starts a family, each refresh spends
//! a token and stores its successor in one transaction, a replay revokes the whole family.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

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

impl Store {
    /// The statement that opens a transaction which reads, then writes, refresh tokens.
    ///
    /// SQLite: `BEGIN IMMEDIATE` takes the database's single write lock up front (waiting for
    /// it up to the busy timeout), so such transactions run one after another and every read in
    /// them sees the latest commit. (A deferred `BEGIN` would take the lock only at its first
    /// write, and fail with `SQLITE_BUSY` if another writer committed since its first read.)
    /// PostgreSQL: a plain `BEGIN` (READ COMMITTED), serialised per family by the row lock of
    /// [`Store::row_lock`] on the family's row.
    pub(super) fn begin_write(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "BEGIN IMMEDIATE",
            Store::Postgres(_) => "BEGIN",
        }
    }

    /// What makes a `SELECT` lock the rows it reads until the transaction ends: `FOR UPDATE` on
    /// PostgreSQL; nothing on SQLite, whose write transactions hold the whole database already.
    pub(super) fn row_lock(&self) -> &'static str {
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
