//! `/auth/api-keys`: API keys for servers, made, listed and deleted by their owner (with an
//! access token; a key cannot manage keys).

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{ApiJson, SessionUser};
use crate::state::AppState;
use crate::store::{ApiKeyRecord, KeyCreation, NewApiKey};

/// Keys one user may hold.
pub const MAX_KEYS_PER_USER: i64 = 100;
/// Longest key name, in characters.
const MAX_NAME_CHARS: usize = 100;
/// Longest lifetime a key may be given, in days.
const MAX_EXPIRY_DAYS: u32 = 3650;

/// `POST /auth/api-keys` body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// A label, 1 to 100 characters.
    name: String,
    /// Days until the key stops working, 1 to 3650; none: it never expires.
    expires_in_days: Option<u32>,
}

/// An API key as listed (never the secret).
#[derive(Serialize, ToSchema)]
pub struct ApiKey {
    /// The key's id.
    pub id: Uuid,
    /// Its label.
    pub name: String,
    /// Its first characters, to recognise it.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working (`null`: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last used (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRecord> for ApiKey {
    fn from(r: ApiKeyRecord) -> Self {
        ApiKey {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            created_at: r.created_at,
            expires_at: r.expires_at,
            last_used_at: r.last_used_at,
        }
    }
}

/// A key just made: the only time its secret is shown.
#[derive(Serialize, ToSchema)]
pub struct CreatedApiKey {
    /// The key's id.
    pub id: Uuid,
    /// Its label.
    pub name: String,
    /// The secret, `rk-…`: shown once, stored only as a hash.
    pub key: String,
    /// Its first characters.
    pub prefix: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops working (`null`: never).
    pub expires_at: Option<DateTime<Utc>>,
}

/// `GET /auth/api-keys` answer.
#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    /// Always `list`.
    pub object: &'static str,
    /// The caller's keys, newest first.
    pub data: Vec<ApiKey>,
}

/// Make an API key for servers. The key is a Bearer credential for chat, responses,
/// embeddings, models and usage, charged to your limits; it is shown once.
#[utoipa::path(
    post, path = "/api/v1/auth/api-keys", tag = "api-keys",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key, with its secret (shown once)", body = CreatedApiKey),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "An API key (keys are made with an access token)", body = ErrorEnvelope),
        (status = 409, description = "The user holds 100 keys already", body = ErrorEnvelope),
        (status = 422, description = "Invalid name or expiry", body = ErrorEnvelope),
    )
)]
pub async fn create_api_key(
    State(state): State<AppState>,
    SessionUser(user): SessionUser,
    ApiJson(body): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let name = body.name.trim();
    if name.is_empty()
        || name.chars().count() > MAX_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::validation(
            "name",
            format!("name must be 1 to {MAX_NAME_CHARS} characters, without control characters"),
        ));
    }
    let expires_at = match body.expires_in_days {
        None => None,
        Some(days @ 1..=MAX_EXPIRY_DAYS) => Some(Utc::now() + chrono::Duration::days(days.into())),
        Some(_) => {
            return Err(ApiError::validation(
                "expires_in_days",
                format!("expires_in_days must be 1 to {MAX_EXPIRY_DAYS}, or absent for no expiry"),
            ));
        }
    };
    let minted = state.keys.mint();
    let issued_at_ms = user.issued_at.unwrap_or(0).saturating_mul(1000);
    let created = state
        .store
        .create_api_key(
            NewApiKey {
                id: Uuid::new_v4(),
                user_id: user.id,
                name: name.to_owned(),
                key_hash: minted.hash,
                prefix: minted.prefix,
                expires_at,
            },
            MAX_KEYS_PER_USER,
            issued_at_ms,
        )
        .await?;
    let record = match created {
        KeyCreation::Created(record) => record,
        KeyCreation::TooMany => {
            return Err(ApiError::Conflict(format!(
                "you hold {MAX_KEYS_PER_USER} API keys already; delete one first"
            )));
        }
        // Revoked or deactivated since this token was issued (the status cache on this
        // replica had not seen it yet).
        KeyCreation::Refused => {
            return Err(ApiError::unauthorized(
                "this session has been revoked; log in again",
                "token_revoked",
            ));
        }
    };
    tracing::info!(user_id = %user.id, api_key_id = %record.id, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            id: record.id,
            name: record.name,
            key: minted.key,
            prefix: record.prefix,
            created_at: record.created_at,
            expires_at: record.expires_at,
        }),
    ))
}

/// Your API keys, without their secrets.
#[utoipa::path(
    get, path = "/api/v1/auth/api-keys", tag = "api-keys",
    security(("bearer" = []), ("oauth2" = [])),
    responses(
        (status = 200, description = "The caller's keys", body = ApiKeyList),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "An API key", body = ErrorEnvelope),
    )
)]
pub async fn list_api_keys(
    State(state): State<AppState>,
    SessionUser(user): SessionUser,
) -> Result<Json<ApiKeyList>, ApiError> {
    let keys = state.store.list_api_keys(user.id).await?;
    Ok(Json(ApiKeyList {
        object: "list",
        data: keys.into_iter().map(ApiKey::from).collect(),
    }))
}

/// Delete one of your API keys: it stops working within seconds on every replica.
#[utoipa::path(
    delete, path = "/api/v1/auth/api-keys/{id}", tag = "api-keys",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = Uuid, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "An API key", body = ErrorEnvelope),
        (status = 404, description = "No such key of yours", body = ErrorEnvelope),
    )
)]
pub async fn delete_api_key(
    State(state): State<AppState>,
    SessionUser(user): SessionUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    if !state.store.delete_api_key(user.id, id).await? {
        return Err(ApiError::NotFound);
    }
    // At once on this replica; the others within the key cache's few seconds.
    state.keys.forget_key(id);
    tracing::info!(user_id = %user.id, api_key_id = %id, "API key deleted");
    Ok(StatusCode::NO_CONTENT)
}
