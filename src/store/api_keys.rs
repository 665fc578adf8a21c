//! The `api_keys` table: keys for servers, stored only as the SHA-256 of the key.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// An API key as stored (never the key itself).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRecord {
    /// Primary key.
    pub id: Uuid,
    /// Whose key it is: requests made with it are theirs.
    pub user_id: Uuid,
    /// The owner's label for it.
    pub name: String,
    /// The key's first characters, to recognise it in a list.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working (`None`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last used (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// What `create_api_key` needs.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Its id.
    pub id: Uuid,
    /// The owner.
    pub user_id: Uuid,
    /// The owner's label.
    pub name: String,
    /// Hex SHA-256 of the whole key.
    pub key_hash: String,
    /// The key's first characters.
    pub prefix: String,
    /// When it stops working.
    pub expires_at: Option<DateTime<Utc>>,
}

/// What became of a key creation.
#[derive(Debug)]
pub enum KeyCreation {
    /// Stored.
    Created(ApiKeyRecord),
    /// The owner holds the most keys allowed already.
    TooMany,
    /// The owner is gone, deactivated, or had every session revoked after the caller's
    /// access token was issued: that token may not make keys any more.
    Refused,
}

const KEY_COLUMNS: &str = "id, user_id, name, prefix, created_at, expires_at, last_used_at";

impl Store {
    /// Stores a new key for a caller whose access token was issued at `issued_at_ms`, unless
    /// the owner holds `max_per_user` already, or is inactive or revoked since that token was
    /// issued (checked under the owner's row lock, so that a revocation running at the same
    /// time either comes first and refuses this, or comes after and deletes the key).
    pub async fn create_api_key(
        &self,
        key: NewApiKey,
        max_per_user: i64,
        issued_at_ms: i64,
    ) -> Result<KeyCreation, StoreError> {
        let now = Utc::now();
        let insert = format!(
            "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}"
        );
        let record = on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            // The owner's row, locked: two creations at once cannot both pass the count, and a
            // revocation cannot slip between the check and the insert.
            let owner = format!(
                "SELECT is_active, sessions_revoked_at FROM users WHERE id = $1{}",
                self.row_lock()
            );
            let state: Option<(bool, Option<i64>)> = sqlx::query_as(&owner)
                .bind(key.user_id)
                .fetch_optional(&mut *tx)
                .await?;
            let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM api_keys WHERE user_id = $1")
                .bind(key.user_id)
                .fetch_one(&mut *tx)
                .await?;
            let allowed = state.is_some_and(|(active, revoked)| {
                active && revoked.is_none_or(|at| issued_at_ms > at)
            });
            if !allowed {
                KeyCreation::Refused
            } else if count >= max_per_user {
                KeyCreation::TooMany
            } else {
                let record = sqlx::query_as::<_, ApiKeyRecord>(&insert)
                    .bind(key.id)
                    .bind(key.user_id)
                    .bind(&key.name)
                    .bind(&key.key_hash)
                    .bind(&key.prefix)
                    .bind(now)
                    .bind(key.expires_at)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                KeyCreation::Created(record)
            }
        });
        Ok(record)
    }

    /// `user`'s keys, newest first.
    pub async fn list_api_keys(&self, user: Uuid) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY created_at DESC, id"
        );
        let keys = on_pool!(self, pool => {
            sqlx::query_as::<_, ApiKeyRecord>(&sql)
                .bind(user)
                .fetch_all(pool)
                .await?
        });
        Ok(keys)
    }

    /// Deletes `user`'s key `id`; `false` when they have no such key.
    pub async fn delete_api_key(&self, user: Uuid, id: Uuid) -> Result<bool, StoreError> {
        let deleted = on_pool!(self, pool => {
            sqlx::query("DELETE FROM api_keys WHERE id = $1 AND user_id = $2")
                .bind(id)
                .bind(user)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted > 0)
    }

    /// The key whose SHA-256 is `key_hash`.
    pub async fn api_key_by_hash(
        &self,
        key_hash: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1");
        let key = on_pool!(self, pool => {
            sqlx::query_as::<_, ApiKeyRecord>(&sql)
                .bind(key_hash)
                .fetch_optional(pool)
                .await?
        });
        Ok(key)
    }

    /// Records that the keys `ids` were used at `at`.
    pub async fn touch_api_keys(&self, ids: &[Uuid], at: DateTime<Utc>) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            for id in ids {
                sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = $1")
                    .bind(id)
                    .bind(at)
                    .execute(pool)
                    .await?;
            }
        });
        Ok(())
    }
}
