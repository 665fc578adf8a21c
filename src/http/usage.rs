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
    /// The day (`YYYY-MM-DD`, UTC) or the model.
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
    /// Per day or per model, sorted by key.
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

/// The query, checked: `from`/`to` RFC 3339 (default: the last 30 days), `group_by`.
fn parse_query(
    query: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>, GroupBy), ApiError> {
    let (mut from, mut to, mut group_by) = (None, None, GroupBy::Day);
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
                group_by = match &*value {
                    "day" => GroupBy::Day,
                    "model" => GroupBy::Model,
                    _ => {
                        return Err(ApiError::validation(
                            "group_by",
                            "group_by must be day or model",
                        ));
                    }
                };
            }
            other => {
                return Err(ApiError::validation(
                    other.chars().take(64).collect::<String>(),
                    "unknown query parameter; /usage takes from, to and group_by",
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
    Ok((from, to, group_by))
}

/// The caller's usage: totals and groups over a time range.
#[utoipa::path(
    get, path = "/usage", tag = "usage",
    security(("bearer" = []), ("oauth2" = [])),
    params(
        ("from" = Option<String>, Query, description = "RFC 3339; default: 30 days before `to`"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive; default: now"),
        ("group_by" = Option<String>, Query, description = "`day` (UTC, the default) or `model`"),
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
    let (from, to, group_by) = parse_query(query.as_deref(), Utc::now())?;
    let (total, groups) = state
        .store
        .usage_summary(user.id, from, to, group_by)
        .await?;
    Ok(Json(UsageReport {
        object: "usage",
        from,
        to,
        total: totals(&total),
        groups: groups
            .iter()
            .map(|g| UsageGroup {
                key: g.key.clone(),
                totals: totals(g),
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_checked() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let (from, to, by) = parse_query(None, now).unwrap();
        assert_eq!((to - from).num_days(), 30);
        assert_eq!(to, now);
        assert_eq!(by, GroupBy::Day);
        let (from, _, by) =
            parse_query(Some("from=2026-11-30T00:00:00%2B01:00&group_by=model"), now).unwrap();
        assert_eq!(from.to_rfc3339(), "2026-11-29T23:00:00+00:00");
        let (from, ..) = parse_query(Some("from=2026-11-30T00:00:00+01:00"), now).unwrap();
        assert_eq!(from.to_rfc3339(), "2026-11-29T23:00:00+00:00");
        assert_eq!(by, GroupBy::Model);
        let param = |q: &str| match parse_query(Some(q), now) {
            Err(ApiError::Validation { param, .. }) => param,
            other => panic!("{q}: {other:?}"),
        };
        assert_eq!(param("from=yesterday"), "from");
        assert_eq!(param("to=2026-13-01T00:00:00Z"), "to");
        assert_eq!(param("group_by=user"), "group_by");
        assert_eq!(param("from=2026-12-02T00:00:00Z"), "from");
        assert_eq!(param("from=2020-01-01T00:00:00Z"), "from");
        assert_eq!(param("user_id=x"), "user_id");
    }
}
