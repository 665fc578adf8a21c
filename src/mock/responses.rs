//! The mock's Responses API: `POST /v1/responses` echoes the last user text, as one response
//! object or, with `"stream": true`, as the typed event sequence OpenAI sends
//! (`response.created` … `response.output_text.delta` … `response.completed`, each
//! `event: <type>` + `data: <json>` with a `sequence_number`), usage included. Responses are
//! kept (the most recent [`MAX_STORED`]) for the calls on a stored response.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{
    MOCK_MODEL, Mock, authorized, error, missing_key, now, pieces, request_of, sse, text_of,
};

/// How many responses the mock keeps, and how many bytes of them (about).
const MAX_STORED: usize = 4096;
const MAX_STORED_BYTES: usize = 64 * 1024 * 1024;

/// A stored response and its input items.
struct Entry {
    response: Value,
    input_items: Vec<Value>,
    background: bool,
    /// About how much memory it takes (the request's and the answer's sizes).
    bytes: usize,
}

/// The responses the mock keeps, oldest dropped first.
#[derive(Default)]
pub(super) struct Stored {
    order: VecDeque<String>,
    by_id: HashMap<String, Entry>,
    bytes: usize,
}

impl Stored {
    fn insert(&mut self, id: String, entry: Entry) {
        self.bytes += entry.bytes;
        self.order.push_back(id.clone());
        self.by_id.insert(id, entry);
        while self.order.len() > MAX_STORED || self.bytes > MAX_STORED_BYTES {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.by_id.remove(&oldest) {
                self.bytes -= gone.bytes;
            }
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(gone) = self.by_id.remove(id) {
            self.bytes -= gone.bytes;
            self.order.retain(|kept| kept != id);
        }
    }
}

/// The input as a list of items, each with an id, as `input_items` lists them.
fn input_items(id: &str, input: &Value) -> Vec<Value> {
    let items = match input {
        Value::String(text) => vec![json!({
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]
        })],
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if item.get("id").is_none() && item.is_object() {
                item["id"] = json!(format!("msg_in{i}_{id}"));
                item["status"] = json!("completed");
            }
            item
        })
        .collect()
}

fn not_found(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("Response with id '{id}' not found."),
        "invalid_request_error",
        "not_found",
    )
}

/// The text of `input`: a string, or the last user message of a list of input items.
fn input_text(input: &Value) -> Option<String> {
    match input {
        Value::String(text) => Some(text.clone()),
        Value::Array(items) => {
            items.iter().rev().find(|item| item["role"] == "user").map(
                |item| match &item["content"] {
                    Value::Array(parts) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join(" "),
                    other => text_of(other),
                },
            )
        }
        _ => None,
    }
}

/// A response object in `status`, with `text` as its one message (or no output yet).
fn response_object(
    id: &str,
    model: &str,
    request: &Value,
    status: &str,
    text: Option<&str>,
    usage: Value,
) -> Value {
    let output = match text {
        Some(text) => json!([{
            "type": "message", "id": format!("msg_{id}"), "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]
        }]),
        None => json!([]),
    };
    json!({
        "id": id, "object": "response", "created_at": now(), "status": status,
        "model": model, "output": output, "usage": usage,
        "error": null, "incomplete_details": null, "instructions": null,
        "max_output_tokens": request["max_output_tokens"],
        "previous_response_id": request["previous_response_id"],
        "parallel_tool_calls": true, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": "auto", "tools": [], "truncation": "disabled",
        "text": {"format": {"type": "text"}}, "metadata": {}, "store": true
    })
}

/// `POST /v1/responses`.
pub(super) async fn create_response(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match request_of(&headers, &body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let Some(prompt) = input_text(&request["input"]) else {
        return error(
            StatusCode::BAD_REQUEST,
            "input is required",
            "invalid_request_error",
            "missing_input",
        );
    };
    let model = request["model"].as_str().unwrap_or(MOCK_MODEL).to_owned();
    let answer = if prompt.trim().is_empty() {
        "Hello from the mock upstream.".to_owned()
    } else {
        prompt.clone()
    };
    if let Some(previous) = request["previous_response_id"].as_str() {
        let known = mock
            .stored
            .lock()
            .is_ok_and(|stored| stored.by_id.contains_key(previous));
        if !known {
            return error(
                StatusCode::NOT_FOUND,
                &format!("Previous response with id '{previous}' not found."),
                "invalid_request_error",
                "previous_response_not_found",
            );
        }
    }
    let input_tokens = prompt.split_whitespace().count();
    // Unguessable, like OpenAI's: a response id is not a secret, but it is not a counter either.
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    if !mock.options.latency.is_zero() {
        tokio::time::sleep(mock.options.latency).await;
    }
    let pieces = pieces(&answer, mock.options.chunks);
    let usage = json!({
        "input_tokens": input_tokens, "output_tokens": pieces.len(),
        "total_tokens": input_tokens + pieces.len(),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0}
    });
    let done = response_object(&id, &model, &request, "completed", Some(&answer), usage);
    if request["store"].as_bool() != Some(false)
        && let Ok(mut stored) = mock.stored.lock()
    {
        stored.insert(
            id.clone(),
            Entry {
                response: done.clone(),
                input_items: input_items(&id, &request["input"]),
                background: request["background"].as_bool() == Some(true),
                bytes: 2 * body.len() + answer.len(),
            },
        );
    }
    if request["stream"].as_bool() != Some(true) {
        return axum::Json(done).into_response();
    }
    let item_id = format!("msg_{id}");
    let mut events: Vec<(&str, Value)> = Vec::with_capacity(pieces.len() + 8);
    let started = response_object(&id, &model, &request, "in_progress", None, Value::Null);
    events.push(("response.created", json!({"response": started})));
    events.push(("response.in_progress", json!({"response": started})));
    events.push((
        "response.output_item.added",
        json!({"output_index": 0, "item": {"type": "message", "id": item_id,
            "status": "in_progress", "role": "assistant", "content": []}}),
    ));
    events.push((
        "response.content_part.added",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []}}),
    ));
    for piece in &pieces {
        events.push((
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push((
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": answer}),
    ));
    events.push((
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
            "part": {"type": "output_text", "text": answer, "annotations": []}}),
    ));
    events.push((
        "response.output_item.done",
        json!({"output_index": 0, "item": done["output"][0]}),
    ));
    events.push(("response.completed", json!({"response": done})));
    let frames = events
        .into_iter()
        .enumerate()
        .map(|(sequence, (kind, mut data))| {
            data["type"] = json!(kind);
            data["sequence_number"] = json!(sequence);
            Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
        })
        .collect();
    sse(frames, mock.options.chunk_delay)
}

/// Runs `f` on the stored response `id`, or answers 404 (401 without a key).
fn with_stored(
    mock: &Mock,
    headers: &HeaderMap,
    id: &str,
    f: impl FnOnce(&mut Stored) -> Response,
) -> Response {
    if !authorized(headers) {
        return missing_key();
    }
    match mock.stored.lock() {
        Ok(mut stored) if stored.by_id.contains_key(id) => f(&mut stored),
        _ => not_found(id),
    }
}

/// `GET /v1/responses/{id}`.
pub(super) async fn get_response(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_stored(&mock, &headers, &id, |stored| {
        axum::Json(stored.by_id[&id].response.clone()).into_response()
    })
}

/// `DELETE /v1/responses/{id}`.
pub(super) async fn delete_response(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_stored(&mock, &headers, &id, |stored| {
        stored.remove(&id);
        axum::Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
    })
}

/// `POST /v1/responses/{id}/cancel`: only a background response can be cancelled.
pub(super) async fn cancel_response(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_stored(&mock, &headers, &id, |stored| {
        let Some(entry) = stored.by_id.get_mut(&id) else {
            return not_found(&id);
        };
        if !entry.background {
            return error(
                StatusCode::BAD_REQUEST,
                "Only responses created with background=true can be cancelled.",
                "invalid_request_error",
                "invalid_request",
            );
        }
        entry.response["status"] = json!("cancelled");
        axum::Json(entry.response.clone()).into_response()
    })
}

/// `GET /v1/responses/{id}/input_items`.
pub(super) async fn list_input_items(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_stored(&mock, &headers, &id, |stored| {
        let items = &stored.by_id[&id].input_items;
        axum::Json(json!({
            "object": "list", "data": items, "has_more": false,
            "first_id": items.first().and_then(|i| i.get("id")),
            "last_id": items.last().and_then(|i| i.get("id")),
        }))
        .into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_a_string_or_the_last_user_item() {
        assert_eq!(input_text(&json!("hi there")).as_deref(), Some("hi there"));
        let items = json!([
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": [{"type": "input_text", "text": "second"}]}
        ]);
        assert_eq!(input_text(&items).as_deref(), Some("second"));
        assert_eq!(input_text(&json!(3)), None);
    }
}
