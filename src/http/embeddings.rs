//! `/embeddings`: authenticate, hand the body to `relay::embeddings`.

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{Ctx, RawJson, json_bytes};
use crate::http::ratelimit::{Admission, admit, set_token_headers, worst_case};
use crate::state::AppState;

/// The OpenAI Embeddings request. Only the fields relay checks are listed; every other field
/// (`dimensions`, `encoding_format`, …) is forwarded unchanged.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct EmbeddingRequest {
    /// Model id (required; `ALLOWED_MODELS` applies).
    model: String,
    /// A string, or an array of strings or token arrays.
    #[schema(value_type = Object)]
    input: serde_json::Value,
}

/// Create embeddings.
#[utoipa::path(
    post, path = "/api/v1/embeddings", tag = "embeddings",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "The embeddings, as the upstream answered"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "Model not allowed", body = ErrorEnvelope),
        (status = 422, description = "Invalid request", body = ErrorEnvelope),
        (status = 502, description = "Upstream unreachable or not OpenAI-shaped", body = ErrorEnvelope),
    )
)]
pub async fn create_embedding(
    State(state): State<AppState>,
    user: AuthUser,
    admission: Admission,
    Ctx(ctx): Ctx,
    RawJson(body): RawJson,
) -> Result<Response, ApiError> {
    // Embeddings have no output: the worst case is the input, bounded by the body's size.
    let worst = if state.limiter.token_shape(user.token_limit).is_some() {
        worst_case(&body, None)?
    } else {
        0
    };
    let tokens = match admit(&state, &user, &ctx, &admission, worst).await {
        Ok(tokens) => tokens,
        Err(refusal) => return Ok(refusal),
    };
    let answer = crate::relay::embeddings::create(&state.upstream, body, ctx).await?;
    let mut response = json_bytes(answer);
    if let Some(decision) = tokens {
        set_token_headers(&mut response, &decision);
    }
    Ok(response)
}
