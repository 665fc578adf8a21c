//! Chat completions: [`prepare`] validates what relay relies on, fills in the default model,
//! asks for usage on streams and forwards every other field unchanged; [`complete`] sends the
//! request upstream and hands back either a relayed stream or a checked JSON body.

use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http_body_util::BodyDataStream;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Upstream;
use super::models::ModelPolicy;
use super::sse::SseRelay;
use crate::context::{RequestContext, Usage};
use crate::error::ApiError;

/// A request ready to send upstream.
#[derive(Debug)]
pub struct PreparedChat {
    /// The body to send (the client's bytes when nothing had to change).
    pub body: Bytes,
    /// Whether the answer is streamed.
    pub stream: bool,
    /// Whether the client asked for the usage chunk (`stream_options.include_usage`); relay
    /// always asks the upstream for it, and drops it from the stream when the client did not.
    pub forward_usage: bool,
    /// The model used.
    pub model: String,
}

/// Parses the body as JSON (400 when it is not).
pub fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest {
        message: format!("the body is not valid JSON: {e}"),
        code: "invalid_json",
    })
}

fn check_number(
    body: &Map<String, Value>,
    name: &str,
    min: f64,
    max: Option<f64>,
    integer: bool,
) -> Result<(), ApiError> {
    let Some(value) = body.get(name) else {
        return Ok(());
    };
    if value.is_null() {
        return Ok(());
    }
    let range = match max {
        Some(max) => format!("between {min} and {max}"),
        None => format!("at least {min}"),
    };
    let kind = if integer { "an integer" } else { "a number" };
    let ok = match (integer, value.as_f64()) {
        (true, _) if value.as_i64().is_none() && value.as_u64().is_none() => false,
        (_, Some(v)) => v >= min && max.is_none_or(|max| v <= max),
        (_, None) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(
            name,
            format!("{name} must be {kind} {range}"),
        ))
    }
}

fn validate(body: &Map<String, Value>) -> Result<(), ApiError> {
    let messages = body
        .get("messages")
        .ok_or_else(|| ApiError::validation("messages", "messages is required"))?;
    let messages = messages
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::validation("messages", "messages must be a non-empty array"))?;
    for (i, message) in messages.iter().enumerate() {
        let message = message.as_object().ok_or_else(|| {
            ApiError::validation(format!("messages[{i}]"), "each message must be an object")
        })?;
        match message.get("role").and_then(Value::as_str) {
            Some(role) if !role.is_empty() => {}
            _ => {
                return Err(ApiError::validation(
                    format!("messages[{i}].role"),
                    "each message needs a role (a string)",
                ));
            }
        }
    }
    match body.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if !m.trim().is_empty() => {}
        Some(_) => {
            return Err(ApiError::validation(
                "model",
                "model must be a non-empty string",
            ));
        }
    }
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => {}
        Some(_) => return Err(ApiError::validation("stream", "stream must be a boolean")),
    }
    match body.get("stream_options") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(ApiError::validation(
                "stream_options",
                "stream_options must be an object",
            ));
        }
    }
    check_number(body, "temperature", 0.0, Some(2.0), false)?;
    check_number(body, "top_p", 0.0, Some(1.0), false)?;
    check_number(body, "n", 1.0, None, true)?;
    check_number(body, "max_tokens", 1.0, None, true)?;
    check_number(body, "max_completion_tokens", 1.0, None, true)?;
    Ok(())
}

/// Validates and prepares a request. `force_stream` is set by `/chat/completions/stream`.
/// `original` is the client's body, reused as is when nothing has to change.
pub fn prepare(
    value: Value,
    original: Bytes,
    policy: &ModelPolicy,
    force_stream: bool,
) -> Result<PreparedChat, ApiError> {
    let Value::Object(mut body) = value else {
        return Err(ApiError::validation(
            "body",
            "the body must be a JSON object",
        ));
    };
    validate(&body)?;
    let mut changed = false;

    let model = match body.get("model").and_then(Value::as_str) {
        Some(model) => model.to_owned(),
        None => {
            let model = policy.default_model().to_owned();
            body.insert("model".into(), Value::String(model.clone()));
            changed = true;
            model
        }
    };
    policy.check(&model)?;

    let stream = force_stream || body.get("stream").and_then(Value::as_bool) == Some(true);
    if force_stream && body.get("stream").and_then(Value::as_bool) != Some(true) {
        body.insert("stream".into(), Value::Bool(true));
        changed = true;
    }
    let mut forward_usage = false;
    if stream {
        let options = body
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        if options.is_null() {
            *options = Value::Object(Map::new());
        }
        if let Value::Object(options) = options {
            forward_usage = options.get("include_usage").and_then(Value::as_bool) == Some(true);
            if !forward_usage {
                options.insert("include_usage".into(), Value::Bool(true));
                changed = true;
            }
        }
    }

    let body = if changed {
        Bytes::from(serde_json::to_vec(&Value::Object(body)).map_err(ApiError::internal)?)
    } else {
        original
    };
    Ok(PreparedChat {
        body,
        stream,
        forward_usage,
        model,
    })
}

/// What the upstream answered, ready for the client.
pub enum Completion {
    /// Server-sent events, relayed as they arrive (usage recorded in the request's context).
    Stream(SseRelay<BodyDataStream<Incoming>>),
    /// A whole JSON completion, checked to be one, usage recorded, bytes untouched.
    Json(Bytes),
}

#[derive(Deserialize)]
struct CompletionView {
    #[allow(dead_code)] // required, so that an answer without it is not taken for a completion
    choices: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    usage: Option<Usage>,
}

/// Sends a prepared request upstream: the one way a chat completion leaves relay.
pub async fn complete(
    upstream: &Upstream,
    chat: PreparedChat,
    ctx: Arc<RequestContext>,
) -> Result<Completion, ApiError> {
    let response = upstream.post_chat(chat.body, chat.stream).await?;
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if chat.stream && is_sse {
        return Ok(Completion::Stream(SseRelay::new(
            BodyDataStream::new(response.into_body()),
            upstream.timeout(),
            chat.forward_usage,
            ctx,
        )));
    }
    // A whole JSON answer (also when an upstream ignored `stream`).
    let body = upstream.read_completion(response).await?;
    let view: CompletionView = serde_json::from_slice(&body).map_err(|_| {
        tracing::warn!(model = %chat.model, "upstream answer is not a chat completion");
        ApiError::BadGateway("the upstream's answer is not in the OpenAI format".into())
    })?;
    if let Some(usage) = view.usage {
        ctx.set_usage(usage);
    }
    Ok(Completion::Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};
    use serde_json::json;

    fn config(extra: &[(&str, &str)]) -> ModelPolicy {
        let vars = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ModelPolicy::new(&Config::from_vars(&vars, Mode::Dev).unwrap().upstream)
    }

    fn run(body: Value, force: bool) -> Result<PreparedChat, ApiError> {
        let bytes = Bytes::from(body.to_string());
        prepare(body, bytes, &config(&[]), force)
    }

    fn param_of(body: Value) -> String {
        match run(body, false) {
            Err(ApiError::Validation { param, .. }) => param,
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let m = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(param_of(json!({})), "messages");
        assert_eq!(param_of(json!({"messages": []})), "messages");
        assert_eq!(param_of(json!({"messages": "hi"})), "messages");
        assert_eq!(param_of(json!({"messages": [1]})), "messages[0]");
        assert_eq!(
            param_of(json!({"messages": [{"role": "user"}, {"content": "x"}]})),
            "messages[1].role"
        );
        assert_eq!(param_of(json!({"messages": m, "model": 4})), "model");
        assert_eq!(
            param_of(json!({"messages": m, "temperature": 2.5})),
            "temperature"
        );
        assert_eq!(
            param_of(json!({"messages": m, "temperature": "hot"})),
            "temperature"
        );
        assert_eq!(param_of(json!({"messages": m, "top_p": -0.1})), "top_p");
        assert_eq!(param_of(json!({"messages": m, "n": 0})), "n");
        assert_eq!(param_of(json!({"messages": m, "n": 1.5})), "n");
        assert_eq!(
            param_of(json!({"messages": m, "max_tokens": 0})),
            "max_tokens"
        );
        assert_eq!(
            param_of(json!({"messages": m, "max_completion_tokens": -1})),
            "max_completion_tokens"
        );
        assert_eq!(param_of(json!({"messages": m, "stream": "yes"})), "stream");
        assert_eq!(param_of(json!([1, 2])), "body");
        for ok in [
            json!({"messages": m, "temperature": 0, "top_p": 1, "n": 2, "max_tokens": 5}),
            json!({"messages": m, "temperature": null, "max_tokens": null}),
        ] {
            assert!(run(ok, false).is_ok());
        }
    }

    #[test]
    fn unchanged_bodies_are_forwarded_byte_for_byte() {
        let raw = Bytes::from_static(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"seed":7, "tools":[]}"#,
        );
        let value = parse_body(&raw).unwrap();
        let p = prepare(value, raw.clone(), &config(&[]), false).unwrap();
        assert_eq!(p.body, raw);
        assert!(!p.stream);
    }

    #[test]
    fn default_model_and_stream_usage_are_filled_in() {
        let p = run(
            json!({"messages": [{"role": "user", "content": "x"}], "stream": true, "seed": 1}),
            false,
        )
        .unwrap();
        let sent: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent["model"], "gpt-4o-mini");
        assert_eq!(sent["stream_options"]["include_usage"], true);
        assert_eq!(sent["seed"], 1);
        assert!(p.stream && !p.forward_usage);

        let p = run(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}), true).unwrap();
        let sent: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent["stream"], true);
        assert!(p.stream && p.forward_usage);
    }

    #[test]
    fn allowed_models_are_enforced() {
        let c = config(&[("ALLOWED_MODELS", "a,b")]);
        let body = json!({"model": "c", "messages": [{"role": "user", "content": "x"}]});
        let bytes = Bytes::from(body.to_string());
        assert!(matches!(
            prepare(body, bytes, &c, false),
            Err(ApiError::Forbidden { .. })
        ));
        let body = json!({"model": "b", "messages": [{"role": "user", "content": "x"}]});
        let bytes = Bytes::from(body.to_string());
        assert!(prepare(body, bytes, &c, false).is_ok());
    }
}
