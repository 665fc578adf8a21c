//! `/chat/completions` and `/chat/completions/stream`: authenticate, hand the body to
//! `relay::chat`, and turn what comes back into a response.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderValue, header};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::context::RequestContext;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{Ctx, RawJson, json_bytes};
use crate::http::ratelimit::{Admission, admit, default_output, set_token_headers, worst_case};
use crate::relay::chat::{Completion, complete, prepare};
use crate::state::AppState;

/// The OpenAI Chat Completions request. Only the fields relay checks are listed; every other
/// field (tools, response_format, seed, …) is forwarded unchanged.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ChatCompletionRequest {
    /// Model id; `DEFAULT_MODEL` when missing.
    model: Option<String>,
    /// The conversation: a non-empty array of objects, each with a `role`.
    #[schema(value_type = Vec<Object>)]
    messages: Vec<serde_json::Value>,
    /// Stream the answer as server-sent events.
    stream: Option<bool>,
    /// 0 to 2.
    temperature: Option<f64>,
    /// 0 to 1.
    top_p: Option<f64>,
    /// At least 1.
    n: Option<u32>,
    /// At least 1.
    max_tokens: Option<u32>,
    /// At least 1.
    max_completion_tokens: Option<u32>,
}

/// Create a chat completion; streamed as server-sent events when `"stream": true`.
#[utoipa::path(
    post, path = "/api/v1/chat/completions", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion (JSON), or `text/event-stream` chunks ending with `data: [DONE]`"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "Model not allowed", body = ErrorEnvelope),
        (status = 422, description = "Invalid request", body = ErrorEnvelope),
        (status = 502, description = "Upstream unreachable or not OpenAI-shaped", body = ErrorEnvelope),
        (status = 504, description = "Upstream timed out", body = ErrorEnvelope),
    )
)]
pub async fn create_chat_completion(
    State(state): State<AppState>,
    user: AuthUser,
    admission: Admission,
    Ctx(ctx): Ctx,
    RawJson(body): RawJson,
) -> Result<Response, ApiError> {
    relay_chat(&state, &user, &admission, ctx, body, false).await
}

/// Create a chat completion, always streamed.
#[utoipa::path(
    post, path = "/api/v1/chat/completions/stream", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "`text/event-stream` chunks ending with `data: [DONE]`"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 422, description = "Invalid request", body = ErrorEnvelope),
    )
)]
pub async fn stream_chat_completion(
    State(state): State<AppState>,
    user: AuthUser,
    admission: Admission,
    Ctx(ctx): Ctx,
    RawJson(body): RawJson,
) -> Result<Response, ApiError> {
    relay_chat(&state, &user, &admission, ctx, body, true).await
}

/// Validates and relays one chat completion; `force_stream` for `/chat/completions/stream`.
/// With a token limit on, the request's worst case is reserved first (with its request-limit
/// check, see `ratelimit::admit`): its prompt, bounded by the body's size in bytes, plus its
/// output cap.
async fn relay_chat(
    state: &AppState,
    user: &AuthUser,
    admission: &Admission,
    ctx: Arc<RequestContext>,
    raw: Bytes,
    force_stream: bool,
) -> Result<Response, ApiError> {
    let chat = prepare(
        raw,
        state.upstream.policy(),
        force_stream,
        default_output(state, user),
    )?;
    let limited = default_output(state, user).is_some();
    let worst = if limited {
        if let Some(param) = chat.unbounded {
            return Err(ApiError::validation(
                param,
                format!(
                    "with a token limit on, relay cannot bound what {param} costs (web search \
                     results count as prompt): leave it out, or search in your own function tool"
                ),
            ));
        }
        worst_case(&chat.body, chat.max_output)?
    } else {
        0
    };
    let tokens = match admit(state, user, &ctx, admission, worst).await {
        Ok(tokens) => tokens,
        Err(refusal) => return Ok(refusal),
    };
    let mut response = match complete(&state.upstream, chat, ctx).await? {
        Completion::Stream(events) => event_stream_response(Body::from_stream(events)),
        Completion::Json(body) => json_bytes(body),
    };
    if let Some(decision) = tokens {
        set_token_headers(&mut response, &decision);
    }
    Ok(response)
}

/// A `text/event-stream` answer, marked so that no cache or proxy (nginx) holds it back.
pub fn event_stream_response(events: Body) -> Response {
    crate::http::extract::answer(
        events,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
    )
}
