//! The `users` table.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

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
    /// The user's own token limit (tokens per window), overriding `TOKEN_LIMIT`.
    pub token_limit: Option<i64>,
    /// The window of `token_limit`, in seconds (the default window when `NULL`).
    pub token_limit_window: Option<i64>,
    /// Access tokens issued at or before this time (Unix milliseconds) are refused: set when
    /// every session of the user is revoked.
    pub sessions_revoked_at: Option<i64>,
}

/// What an admin may change about a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    /// Activate or deactivate.
    pub is_active: Option<bool>,
    /// Grant or take admin rights.
    pub is_admin: Option<bool>,
    /// The display name (`Some(None)` clears it).
    pub full_name: Option<Option<String>>,
    /// The user's own token limit (`Some(None)`: back to `TOKEN_LIMIT`).
    pub token_limit: Option<Option<i64>>,
    /// Its window in seconds (`Some(None)`: back to `TOKEN_LIMIT_WINDOW`).
    pub token_limit_window: Option<Option<i64>>,
}

/// The outcome of a change that must leave at least one active admin.
#[derive(Debug)]
pub enum AdminChange<T> {
    /// Done.
    Done(T),
    /// No such user.
    NotFound,
    /// Refused: it would leave no active admin.
    LastAdmin,
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

const USER_COLUMNS: &str = "id, email, password_hash, full_name, is_active, is_admin, created_at, \
                            token_limit, token_limit_window, sessions_revoked_at";

/// Escapes `%`, `_` and `\` for a `LIKE … ESCAPE '\'` pattern.
fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Store {
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

    /// Sets a user's own token limit (`None`: the default) and its window in seconds (`None`:
    /// the default window).
    pub async fn set_token_limit(
        &self,
        id: Uuid,
        limit: Option<i64>,
        window: Option<i64>,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            sqlx::query(
                "UPDATE users SET token_limit = $2, token_limit_window = $3, updated_at = $4 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(limit)
            .bind(window)
            .bind(now)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Makes a user an admin or not.
    pub async fn set_admin(&self, id: Uuid, admin: bool) -> Result<(), StoreError> {
        let now = Utc::now();
        on_pool!(self, pool => {
            sqlx::query("UPDATE users SET is_admin = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(admin)
                .bind(now)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Up to `limit` users in id order, after `after` (a cursor: the last id of the previous
    /// page), whose email or name contains `query` (case-insensitively).
    pub async fn list_users(
        &self,
        query: Option<&str>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<UserRecord>, StoreError> {
        let pattern = query.map(|q| format!("%{}%", like_escape(&q.to_lowercase())));
        let mut sql = format!("SELECT {USER_COLUMNS} FROM users WHERE TRUE");
        if pattern.is_some() {
            sql.push_str(
                " AND (email LIKE $1 ESCAPE '\\' OR lower(coalesce(full_name, '')) LIKE $1 \
                 ESCAPE '\\')",
            );
        }
        if after.is_some() {
            sql.push_str(if pattern.is_some() {
                " AND id > $2"
            } else {
                " AND id > $1"
            });
        }
        sql.push_str(&format!(" ORDER BY id LIMIT {limit}"));
        let users = on_pool!(self, pool => {
            let mut q = sqlx::query_as::<_, UserRecord>(&sql);
            if let Some(pattern) = &pattern {
                q = q.bind(pattern);
            }
            if let Some(after) = after {
                q = q.bind(after);
            }
            q.fetch_all(pool).await?
        });
        Ok(users)
    }

    /// Applies `patch` to user `id`, unless it would leave no active admin (checked in the
    /// same transaction, with the admins' rows locked, so that two admins demoting each other
    /// at once cannot both succeed).
    pub async fn update_user(
        &self,
        id: Uuid,
        patch: &UserPatch,
    ) -> Result<AdminChange<UserRecord>, StoreError> {
        let removes_admin = patch.is_active == Some(false) || patch.is_admin == Some(false);
        let now = Utc::now();
        let lock = self.row_lock();
        // In id order, so that two such transactions lock the admins' rows in the same order.
        let admins_sql =
            format!("SELECT id FROM users WHERE is_admin AND is_active ORDER BY id{lock}");
        // Locked too: a concurrent change of other fields must not be overwritten with what
        // this one read.
        let select_sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1{lock}");
        let update_sql = format!(
            "UPDATE users SET is_active = $2, is_admin = $3, full_name = $4, token_limit = $5, \
             token_limit_window = $6, updated_at = $7 WHERE id = $1 RETURNING {USER_COLUMNS}"
        );
        let change = on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            let admins: Vec<(Uuid,)> = if removes_admin {
                sqlx::query_as(&admins_sql).fetch_all(&mut *tx).await?
            } else {
                Vec::new()
            };
            let current = sqlx::query_as::<_, UserRecord>(&select_sql)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            match current {
                None => AdminChange::NotFound,
                Some(_) if admins.len() == 1 && admins[0].0 == id => AdminChange::LastAdmin,
                Some(user) => {
                    let updated = sqlx::query_as::<_, UserRecord>(&update_sql)
                        .bind(id)
                        .bind(patch.is_active.unwrap_or(user.is_active))
                        .bind(patch.is_admin.unwrap_or(user.is_admin))
                        .bind(patch.full_name.clone().unwrap_or(user.full_name))
                        .bind(patch.token_limit.unwrap_or(user.token_limit))
                        .bind(patch.token_limit_window.unwrap_or(user.token_limit_window))
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    AdminChange::Done(updated)
                }
            }
        });
        Ok(change)
    }

    /// Deletes user `id` (its sessions and API keys go with it), unless it is the last active
    /// admin.
    pub async fn delete_user(&self, id: Uuid) -> Result<AdminChange<()>, StoreError> {
        let lock = self.row_lock();
        let admins_sql =
            format!("SELECT id FROM users WHERE is_admin AND is_active ORDER BY id{lock}");
        let change = on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            let admins: Vec<(Uuid,)> = sqlx::query_as(&admins_sql).fetch_all(&mut *tx).await?;
            if admins.len() == 1 && admins[0].0 == id {
                AdminChange::LastAdmin
            } else {
                let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                if deleted == 0 {
                    AdminChange::NotFound
                } else {
                    AdminChange::Done(())
                }
            }
        });
        Ok(change)
    }

    /// Ends every session and API key of user `id`: its access tokens issued until now are
    /// refused (`sessions_revoked_at`), its refresh-token families revoked and its API keys
    /// deleted, in one transaction. `false` when there is no such user.
    ///
    /// The time is read once the user's row and families are locked: a refresh or a key
    /// creation that got in first has committed by then (its access token was issued before
    /// that time, and is refused), and one that comes later waits for this transaction and
    /// finds its family revoked or the user's revocation.
    pub async fn revoke_user(&self, id: Uuid) -> Result<bool, StoreError> {
        let lock = self.row_lock();
        let lock_user = format!("SELECT id FROM users WHERE id = $1{lock}");
        let lock_families = format!(
            "SELECT id FROM refresh_families WHERE user_id = $1 AND revoked_at IS NULL \
             ORDER BY id{lock}"
        );
        let found = on_pool!(self, pool => {
            let mut tx = pool.begin_with(self.begin_write()).await?;
            let user: Option<(Uuid,)> = sqlx::query_as(&lock_user)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if user.is_none() {
                return Ok(false);
            }
            let _: Vec<(Uuid,)> = sqlx::query_as(&lock_families)
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
            let now = Utc::now();
            sqlx::query("UPDATE users SET sessions_revoked_at = $2, updated_at = $3 WHERE id = $1")
                .bind(id)
                .bind(now.timestamp_millis())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE refresh_families SET revoked_at = $2 \
                 WHERE user_id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL",
            )
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM api_keys WHERE user_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            true
        });
        Ok(found)
    }
}
