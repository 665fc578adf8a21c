//! `/admin/*`: the owner's control over accounts. Admins only (an access token of a user who
//! is an admin now); API keys are refused.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use chrono::Utc;
use http::StatusCode;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::users::{AdminViewUser, MAX_NAME_CHARS, check_token_limit};
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{AdminUser, ApiJson};
use crate::http::usage::{Asker, UsageReport, parse_query, report};
use crate::state::AppState;
use crate::store::{AdminChange, UserPatch};

/// Users per page by default, and at most.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;
/// Longest search text, in characters.
const MAX_QUERY_CHARS: usize = 200;

/// A page of users.
#[derive(Serialize, ToSchema)]
pub struct UserPage {
    /// Always `list`.
    pub object: &'static str,
    /// The users, in id order.
    pub data: Vec<AdminViewUser>,
    /// Whether more follow: ask again with `after` = the last id here.
    pub has_more: bool,
}

/// Absent stays `None`; present (even `null`) becomes `Some`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /admin/users/{id}` body: only the fields present change.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatchRequest {
    /// Activate or deactivate (a deactivated user is refused everywhere within seconds).
    is_active: Option<bool>,
    /// Grant or take admin rights.
    is_admin: Option<bool>,
    /// Display name; `null` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    full_name: Option<Option<String>>,
    /// The user's own token limit (tokens per window); `null`: `TOKEN_LIMIT`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    token_limit: Option<Option<i64>>,
    /// Its window in seconds; `null`: `TOKEN_LIMIT_WINDOW`.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    token_limit_window: Option<Option<i64>>,
}

fn user_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound)
}

fn last_admin() -> ApiError {
    ApiError::Forbidden {
        message: "this would leave no active admin: make another user an admin first".into(),
        code: "last_admin",
    }
}

/// The query of `GET /admin/users`.
fn page_query(query: Option<&str>) -> Result<(Option<String>, Option<Uuid>, u32), ApiError> {
    let (mut q, mut after, mut limit) = (None, None, DEFAULT_PAGE);
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "q" => {
                if value.chars().count() > MAX_QUERY_CHARS {
                    return Err(ApiError::validation(
                        "q",
                        format!("q may be at most {MAX_QUERY_CHARS} characters"),
                    ));
                }
                let text = value.trim();
                q = (!text.is_empty()).then(|| text.to_owned());
            }
            "after" => {
                after = Some(Uuid::parse_str(&value).map_err(|_| {
                    ApiError::validation("after", "after must be a user's id (the last of a page)")
                })?);
            }
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::validation("limit", format!("limit must be 1 to {MAX_PAGE}"))
                    })?;
            }
            other => {
                return Err(ApiError::validation(
                    other.chars().take(64).collect::<String>(),
                    "unknown query parameter; /admin/users takes q, limit and after",
                ));
            }
        }
    }
    Ok((q, after, limit))
}

/// List users (search by email or name), a page at a time.
#[utoipa::path(
    get, path = "/api/v1/admin/users", tag = "admin",
    security(("bearer" = []), ("oauth2" = [])),
    params(
        ("q" = Option<String>, Query, description = "Part of the email or name, any case"),
        ("limit" = Option<u32>, Query, description = "1 to 200, default 50"),
        ("after" = Option<Uuid>, Query, description = "The last id of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of users", body = UserPage),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "Not an admin, or an API key", body = ErrorEnvelope),
        (status = 422, description = "Invalid query", body = ErrorEnvelope),
    )
)]
pub async fn list_users(
    State(state): State<AppState>,
    _admin: AdminUser,
    RawQuery(query): RawQuery,
) -> Result<Json<UserPage>, ApiError> {
    let (q, after, limit) = page_query(query.as_deref())?;
    let mut users = state
        .store
        .list_users(q.as_deref(), after, limit + 1)
        .await?;
    let has_more = users.len() > limit as usize;
    users.truncate(limit as usize);
    Ok(Json(UserPage {
        object: "list",
        data: users.into_iter().map(AdminViewUser::from).collect(),
        has_more,
    }))
}

/// One user.
#[utoipa::path(
    get, path = "/api/v1/admin/users/{id}", tag = "admin",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The user", body = AdminViewUser),
        (status = 403, description = "Not an admin, or an API key", body = ErrorEnvelope),
        (status = 404, description = "No such user", body = ErrorEnvelope),
    )
)]
pub async fn get_user(
    State(state): State<AppState>,
    _admin: AdminUser,
    Path(id): Path<String>,
) -> Result<Json<AdminViewUser>, ApiError> {
    let user = state
        .store
        .user_by_id(user_id(&id)?)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(user.into()))
}

/// Change a user: active, admin, name, own token limit. Takes effect within seconds on every
/// replica. Refused when it would leave no active admin.
#[utoipa::path(
    patch, path = "/api/v1/admin/users/{id}", tag = "admin",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    request_body = UserPatchRequest,
    responses(
        (status = 200, description = "The user, changed", body = AdminViewUser),
        (status = 403, description = "Not an admin, an API key, or the last active admin", body = ErrorEnvelope),
        (status = 404, description = "No such user", body = ErrorEnvelope),
        (status = 422, description = "Invalid change", body = ErrorEnvelope),
    )
)]
pub async fn patch_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UserPatchRequest>,
) -> Result<Json<AdminViewUser>, ApiError> {
    let id = user_id(&id)?;
    let full_name = match body.full_name {
        Some(Some(name)) => {
            let name = name.trim().to_owned();
            if name.chars().count() > MAX_NAME_CHARS || name.chars().any(char::is_control) {
                return Err(ApiError::validation(
                    "full_name",
                    format!(
                        "full_name may be at most {MAX_NAME_CHARS} characters, without control characters"
                    ),
                ));
            }
            Some((!name.is_empty()).then_some(name))
        }
        other => other,
    };
    let current = state
        .store
        .user_by_id(id)
        .await?
        .ok_or(ApiError::NotFound)?;
    if body.token_limit.is_some() || body.token_limit_window.is_some() {
        let limit = body.token_limit.unwrap_or(current.token_limit);
        let window = body
            .token_limit_window
            .unwrap_or(current.token_limit_window);
        let default_window = state
            .config
            .rate_limits
            .tokens
            .map_or(86_400, |limit| limit.window.as_secs());
        check_token_limit(limit, window, default_window)
            .map_err(|(param, message)| ApiError::validation(param, message))?;
    }
    let patch = UserPatch {
        is_active: body.is_active,
        is_admin: body.is_admin,
        full_name,
        token_limit: body.token_limit,
        token_limit_window: body.token_limit_window,
    };
    let user = match state.store.update_user(id, &patch).await? {
        AdminChange::Done(user) => user,
        AdminChange::NotFound => return Err(ApiError::NotFound),
        AdminChange::LastAdmin => return Err(last_admin()),
    };
    state.users.forget(id);
    tracing::info!(admin_id = %admin.id, user_id = %id, "user changed by an admin");
    Ok(Json(user.into()))
}

/// End every session and API key of a user: their access tokens, refresh tokens and keys stop
/// working within seconds on every replica (a stream already running may finish).
#[utoipa::path(
    post, path = "/api/v1/admin/users/{id}/revoke", tag = "admin",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "Not an admin, or an API key", body = ErrorEnvelope),
        (status = 404, description = "No such user", body = ErrorEnvelope),
    )
)]
pub async fn revoke_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = user_id(&id)?;
    if !state.store.revoke_user(id).await? {
        return Err(ApiError::NotFound);
    }
    state.users.forget(id);
    state.keys.forget_user(id);
    tracing::info!(admin_id = %admin.id, user_id = %id, "user's sessions and keys revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Delete a user, with their sessions and API keys (their usage records stay until the
/// retention purge). Refused for the last active admin.
#[utoipa::path(
    delete, path = "/api/v1/admin/users/{id}", tag = "admin",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = Uuid, Path, description = "The user's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not an admin, an API key, or the last active admin", body = ErrorEnvelope),
        (status = 404, description = "No such user", body = ErrorEnvelope),
    )
)]
pub async fn delete_user(
    State(state): State<AppState>,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = user_id(&id)?;
    match state.store.delete_user(id).await? {
        AdminChange::Done(()) => {}
        AdminChange::NotFound => return Err(ApiError::NotFound),
        AdminChange::LastAdmin => return Err(last_admin()),
    }
    state.users.forget(id);
    state.keys.forget_user(id);
    tracing::info!(admin_id = %admin.id, user_id = %id, "user deleted by an admin");
    Ok(StatusCode::NO_CONTENT)
}

/// Usage of any user, or of everyone grouped by user.
#[utoipa::path(
    get, path = "/api/v1/admin/usage", tag = "admin",
    security(("bearer" = []), ("oauth2" = [])),
    params(
        ("user_id" = Option<Uuid>, Query, description = "One user's records; default: everyone's"),
        ("from" = Option<String>, Query, description = "RFC 3339; default: 30 days before `to`"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive; default: now"),
        ("group_by" = Option<String>, Query, description = "`day` (the default), `model`, `api_key` or `user` (the largest first)"),
    ),
    responses(
        (status = 200, description = "Usage", body = UsageReport),
        (status = 403, description = "Not an admin, or an API key", body = ErrorEnvelope),
        (status = 422, description = "Invalid query", body = ErrorEnvelope),
    )
)]
pub async fn get_admin_usage(
    State(state): State<AppState>,
    _admin: AdminUser,
    RawQuery(query): RawQuery,
) -> Result<Json<UsageReport>, ApiError> {
    let query = parse_query(query.as_deref(), Utc::now(), Asker::Admin)?;
    report(&state, query).await.map(Json)
}
