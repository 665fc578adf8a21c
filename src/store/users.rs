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
                            token_limit, token_limit_window";

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
}
