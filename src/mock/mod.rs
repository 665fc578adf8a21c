//! A built-in OpenAI-compatible upstream for development, tests and benchmarks.
//!
//! `relay mock-upstream` serves it on its own; `relay serve --dev` without `OPENAI_API_KEY` runs
//! it in-process. It answers `POST /v1/chat/completions` by echoing the last user message (as
//! JSON, or as SSE chunks word by word, with the usage chunk when asked); `POST /v1/embeddings`
//! with small deterministic vectors (model `mock-embed`) and usage; `GET /v1/models` and
//! `GET /v1/models/{id}` with `mock-echo` and `mock-embed`. Models named `mock-error-<status>`
//! answer with that status and an OpenAI error body (429 with `Retry-After: 7`), so clients'
//! error handling can be tried. `POST /v1/responses` answers the Responses API the same way
//! (`responses.rs`): a response object, or its typed event stream; it keeps the most recent
//! responses for `GET`/`DELETE /v1/responses/{id}`, `/cancel` and `/input_items`, and refuses an
//! unknown `previous_response_id` with a 404, as OpenAI does. Apart from those, it keeps no
//! state and does little work per request, so that it is never the bottleneck of a benchmark.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::error::ErrorEnvelope;

mod embeddings;
mod responses;

/// The largest request body the mock reads.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// The chat model the mock offers.
pub const MOCK_MODEL: &str = "mock-echo";
/// The embedding model the mock offers.
pub const MOCK_EMBEDDING_MODEL: &str = "mock-embed";

/// How the mock behaves.
#[derive(Debug, Clone, Default)]
pub struct MockOptions {
    /// Delay before the first byte of every answer.
    pub latency: Duration,
    /// Number of content chunks per stream; `None`: one per word of the answer.
    pub chunks: Option<usize>,
    /// Delay between stream chunks.
    pub chunk_delay: Duration,
}

struct Mock {
    options: MockOptions,
    counter: AtomicU64,
    /// Stored responses (the most recent few thousand), for `GET /v1/responses/{id}` & co.
    stored: std::sync::Mutex<responses::Stored>,
}

/// The mock's routes.
pub fn router(options: MockOptions) -> Router {
    let state = Arc::new(Mock {
        options,
        counter: AtomicU64::new(0),
        stored: std::sync::Mutex::default(),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/embeddings", post(embeddings::create_embeddings))
        .route("/v1/responses", post(responses::create_response))
        .route(
            "/v1/responses/{id}",
            get(responses::get_response).delete(responses::delete_response),
        )
        .route(
            "/v1/responses/{id}/cancel",
            post(responses::cancel_response),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::list_input_items),
        )
        // Whatever relay may forward (its `MAX_REQUEST_BYTES` is 8 MiB by default), and more.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the mock on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: MockOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(options))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Starts the mock on a free loopback port, for the life of the async runtime, and returns its
/// address (`http://ADDR/v1` is the base URL to point relay at). Used by `relay serve --dev`
/// without an upstream key, and by the tests.
pub async fn spawn(options: MockOptions) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = serve(listener, options, std::future::pending()).await {
            tracing::error!(error = %err, "the built-in mock upstream stopped");
        }
    });
    Ok(addr)
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    let body = ErrorEnvelope::new(kind.to_owned(), message, Some(code.to_owned()), None);
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_bytes(),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
    }
    response
}

/// The request's JSON body, or the answer when it has no key or no JSON.
fn request_of(headers: &HeaderMap, body: &[u8]) -> Result<Value, Box<Response>> {
    if !authorized(headers) {
        return Err(Box::new(missing_key()));
    }
    serde_json::from_slice(body).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "body is not JSON",
            "invalid_request_error",
            "invalid_json",
        ))
    })
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn missing_key() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "missing API key",
        "invalid_request_error",
        "invalid_api_key",
    )
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "relay-mock"})
}

async fn list_models(headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return missing_key();
    }
    axum::Json(json!({
        "object": "list",
        "data": [model_object(MOCK_MODEL), model_object(MOCK_EMBEDDING_MODEL)]
    }))
    .into_response()
}

async fn get_model(headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !authorized(&headers) {
        return missing_key();
    }
    if id == MOCK_MODEL || id == MOCK_EMBEDDING_MODEL {
        axum::Json(model_object(&id)).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            &format!("The model `{id}` does not exist"),
            "invalid_request_error",
            "model_not_found",
        )
    }
}

async fn chat_completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match request_of(&headers, &body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let model = request["model"].as_str().unwrap_or(MOCK_MODEL).to_owned();
    if let Some(status) = model
        .strip_prefix("mock-error-")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        return error(
            status,
            &format!("mock error {}", status.as_u16()),
            "mock_error",
            "mock_error",
        );
    }
    let Some(messages) = request["messages"].as_array() else {
        return error(
            StatusCode::BAD_REQUEST,
            "messages is required",
            "invalid_request_error",
            "missing_messages",
        );
    };
    let prompt_tokens: usize = messages
        .iter()
        .map(|m| text_of(&m["content"]).split_whitespace().count())
        .sum();
    let mut answer = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .map(|m| text_of(&m["content"]))
        .unwrap_or_default();
    if answer.trim().is_empty() {
        answer = "Hello from the mock upstream.".to_owned();
    }
    let n = mock.counter.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-mock{n}");
    if !mock.options.latency.is_zero() {
        tokio::time::sleep(mock.options.latency).await;
    }
    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        stream_answer(
            &mock.options,
            id,
            model,
            answer,
            prompt_tokens,
            include_usage,
        )
    } else {
        let completion_tokens = answer.split_whitespace().count();
        axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens
            }
        }))
        .into_response()
    }
}

/// The answer's pieces: its words (each with the space before it), or exactly `chunks` pieces.
fn pieces(answer: &str, chunks: Option<usize>) -> Vec<String> {
    let words: Vec<String> = answer
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    match chunks {
        None => words,
        Some(k) => (0..k).map(|i| words[i % words.len()].clone()).collect(),
    }
}

fn stream_answer(
    options: &MockOptions,
    id: String,
    model: String,
    answer: String,
    prompt_tokens: usize,
    include_usage: bool,
) -> Response {
    let created = now();
    let pieces = pieces(&answer, options.chunks);
    let completion_tokens = pieces.len();
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            // OpenAI sends `"usage": null` on every chunk when usage was asked for.
            c["usage"] = Value::Null;
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut frames: Vec<Bytes> = Vec::with_capacity(pieces.len() + 4);
    frames.push(chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    ));
    for piece in pieces {
        frames.push(chunk(json!({"content": piece}), Value::Null));
    }
    frames.push(chunk(json!({}), json!("stop")));
    if include_usage {
        let usage = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock", "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
        });
        frames.push(Bytes::from(format!("data: {usage}\n\n")));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse(frames, options.chunk_delay)
}

/// An SSE answer sending `frames` one by one, `delay` apart.
fn sse(frames: Vec<Bytes>, delay: Duration) -> Response {
    let stream = futures_util::stream::unfold(
        (frames.into_iter(), true),
        move |(mut frames, first)| async move {
            let frame = frames.next()?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok::<_, Infallible>(frame), (frames, false)))
        },
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_rejoin_to_the_answer() {
        assert_eq!(pieces("a b  c", None).concat(), "a b  c");
        assert_eq!(pieces("a b", Some(5)).len(), 5);
    }
}
