//! A fault-injecting OpenAI-compatible upstream for tests. The request's `model` picks the
//! behaviour; every request is recorded so tests can check what relay sent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

/// What relay sent.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
    /// The body's bytes as they arrived.
    pub raw: Bytes,
}

#[derive(Default)]
pub struct Shared {
    pub received: Mutex<Vec<Received>>,
    pub model_hits: AtomicUsize,
    /// When a streaming response's body was dropped (the connection closed).
    pub stream_closed: Mutex<Option<Instant>>,
    /// Calls on stored responses: `METHOD /v1/responses/…?query`.
    pub stored_calls: Mutex<Vec<String>>,
    /// Responses created so far (for their ids).
    pub responses_created: AtomicUsize,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
}

impl FakeUpstream {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

pub async fn start() -> FakeUpstream {
    let shared = Arc::new(Shared::default());
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/v1/responses", post(responses))
        .route("/v1/responses/{*rest}", axum::routing::any(stored_response))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeUpstream { addr, shared }
}

/// A base URL where nothing listens.
pub async fn unreachable_base_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/v1")
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    shared.model_hits.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({"object": "list", "data": [
        {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"},
        {"id": "gpt-4o", "object": "model", "created": 2, "owned_by": "openai"},
        {"id": "o1", "object": "model", "created": 3, "owned_by": "openai"}
    ]}))
    .into_response()
}

fn chunk(content: &str) -> Bytes {
    let c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    Bytes::from(format!("data: {c}\n\n"))
}

fn sse(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

/// Records when it is dropped: the response body ends or the connection closes.
struct CloseGuard(Arc<Shared>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        *self.0.stream_closed.lock().unwrap() = Some(Instant::now());
    }
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push(Received {
        headers: headers.clone(),
        body: body.clone(),
        raw,
    });
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let error = |status: u16, message: &str| {
        (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(json!({"error": {"message": message, "type": "upstream_type", "code": "upstream_code", "param": null, "extra": "dropped"}})),
        )
            .into_response()
    };
    match model.as_str() {
        "fake-500" => error(500, "the upstream broke"),
        "fake-404" => error(404, "The model `fake-404` does not exist"),
        "fake-401" => error(401, "Incorrect API key provided"),
        "fake-429" => {
            let mut r = error(429, "slow down");
            r.headers_mut().insert(header::RETRY_AFTER, "42".parse().unwrap());
            r
        }
        "fake-429-bare" => error(429, "slow down"),
        "fake-leak-key" => {
            let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
            let key = auth.trim_start_matches("Bearer ");
            let mut r = error(400, &format!("Incorrect API key provided: {key}. Header was: {auth}"));
            // The key in another field too, glued to other text.
            let body = json!({"error": {"message": format!("key={key}"), "type": "invalid_request_error", "code": format!("bad_key:{key}"), "param": key}});
            *r.body_mut() = Body::from(body.to_string());
            r
        }
        "fake-leak-upper" => {
            let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
            error(400, &format!("Incorrect API key: {}", auth.trim_start_matches("Bearer ").to_uppercase()))
        }
        "fake-stream-error-leak" => {
            let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
            let key = auth.trim_start_matches("Bearer ").to_owned();
            let event = json!({"error": {"message": format!("quota of {key} ({}) used up", key.to_uppercase()), "type": "server_error"}});
            let stream = futures_util::stream::iter([
                Ok::<_, Infallible>(chunk("partial")),
                Ok(Bytes::from(format!("data: {event}\n\n"))),
            ]);
            sse(Body::from_stream(stream))
        }
        "fake-garbage" => ([(header::CONTENT_TYPE, "text/html")], "<html>not an API</html>").into_response(),
        "fake-garbage-500" => (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response(),
        "fake-json-not-completion" => axum::Json(json!({"hello": "world"})).into_response(),
        "fake-hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            error(500, "unreachable")
        }
        "fake-cut" => {
            let stream = futures_util::stream::iter([Ok(chunk("partial")), Ok(chunk(" answer"))])
                .chain(futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<Bytes, std::io::Error>(std::io::Error::other("cut"))
                }));
            sse(Body::from_stream(stream))
        }
        "fake-slow" => {
            // 25 chunks, 200 ms apart: 5 s in all.
            let stream = futures_util::stream::unfold(0u32, |i| async move {
                match i {
                    0..25 => {
                        if i > 0 {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Some((Ok::<_, Infallible>(chunk(&format!("w{i} "))), i + 1))
                    }
                    25 => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), i + 1)),
                    _ => None,
                }
            });
            sse(Body::from_stream(stream))
        }
        "fake-endless" => {
            let guard = CloseGuard(shared.clone());
            let stream = futures_util::stream::unfold(guard, |guard| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, Infallible>(chunk("tick ")), guard))
            });
            sse(Body::from_stream(stream))
        }
        "fake-stall" => {
            let stream = futures_util::stream::iter([Ok::<_, Infallible>(chunk("first"))])
                .chain(futures_util::stream::pending());
            sse(Body::from_stream(stream))
        }
        _ => axum::Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake answer"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
        }))
        .into_response(),
    }
}

use futures_util::StreamExt as _;

/// One typed event of the Responses API.
fn typed(kind: &str, mut data: Value) -> Bytes {
    data["type"] = json!(kind);
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

fn delta(text: &str) -> Bytes {
    typed(
        "response.output_text.delta",
        json!({"delta": text, "output_index": 0}),
    )
}

/// `POST /v1/responses`: the model picks the behaviour, as for chat.
async fn responses(State(shared): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push(Received {
        headers,
        body: body.clone(),
        raw,
    });
    let n = shared.responses_created.fetch_add(1, Ordering::SeqCst);
    let id = format!("resp_fake{n}");
    let item = json!({"type": "message", "id": format!("msg_fake{n}"), "role": "assistant",
        "content": [{"type": "output_text", "text": "fake answer"}]});
    let object = |status: &str, usage: Value| {
        let output = if usage.is_null() {
            json!([])
        } else {
            json!([item])
        };
        json!({"id": id, "object": "response", "status": status, "model": body["model"],
            "output": output, "usage": usage, "error": null})
    };
    let created = typed(
        "response.created",
        json!({"response": object("in_progress", Value::Null)}),
    );
    let usage = json!({"input_tokens": 11, "output_tokens": 2, "total_tokens": 13});
    let completed = typed(
        "response.completed",
        json!({"response": object("completed", usage.clone())}),
    );
    if body["stream"] != json!(true) {
        return axum::Json(object("completed", usage)).into_response();
    }
    match body["model"].as_str().unwrap_or_default() {
        "fake-cut" => {
            let stream = futures_util::stream::iter([Ok(created), Ok(delta("partial"))]).chain(
                futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err::<Bytes, std::io::Error>(std::io::Error::other("cut"))
                }),
            );
            sse(Body::from_stream(stream))
        }
        "fake-stall" => {
            let stream =
                futures_util::stream::iter([Ok::<_, Infallible>(created), Ok(delta("first"))])
                    .chain(futures_util::stream::pending());
            sse(Body::from_stream(stream))
        }
        "fake-endless" => {
            let guard = CloseGuard(shared.clone());
            let head = futures_util::stream::iter([Ok::<_, Infallible>(created)]);
            let ticks = futures_util::stream::unfold(guard, |guard| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Ok::<_, Infallible>(delta("tick ")), guard))
            });
            sse(Body::from_stream(head.chain(ticks)))
        }
        // A keep-alive comment in a read of its own before `response.created`.
        "fake-comment-first" => sse(Body::from_stream(futures_util::stream::iter([
            Ok::<_, Infallible>(Bytes::from_static(b": keep-alive\n\n")),
            Ok(created),
            Ok(delta("after comment")),
            Ok(completed),
        ]))),
        // `data:` lines only, with CRLF line ends: the type is in the data.
        "fake-data-only" => {
            let text = [created, delta("data only"), completed]
                .iter()
                .map(|e| {
                    let e = String::from_utf8(e.to_vec()).unwrap();
                    let data = e
                        .lines()
                        .find(|l| l.starts_with("data: "))
                        .unwrap()
                        .to_owned();
                    format!("{data}\r\n\r\n")
                })
                .collect::<String>();
            sse(Body::from(text))
        }
        // A server that sends no `response.created`: streamed all the same.
        "fake-no-created" => sse(Body::from_stream(futures_util::stream::iter([
            Ok::<_, Infallible>(delta("no created")),
            Ok(completed),
        ]))),
        _ => sse(Body::from_stream(futures_util::stream::iter([
            Ok::<_, Infallible>(created),
            Ok(delta("fake ")),
            Ok(delta("answer")),
            Ok(completed),
        ]))),
    }
}

/// Any call on a stored response: recorded, and answered with what was asked.
async fn stored_response(
    State(shared): State<Arc<Shared>>,
    method: http::Method,
    uri: http::Uri,
) -> Response {
    let call = format!(
        "{method} {}",
        uri.path_and_query().map_or("", |p| p.as_str())
    );
    shared.stored_calls.lock().unwrap().push(call.clone());
    axum::Json(json!({"object": "response", "call": call})).into_response()
}
