//! `GET /usage`: the caller's usage records, summed in SQL.

use axum::Json;
use axum::extract::{RawQuery, State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorEnvelope};
use crate::state::AppState;
use crate::store::{GroupBy, UsageSums};
use uuid::Uuid;

/// The longest range one call may sum (its day groups stay a few hundred).
const MAX_RANGE_DAYS: i64 = 1000;
/// The default range: the last 30 days.
const DEFAULT_RANGE_DAYS: i64 = 30;

/// Token counts over a set of requests.
#[derive(Serialize, ToSchema)]
pub struct UsageTotals {
    /// How many requests reached the upstream.
    pub requests: i64,
    /// Prompt (input) tokens.
    pub prompt_tokens: i64,
    /// Completion (output) tokens.
    pub completion_tokens: i64,
    /// Their sum.
    pub total_tokens: i64,
}

/// One group of `GET /usage`.
#[derive(Serialize, ToSchema)]
pub struct UsageGroup {
    /// The day (`YYYY-MM-DD`, UTC), the model, the API key's id (`session`: an access token)
    /// or the user's id.
    pub key: String,
    /// The group's counts.
    #[serde(flatten)]
    pub totals: UsageTotals,
}

/// `GET /usage` answer.
#[derive(Serialize, ToSchema)]
pub struct UsageReport {
    /// Always `usage`.
    pub object: &'static str,
    /// Start of the range (inclusive).
    pub from: DateTime<Utc>,
    /// End of the range (exclusive).
    pub to: DateTime<Utc>,
    /// Over the whole range.
    pub total: UsageTotals,
    /// Per group: days and models sorted by key, keys and users the largest first; at most
    /// 1,100.
    pub groups: Vec<UsageGroup>,
}

fn totals(sums: &UsageSums) -> UsageTotals {
    UsageTotals {
        requests: sums.requests,
        prompt_tokens: sums.prompt_tokens,
        completion_tokens: sums.completion_tokens,
        total_tokens: sums.prompt_tokens.saturating_add(sums.completion_tokens),
    }
}

/// A usage query, checked.
#[derive(Debug)]
pub struct UsageQuery {
    /// Start (inclusive).
    pub from: DateTime<Utc>,
    /// End (exclusive).
    pub to: DateTime<Utc>,
    /// Grouping.
    pub group_by: GroupBy,
    /// Whose records (admin only; `None`: everyone's).
    pub user_id: Option<Uuid>,
}

/// Who asks: a user about themself (`/usage`) or an admin about anyone (`/admin/usage`, which
/// also takes `user_id` and `group_by=user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// `GET /usage`.
    User,
    /// `GET /admin/usage`.
    Admin,
}

/// The query, checked: `from`/`to` RFC 3339 (default: the last 30 days), `group_by`, and for
/// admins `user_id`.
pub fn parse_query(
    query: Option<&str>,
    now: DateTime<Utc>,
    asker: Asker,
) -> Result<UsageQuery, ApiError> {
    let (mut from, mut to, mut group_by, mut user_id) = (None, None, GroupBy::Day, None);
    let groups = match asker {
        Asker::User => "day, model or api_key",
        Asker::Admin => "day, model, api_key or user",
    };
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let time = |name: &str| {
            // An unencoded `+01:00` arrives as ` 01:00` (form decoding): take it as meant.
            DateTime::parse_from_rfc3339(&value.replace(' ', "+"))
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::validation(
                        name,
                        format!("{name} must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z"),
                    )
                })
        };
        match &*key {
            "from" => from = Some(time("from")?),
            "to" => to = Some(time("to")?),
            "group_by" => {
                group_by = match (&*value, asker) {
                    ("day", _) => GroupBy::Day,
                    ("model", _) => GroupBy::Model,
                    ("api_key", _) => GroupBy::ApiKey,
                    ("user", Asker::Admin) => GroupBy::User,
                    _ => {
                        return Err(ApiError::validation(
                            "group_by",
                            format!("group_by must be {groups}"),
                        ));
                    }
                };
            }
            "user_id" if asker == Asker::Admin => {
                user_id = Some(Uuid::parse_str(&value).map_err(|_| {
                    ApiError::validation("user_id", "user_id must be a user's id (a UUID)")
                })?);
            }
            other => {
                let takes = match asker {
                    Asker::User => "/usage takes from, to and group_by",
                    Asker::Admin => "/admin/usage takes user_id, from, to and group_by",
                };
                return Err(ApiError::validation(
                    other.chars().take(64).collect::<String>(),
                    format!("unknown query parameter; {takes}"),
                ));
            }
        }
    }
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to - chrono::Duration::days(DEFAULT_RANGE_DAYS));
    if from >= to {
        return Err(ApiError::validation("from", "from must be before to"));
    }
    if to - from > chrono::Duration::days(MAX_RANGE_DAYS) {
        return Err(ApiError::validation(
            "from",
            format!("the range may span at most {MAX_RANGE_DAYS} days"),
        ));
    }
    Ok(UsageQuery {
        from,
        to,
        group_by,
        user_id,
    })
}

/// Sums `query`'s records in SQL and shapes the answer.
pub async fn report(state: &AppState, query: UsageQuery) -> Result<UsageReport, ApiError> {
    let (total, groups) = state
        .store
        .usage_summary(query.user_id, query.from, query.to, query.group_by)
        .await?;
    Ok(UsageReport {
        object: "usage",
        from: query.from,
        to: query.to,
        total: totals(&total),
        groups: groups
            .iter()
            .map(|g| UsageGroup {
                key: g.key.clone(),
                totals: totals(g),
            })
            .collect(),
    })
}

/// The caller's usage: totals and groups over a time range.
#[utoipa::path(
    get, path = "/api/v1/usage", tag = "usage",
    security(("bearer" = []), ("oauth2" = [])),
    params(
        ("from" = Option<String>, Query, description = "RFC 3339; default: 30 days before `to`"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive; default: now"),
        ("group_by" = Option<String>, Query, description = "`day` (UTC, the default), `model`, or `api_key` (the key's id, or `session` for requests made with an access token)"),
    ),
    responses(
        (status = 200, description = "The caller's usage", body = UsageReport),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 422, description = "Invalid query", body = ErrorEnvelope),
    )
)]
pub async fn get_usage(
    State(state): State<AppState>,
    user: AuthUser,
    RawQuery(query): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let mut query = parse_query(query.as_deref(), Utc::now(), Asker::User)?;
    query.user_id = Some(user.id);
    report(&state, query).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_checked() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let q = parse_query(None, now, Asker::User).unwrap();
        assert_eq!((q.to - q.from).num_days(), 30);
        assert_eq!(q.to, now);
        assert_eq!(q.group_by, GroupBy::Day);
        let q = parse_query(
            Some("from=2026-11-30T00:00:00%2B01:00&group_by=model"),
            now,
            Asker::User,
        )
        .unwrap();
        assert_eq!(q.from.to_rfc3339(), "2026-11-29T23:00:00+00:00");
        assert_eq!(q.group_by, GroupBy::Model);
        let q = parse_query(Some("from=2026-11-30T00:00:00+01:00"), now, Asker::User).unwrap();
        assert_eq!(q.from.to_rfc3339(), "2026-11-29T23:00:00+00:00");
        let q = parse_query(Some("group_by=api_key"), now, Asker::User).unwrap();
        assert_eq!(q.group_by, GroupBy::ApiKey);
        let id = Uuid::new_v4();
        let q = parse_query(
            Some(&format!("user_id={id}&group_by=user")),
            now,
            Asker::Admin,
        )
        .unwrap();
        assert_eq!((q.user_id, q.group_by), (Some(id), GroupBy::User));
        let param = |q: &str| match parse_query(Some(q), now, Asker::User) {
            Err(ApiError::Validation { param, .. }) => param,
            other => panic!("{q}: {other:?}"),
        };
        assert_eq!(param("from=yesterday"), "from");
        assert_eq!(param("to=2026-13-01T00:00:00Z"), "to");
        assert_eq!(param("group_by=user"), "group_by");
        assert_eq!(param("from=2026-12-02T00:00:00Z"), "from");
        assert_eq!(param("from=2020-01-01T00:00:00Z"), "from");
        assert_eq!(param("user_id=x"), "user_id");
        assert_eq!(param(&format!("user_id={id}")), "user_id");
        assert!(matches!(
            parse_query(Some("user_id=nope"), now, Asker::Admin),
            Err(ApiError::Validation { param, .. }) if param == "user_id"
        ));
    }
}
