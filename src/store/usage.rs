//! The `usage_records` table: one row per request that reached the upstream, written in
//! batches by the usage writer (`crate::usage`), summed in SQL for `GET /usage`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};

/// One request's usage, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Who made the request.
    pub user_id: Uuid,
    /// The API key used, if any.
    pub api_key_id: Option<Uuid>,
    /// `chat`, `responses` or `embeddings`.
    pub endpoint: &'static str,
    /// The model asked for.
    pub model: String,
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens.
    pub completion_tokens: u64,
    /// The HTTP status relay answered with.
    pub status: u16,
    /// Whether the answer was streamed.
    pub streamed: bool,
    /// Whether the client left before the answer ended.
    pub cancelled: bool,
    /// Whether the token counts are relay's estimate (the upstream's usage never arrived).
    pub estimated: bool,
    /// From the request's arrival to the end of its answer.
    pub duration_ms: u64,
    /// From the request's arrival to the upstream's first byte (its answer's headers).
    pub ttfb_ms: Option<u64>,
    /// The request id (`X-Request-ID`).
    pub request_id: String,
    /// When the request arrived.
    pub created_at: DateTime<Utc>,
}

/// How `GET /usage` groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// By UTC day, `YYYY-MM-DD`.
    Day,
    /// By model.
    Model,
    /// By user (the user's id); the largest first.
    User,
    /// By API key (the key's id, or `session` for requests made with an access token); the
    /// largest first.
    ApiKey,
}

/// The key a request made without an API key is grouped under.
pub const SESSION_KEY: &str = "session";

/// A 32-digit hex id as a hyphenated UUID (`lower(hex(id))` of a SQLite blob, or a PostgreSQL
/// UUID without its hyphens); anything else unchanged.
fn uuid_key(key: String) -> String {
    match Uuid::try_parse(&key) {
        Ok(id) => id.hyphenated().to_string(),
        Err(_) => key,
    }
}

/// Sums over a set of records.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageSums {
    /// The group's key (empty for the total).
    pub key: String,
    /// How many requests.
    pub requests: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
}

const SUMS: &str = "COUNT(*) AS requests, \
                    CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
                    CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion_tokens";

/// The most groups one summary returns (the days of the longest range fit; a user naming more
/// models than this sees the first ones by name, the total still counts all).
pub const MAX_GROUPS: usize = 1100;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The row counts of the `INSERT` statements usage records are written with, largest first
/// (14 parameters a row: 64 rows stay far below SQLite's and PostgreSQL's limits).
const INSERT_ROWS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];

/// The columns of a usage record, in the order they are bound.
const INSERT_COLUMNS: usize = 14;

/// The `INSERT` of `rows` usage records (one of [`INSERT_ROWS`]), with SQLite's `?` or
/// PostgreSQL's `$n` parameters (SQLite reads `$n` as a name, which costs a lookup per value).
/// Made once per size and engine: building it for every batch cost more than binding the batch.
fn insert_sql(rows: usize, sqlite: bool) -> &'static str {
    static SQL: std::sync::OnceLock<[Vec<String>; 2]> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        [false, true].map(|sqlite| {
            INSERT_ROWS
                .iter()
                .map(|&rows| {
                    let values: Vec<String> = (0..rows)
                        .map(|row| {
                            let params: Vec<String> = (1..=INSERT_COLUMNS)
                                .map(|col| match sqlite {
                                    true => "?".to_owned(),
                                    false => format!("${}", row * INSERT_COLUMNS + col),
                                })
                                .collect();
                            format!("({})", params.join(", "))
                        })
                        .collect();
                    format!(
                        "INSERT INTO usage_records (user_id, api_key_id, endpoint, model, \
                         prompt_tokens, completion_tokens, status, streamed, cancelled, \
                         estimated, duration_ms, ttfb_ms, request_id, created_at) VALUES {}",
                        values.join(", ")
                    )
                })
                .collect()
        })
    });
    let at = INSERT_ROWS
        .iter()
        .position(|&n| n == rows)
        .unwrap_or(INSERT_ROWS.len() - 1);
    &all[usize::from(sqlite)][at]
}

impl Store {
    /// Inserts `records` in one transaction, in multi-row statements of a few fixed sizes
    /// ([`INSERT_ROWS`]): each size's statement is prepared once and then taken from the
    /// connection's statement cache, where a statement of every batch's own size would be
    /// parsed anew for each batch (parsing a 256-row `INSERT` costs SQLite more than running it).
    pub async fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let sqlite = matches!(self, Store::Sqlite(_));
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut rest = records;
            while !rest.is_empty() {
                let rows = INSERT_ROWS
                    .into_iter()
                    .find(|&n| n <= rest.len())
                    .unwrap_or(1);
                let (chunk, tail) = rest.split_at(rows);
                rest = tail;
                let mut insert = sqlx::query(insert_sql(rows, sqlite));
                for r in chunk {
                    insert = insert
                        .bind(r.user_id)
                        .bind(r.api_key_id)
                        .bind(r.endpoint)
                        .bind(r.model.as_str())
                        .bind(to_i64(r.prompt_tokens))
                        .bind(to_i64(r.completion_tokens))
                        .bind(i32::from(r.status))
                        .bind(r.streamed)
                        .bind(r.cancelled)
                        .bind(r.estimated)
                        .bind(to_i64(r.duration_ms))
                        .bind(r.ttfb_ms.map(to_i64))
                        .bind(r.request_id.as_str())
                        .bind(r.created_at);
                }
                insert.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Totals over `[from, to)` of `user`'s records (of everyone's when `None`), and the same
    /// per group: sorted by key for days and models, the largest first for users and keys; at
    /// most [`MAX_GROUPS`] groups.
    pub async fn usage_summary(
        &self,
        user: Option<Uuid>,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        group_by: GroupBy,
    ) -> Result<(UsageSums, Vec<UsageSums>), StoreError> {
        let range = if user.is_some() {
            "FROM usage_records WHERE created_at >= $1 AND created_at < $2 AND user_id = $3"
        } else {
            "FROM usage_records WHERE created_at >= $1 AND created_at < $2"
        };
        let sqlite = matches!(self, Store::Sqlite(_));
        let key = match group_by {
            GroupBy::Model => "model",
            // SQLite keeps timestamps as RFC 3339 text in UTC: the day is its first ten bytes.
            GroupBy::Day if sqlite => "substr(created_at, 1, 10)",
            GroupBy::Day => "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            GroupBy::User if sqlite => "lower(hex(user_id))",
            GroupBy::User => "replace(user_id::text, '-', '')",
            GroupBy::ApiKey if sqlite => "coalesce(lower(hex(api_key_id)), '')",
            GroupBy::ApiKey => "coalesce(replace(api_key_id::text, '-', ''), '')",
        };
        let order = match group_by {
            GroupBy::Day | GroupBy::Model => "key".to_owned(),
            GroupBy::User | GroupBy::ApiKey => {
                "SUM(prompt_tokens) + SUM(completion_tokens) DESC, key".to_owned()
            }
        };
        let total_sql = format!("SELECT '' AS key, {SUMS} {range}");
        let groups_sql = format!(
            "SELECT {key} AS key, {SUMS} {range} GROUP BY {key} ORDER BY {order} LIMIT {MAX_GROUPS}"
        );
        let (total, mut groups) = on_pool!(self, pool => {
            let mut total = sqlx::query_as::<_, UsageSums>(&total_sql).bind(from).bind(to);
            let mut groups = sqlx::query_as::<_, UsageSums>(&groups_sql).bind(from).bind(to);
            if let Some(user) = user {
                total = total.bind(user);
                groups = groups.bind(user);
            }
            (total.fetch_one(pool).await?, groups.fetch_all(pool).await?)
        });
        if matches!(group_by, GroupBy::User | GroupBy::ApiKey) {
            for group in &mut groups {
                group.key = if group.key.is_empty() {
                    SESSION_KEY.to_owned()
                } else {
                    uuid_key(std::mem::take(&mut group.key))
                };
            }
        }
        Ok((total, groups))
    }

    /// Deletes the records made before `before`; returns how many.
    pub async fn purge_usage(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let n = on_pool!(self, pool => {
            sqlx::query("DELETE FROM usage_records WHERE created_at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(n)
    }
}
