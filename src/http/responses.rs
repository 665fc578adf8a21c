//! `/responses` and the calls on a stored response: authenticate, hand over to
//! `relay::responses` with the caller as the owner to check and record.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::chat::event_stream_response;
use crate::http::extract::{Ctx, RawJson, json_bytes};
use crate::http::ratelimit::{Admission, admit, default_output, set_token_headers, worst_case};
use crate::relay::responses::{self, Answer, Owners, StoredCall};
use crate::state::AppState;

/// The OpenAI Responses request. Only the fields relay checks are listed; every other field
/// (instructions, tools, text, reasoning, store, …) is forwarded unchanged.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct CreateResponseRequest {
    /// Model id; `DEFAULT_MODEL` when missing.
    model: Option<String>,
    /// A string, or an array of input items (an item naming an `id` must be one of the
    /// caller's).
    #[schema(value_type = serde_json::Value)]
    input: serde_json::Value,
    /// Stream the answer as typed server-sent events.
    stream: Option<bool>,
    /// At least 1.
    #[schema(minimum = 1)]
    max_output_tokens: Option<u32>,
    /// A response of the caller's own to continue.
    previous_response_id: Option<String>,
}

fn owners<'a>(state: &'a AppState, user: &AuthUser) -> Owners<'a> {
    Owners {
        store: &state.store,
        user: user.id,
    }
}

/// Create a response; streamed as typed server-sent events when `"stream": true`.
#[utoipa::path(
    post, path = "/api/v1/responses", tag = "responses",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = CreateResponseRequest,
    responses(
        (status = 200, description = "The response object (JSON), or `text/event-stream` typed events (`event: response.created` … `response.completed`)"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "Model not allowed", body = ErrorEnvelope),
        (status = 404, description = "`previous_response_id` is not one of the caller's responses", body = ErrorEnvelope),
        (status = 422, description = "Invalid request", body = ErrorEnvelope),
        (status = 502, description = "Upstream unreachable or not OpenAI-shaped", body = ErrorEnvelope),
        (status = 504, description = "Upstream timed out", body = ErrorEnvelope),
    )
)]
pub async fn create_response(
    State(state): State<AppState>,
    user: AuthUser,
    admission: Admission,
    Ctx(ctx): Ctx,
    RawJson(body): RawJson,
) -> Result<Response, ApiError> {
    let request = responses::prepare(body, state.upstream.policy(), default_output(&state, &user))?;
    let worst = if default_output(&state, &user).is_some() {
        // Stored context (a previous response, stored items, a stored prompt) and hosted tools'
        // results count as prompt, and their size is not in this body: with a token limit on,
        // they cannot be bounded, so they are refused.
        if let Some(param) = &request.stored_context {
            return Err(ApiError::validation(
                param.clone(),
                format!(
                    "with a token limit on, relay cannot bound what {param} costs (stored \
                     context or a hosted tool's results): send the conversation itself (with \
                     the AI SDK: providerOptions.openai.store = false), and use function tools"
                ),
            ));
        }
        worst_case(&request.body, request.max_output)?
    } else {
        0
    };
    let tokens = match admit(&state, &user, &ctx, &admission, worst).await {
        Ok(tokens) => tokens,
        Err(refusal) => return Ok(refusal),
    };
    let mut response =
        match responses::create(&state.upstream, &owners(&state, &user), request, ctx).await? {
            Answer::Stream(events) => event_stream_response(Body::from_stream(events)),
            Answer::Json(body) => json_bytes(body),
        };
    if let Some(decision) = tokens {
        set_token_headers(&mut response, &decision);
    }
    Ok(response)
}

async fn stored(
    state: &AppState,
    user: &AuthUser,
    call: StoredCall,
    id: &str,
    query: Option<String>,
) -> Result<Response, ApiError> {
    let body = responses::stored(
        &state.upstream,
        &owners(state, user),
        call,
        id,
        query.as_deref(),
    )
    .await?;
    Ok(json_bytes(body).into_response())
}

/// Get one of the caller's stored responses.
#[utoipa::path(
    get, path = "/api/v1/responses/{id}", tag = "responses",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = String, Path, description = "The response id")),
    responses(
        (status = 200, description = "The response object, as the upstream answered"),
        (status = 404, description = "Not a response of the caller's", body = ErrorEnvelope),
    )
)]
pub async fn get_response(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    stored(&state, &user, StoredCall::Get, &id, query).await
}

/// Delete one of the caller's stored responses.
#[utoipa::path(
    delete, path = "/api/v1/responses/{id}", tag = "responses",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = String, Path, description = "The response id")),
    responses(
        (status = 200, description = "`{\"id\", \"object\": \"response.deleted\", \"deleted\": true}`"),
        (status = 404, description = "Not a response of the caller's", body = ErrorEnvelope),
    )
)]
pub async fn delete_response(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    stored(&state, &user, StoredCall::Delete, &id, None).await
}

/// Cancel one of the caller's background responses.
#[utoipa::path(
    post, path = "/api/v1/responses/{id}/cancel", tag = "responses",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = String, Path, description = "The response id")),
    responses(
        (status = 200, description = "The response object"),
        (status = 404, description = "Not a response of the caller's", body = ErrorEnvelope),
    )
)]
pub async fn cancel_response(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    stored(&state, &user, StoredCall::Cancel, &id, None).await
}

/// List the input items of one of the caller's stored responses.
#[utoipa::path(
    get, path = "/api/v1/responses/{id}/input_items", tag = "responses",
    security(("bearer" = []), ("oauth2" = [])),
    params(("id" = String, Path, description = "The response id")),
    responses(
        (status = 200, description = "`{\"object\": \"list\", \"data\": [...], \"has_more\"}`"),
        (status = 404, description = "Not a response of the caller's", body = ErrorEnvelope),
    )
)]
pub async fn list_input_items(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    stored(&state, &user, StoredCall::InputItems, &id, query).await
}
