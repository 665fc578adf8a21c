//! The mock's Responses API: `POST /v1/responses` echoes the last user text, as one response
//! object or, with `"stream": true`, as the typed event sequence OpenAI sends
//! (`response.created` … `response.output_text.delta` … `response.completed`, each
//! `event: <type>` + `data: <json>` with a `sequence_number`), usage included.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{MOCK_MODEL, Mock, error, now, pieces, request_of, sse, text_of};

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
    let input_tokens = prompt.split_whitespace().count();
    let id = format!("resp_mock{}", mock.counter.fetch_add(1, Ordering::Relaxed));
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
