//! The `response_owners` table: which user created each response the upstream stores, and
//! each of its output items.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

impl Store {
    /// Records `user` as the owner of `ids` (a response's and its items'). An id recorded
    /// already keeps its first owner: nobody takes over an object by presenting its id again.
    pub async fn record_owned(&self, ids: &[String], user: Uuid) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        on_pool!(self, pool => {
            let mut insert = sqlx::QueryBuilder::new(
                "INSERT INTO response_owners (object_id, user_id, created_at) ",
            );
            insert.push_values(ids, |mut row, id| {
                row.push_bind(id.as_str()).push_bind(user).push_bind(now);
            });
            insert.push(" ON CONFLICT (object_id) DO NOTHING");
            insert.build().execute(pool).await?;
        });
        Ok(())
    }

    /// The first of `ids` that `user` does not own, if any.
    pub async fn first_not_owned<'a>(
        &self,
        ids: &[&'a str],
        user: Uuid,
    ) -> Result<Option<&'a str>, StoreError> {
        if ids.is_empty() {
            return Ok(None);
        }
        let owned: Vec<String> = on_pool!(self, pool => {
            let mut select = sqlx::QueryBuilder::new(
                "SELECT object_id FROM response_owners WHERE user_id = ",
            );
            select.push_bind(user).push(" AND object_id IN (");
            let mut list = select.separated(", ");
            for id in ids {
                list.push_bind(*id);
            }
            select.push(")");
            select.build_query_scalar().fetch_all(pool).await?
        });
        Ok(ids
            .iter()
            .copied()
            .find(|id| !owned.iter().any(|o| o == id)))
    }

    /// Forgets `id` (after the upstream deleted it for its owner `user`).
    pub async fn forget_owned(&self, id: &str, user: Uuid) -> Result<(), StoreError> {
        const SQL: &str = "DELETE FROM response_owners WHERE object_id = $1 AND user_id = $2";
        on_pool!(self, pool => {
            sqlx::query(SQL).bind(id).bind(user).execute(pool).await?;
        });
        Ok(())
    }

    /// Forgets the ids recorded before `before` (the upstream keeps stored responses for 30
    /// days): returns how many. A forgotten id is refused to everyone, its owner included —
    /// the safe direction.
    pub async fn purge_response_owners(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        const SQL: &str = "DELETE FROM response_owners WHERE created_at < $1";
        let n = on_pool!(self, pool => {
            sqlx::query(SQL).bind(before).execute(pool).await?.rows_affected()
        });
        Ok(n)
    }
}
