//! `/chat/completions`, `/chat/completions/stream`, `/chat/models` and `/models`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{BodyKind, body_kind, read_body};
use crate::http::middleware::{RequestContext, Usage};
use crate::http::ratelimit::{ChatLimit, Limited, ModelsLimit};
use crate::relay::chat::{parse_body, prepare};
use crate::relay::sse::SseRelay;
use crate::relay::upstream::Model;
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

/// `GET /models` answer.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models clients may use.
    pub data: Vec<Model>,
}

#[derive(Deserialize)]
struct CompletionView {
    choices: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    usage: Option<Usage>,
}

fn request_context(req: &Request) -> Arc<RequestContext> {
    req.extensions()
        .get::<Arc<RequestContext>>()
        .cloned()
        .unwrap_or_else(|| Arc::new(RequestContext::new(HeaderValue::from_static("-"))))
}

/// The authentication result is taken as it came, so that its 401 also passes through the
/// rate-limit headers of the caller.
async fn relay_chat(
    state: AppState,
    auth: Result<AuthUser, ApiError>,
    req: Request,
    force_stream: bool,
) -> Result<Response, ApiError> {
    auth?;
    if body_kind(req.headers()) != BodyKind::Json {
        return Err(ApiError::UnsupportedMediaType(
            "expected Content-Type: application/json".into(),
        ));
    }
    let ctx = request_context(&req);
    let raw = read_body(req).await?;
    let value = parse_body(&raw)?;
    let chat = prepare(value, raw, &state.config, force_stream)?;
    let upstream = state.upstream.post_chat(chat.body, chat.stream).await?;

    let is_sse = upstream
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if chat.stream && is_sse {
        let relay = SseRelay::new(
            http_body_util::BodyDataStream::new(upstream.into_body()),
            state.config.upstream.timeout,
            chat.forward_usage,
            ctx,
        );
        return Ok((
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
            Body::from_stream(relay),
        )
            .into_response());
    }

    // A whole JSON answer (also when an upstream ignored `stream`): check that it is a
    // completion, note its usage, and pass the bytes on untouched.
    let body: Bytes = state.upstream.read_completion(upstream).await?;
    let view: CompletionView = serde_json::from_slice(&body).map_err(|_| {
        tracing::warn!(model = %chat.model, "upstream answer is not a chat completion");
        ApiError::BadGateway("the upstream's answer is not in the OpenAI format".into())
    })?;
    let _ = view.choices;
    if let Some(usage) = view.usage {
        ctx.set_usage(usage);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// Create a chat completion; streamed as server-sent events when `"stream": true`.
#[utoipa::path(
    post, path = "/chat/completions", tag = "chat",
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
    limit: Limited<ChatLimit>,
    auth: Result<AuthUser, ApiError>,
    req: Request,
) -> Response {
    limit.wrap(relay_chat(state, auth, req, false).await)
}

/// Create a chat completion, always streamed.
#[utoipa::path(
    post, path = "/chat/completions/stream", tag = "chat",
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
    limit: Limited<ChatLimit>,
    auth: Result<AuthUser, ApiError>,
    req: Request,
) -> Response {
    limit.wrap(relay_chat(state, auth, req, true).await)
}

async fn allowed_models(
    state: &AppState,
    auth: Result<AuthUser, ApiError>,
) -> Result<Json<ModelList>, ApiError> {
    auth?;
    let models = state.upstream.models().await?;
    let data = models
        .iter()
        .filter(|m| {
            state
                .config
                .allowed_models
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&m.id))
        })
        .cloned()
        .collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// The models clients may use: the upstream's list (cached), filtered by `ALLOWED_MODELS`.
#[utoipa::path(
    get, path = "/chat/models", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    responses((status = 200, description = "Models", body = ModelList))
)]
pub async fn list_chat_models(
    State(state): State<AppState>,
    limit: Limited<ModelsLimit>,
    auth: Result<AuthUser, ApiError>,
) -> Response {
    limit.wrap(allowed_models(&state, auth).await)
}

/// Same as `/chat/models`, at the path the official SDKs use.
#[utoipa::path(
    get, path = "/models", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    responses((status = 200, description = "Models", body = ModelList))
)]
pub async fn list_models(
    State(state): State<AppState>,
    limit: Limited<ModelsLimit>,
    auth: Result<AuthUser, ApiError>,
) -> Response {
    limit.wrap(allowed_models(&state, auth).await)
}
