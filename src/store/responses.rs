//! The `response_owners` table: which user created each response the upstream stores.

use chrono::Utc;
use uuid::Uuid;

use super::{Store, StoreError};

impl Store {
    /// Records `user` as the owner of `response_id`. An id recorded already keeps its first
    /// owner: nobody can take over a response by presenting its id again.
    pub async fn record_response_owner(
        &self,
        response_id: &str,
        user: Uuid,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO response_owners (response_id, user_id, created_at) \
                           VALUES ($1, $2, $3) ON CONFLICT (response_id) DO NOTHING";
        on_pool!(self, pool => {
            sqlx::query(SQL)
                .bind(response_id)
                .bind(user)
                .bind(Utc::now())
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Whether `user` created `response_id`.
    pub async fn owns_response(&self, response_id: &str, user: Uuid) -> Result<bool, StoreError> {
        const SQL: &str = "SELECT 1 FROM response_owners WHERE response_id = $1 AND user_id = $2";
        let found = on_pool!(self, pool => {
            sqlx::query(SQL)
                .bind(response_id)
                .bind(user)
                .fetch_optional(pool)
                .await?
                .is_some()
        });
        Ok(found)
    }

    /// Forgets `response_id` (after the upstream deleted it).
    pub async fn forget_response(&self, response_id: &str) -> Result<(), StoreError> {
        const SQL: &str = "DELETE FROM response_owners WHERE response_id = $1";
        on_pool!(self, pool => {
            sqlx::query(SQL).bind(response_id).execute(pool).await?;
        });
        Ok(())
    }
}
