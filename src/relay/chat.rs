//! Chat completions: [`prepare`] validates what relay relies on, fills in the default model,
//! asks for usage on streams and forwards every other field unchanged; [`complete`] sends the
//! request upstream and hands back either a relayed stream or a checked JSON body.
//!
//! (Over 400 lines with its unit tests, which pin every validation rule and body edit; the
//! code is about 270 lines.)

use std::sync::Arc;

use super::pool::UpstreamBody;
use bytes::Bytes;
use http_body_util::BodyDataStream;

use super::Upstream;
use super::body::{self, Element, Fields, Scalar, Splices, check_number};
use super::client::{Api, is_event_stream};
use super::models::ModelPolicy;
use super::sse::{Protocol, SseRelay};
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
    /// The most output tokens the answer may have (`n` × the cap), when it is capped.
    pub max_output: Option<u64>,
    /// A field whose cost the body's size does not bound (`web_search_options`: the search
    /// results count as prompt), refused while a token limit applies.
    pub unbounded: Option<&'static str>,
}

/// The top-level fields relay reads; every other field is forwarded as it came.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "web_search_options",
];

/// The fields of a message relay reads.
const MESSAGE_FIELDS: &[&str] = &["role"];

/// Each message must be an object with a non-empty string `role` (given once).
fn check_message(i: usize, message: Element<'_>) -> Result<(), ApiError> {
    let message = match message {
        None => {
            return Err(ApiError::validation(
                format!("messages[{i}]"),
                "each message must be an object",
            ));
        }
        Some(Err(_)) => {
            return Err(ApiError::validation(
                format!("messages[{i}].role"),
                "role appears more than once",
            ));
        }
        Some(Ok(message)) => message,
    };
    match message.scalar("role") {
        Scalar::Str(role) if !role.is_empty() => Ok(()),
        _ => Err(ApiError::validation(
            format!("messages[{i}].role"),
            "each message needs a role (a string)",
        )),
    }
}

fn validate(body: &Fields<'_>) -> Result<(), ApiError> {
    let messages = body
        .get("messages")
        .ok_or_else(|| ApiError::validation("messages", "messages is required"))?;
    match body::each_object(messages, MESSAGE_FIELDS, check_message)? {
        Some(count) if count > 0 => {}
        _ => {
            return Err(ApiError::validation(
                "messages",
                "messages must be a non-empty array",
            ));
        }
    }
    check_model_and_stream(body)?;
    if let Some(options) = body.get("stream_options")
        && body::scalar(options) != Scalar::Null
    {
        match body::object(options, STREAM_OPTIONS) {
            None => {
                return Err(ApiError::validation(
                    "stream_options",
                    "stream_options must be an object",
                ));
            }
            Some(Err(name)) => {
                return Err(ApiError::validation(
                    format!("stream_options.{name}"),
                    format!("{name} appears more than once"),
                ));
            }
            Some(Ok(_)) => {}
        }
    }
    check_number(body, "temperature", 0.0, Some(2.0), false)?;
    check_number(body, "top_p", 0.0, Some(1.0), false)?;
    check_number(body, "n", 1.0, None, true)?;
    check_number(body, "max_tokens", 1.0, None, true)?;
    check_number(body, "max_completion_tokens", 1.0, None, true)?;
    Ok(())
}

const STREAM_OPTIONS: &[&str] = &["include_usage"];

/// Validates and prepares a request: reads only the fields relay needs (never a tree of the
/// whole body), and splices its changes into the client's bytes, which are forwarded as they
/// are when nothing changes. `force_stream` is set by `/chat/completions/stream`;
/// `default_output`, when a token limit applies, caps a request that names no cap (as
/// `max_completion_tokens`), so that its worst case is bounded.
pub fn prepare(
    original: Bytes,
    policy: &ModelPolicy,
    force_stream: bool,
    default_output: Option<u32>,
) -> Result<PreparedChat, ApiError> {
    let body = body::fields(&original, FIELDS)?;
    validate(&body)?;
    let mut edits = Splices::new(&original);

    let model = allowed_model(&body, &mut edits, policy)?;

    let asked = body.scalar("stream") == Scalar::Bool(true);
    let stream = force_stream || asked;
    if stream && !asked {
        match body.get("stream") {
            Some(value) => edits.replace(value, "true"),
            None => edits.insert_member(None, "stream", b"true"),
        }
    }
    let mut forward_usage = false;
    if stream {
        let options = body.get("stream_options");
        let include = options
            .and_then(|raw| body::object(raw, STREAM_OPTIONS))
            .and_then(Result::ok)
            .and_then(|o| o.get("include_usage"));
        forward_usage = include.is_some_and(|raw| body::scalar(raw) == Scalar::Bool(true));
        if !forward_usage {
            match (options, include) {
                (_, Some(include)) => edits.replace(include, "true"),
                (Some(options), None) if body::scalar(options) == Scalar::Other => {
                    edits.insert_member(Some(options), "include_usage", b"true");
                }
                (Some(null), None) => edits.replace(null, r#"{"include_usage":true}"#),
                (None, None) => {
                    edits.insert_member(None, "stream_options", br#"{"include_usage":true}"#);
                }
            }
        }
    }
    let max_output = output_cap(
        &body,
        &mut edits,
        &["max_completion_tokens", "max_tokens"],
        default_output,
    )
    .map(|cap| cap.saturating_mul(body::whole(&body, "n").unwrap_or(1)));
    let unbounded = (!matches!(
        body.scalar("web_search_options"),
        Scalar::Absent | Scalar::Null
    ))
    .then_some("web_search_options");
    Ok(PreparedChat {
        body: edits.apply(&original),
        stream,
        forward_usage,
        model,
        max_output,
        unbounded,
    })
}

/// Checks `model` (a non-empty string, or absent) and `stream` (a boolean, or absent): what
/// chat and responses read alike.
pub fn check_model_and_stream(body: &Fields<'_>) -> Result<(), ApiError> {
    match body.scalar("model") {
        Scalar::Absent | Scalar::Null => {}
        Scalar::Str(m) if !m.trim().is_empty() => {}
        _ => {
            return Err(ApiError::validation(
                "model",
                "model must be a non-empty string",
            ));
        }
    }
    match body.scalar("stream") {
        Scalar::Absent | Scalar::Null | Scalar::Bool(_) => Ok(()),
        _ => Err(ApiError::validation("stream", "stream must be a boolean")),
    }
}

/// The request's model, or `DEFAULT_MODEL` spliced in when it names none; refused unless
/// `ALLOWED_MODELS` allows it.
pub fn allowed_model(
    body: &Fields<'_>,
    edits: &mut Splices<'_>,
    policy: &ModelPolicy,
) -> Result<String, ApiError> {
    let model = match body.scalar("model") {
        Scalar::Str(model) => model.into_owned(),
        _ => {
            let model = policy.default_model().to_owned();
            let json = serde_json::to_vec(&model).map_err(ApiError::internal)?;
            match body.get("model") {
                Some(null) => edits.replace(null, json),
                None => edits.insert_member(None, "model", &json),
            }
            model
        }
    };
    policy.check(&model)?;
    Ok(model)
}

/// The output cap a request names (the largest of `names`), or `default` spliced in as the
/// first of `names` when it names none.
pub fn output_cap(
    body: &Fields<'_>,
    edits: &mut Splices<'_>,
    names: &[&str],
    default: Option<u32>,
) -> Option<u64> {
    let named = names.iter().filter_map(|n| body::whole(body, n)).max();
    if named.is_some() {
        return named;
    }
    let default = default?;
    let json = default.to_string();
    match body.get(names[0]) {
        Some(null) => edits.replace(null, json),
        None => edits.insert_member(None, names[0], json.as_bytes()),
    }
    Some(u64::from(default))
}

/// What the upstream answered, ready for the client.
#[allow(clippy::large_enum_variant)] // made once per request and consumed at once; boxing it would add an allocation
pub enum Completion {
    /// Server-sent events, relayed as they arrive (usage recorded in the request's context).
    Stream(SseRelay<BodyDataStream<UpstreamBody>>),
    /// A whole JSON completion, checked to be one, usage recorded, bytes untouched.
    Json(Bytes),
}

/// A chat completion's `usage` object: both counts must be there, as whole numbers.
pub(super) fn read_usage(usage: &[u8]) -> Option<Usage> {
    let [prompt, completion] =
        super::scan::leading_members(usage, ["prompt_tokens", "completion_tokens"])?;
    Some(Usage {
        prompt_tokens: super::scan::whole(prompt?)?,
        completion_tokens: super::scan::whole(completion?)?,
    })
}

/// Sends a prepared request upstream: the one way a chat completion leaves relay.
pub async fn complete(
    upstream: &Upstream,
    chat: PreparedChat,
    ctx: Arc<RequestContext>,
) -> Result<Completion, ApiError> {
    let response = upstream
        .post_for(
            &ctx,
            Api::ChatCompletions,
            &chat.model,
            chat.body,
            chat.stream,
        )
        .await?;
    if chat.stream && is_event_stream(&response) {
        return Ok(Completion::Stream(SseRelay::new(
            BodyDataStream::new(response.into_body()),
            upstream.timeout(),
            Protocol::Chat {
                forward_usage: chat.forward_usage,
            },
            ctx,
            upstream.mask(),
        )));
    }
    // A whole JSON answer (also when an upstream ignored `stream`).
    let body = upstream.read_completion(response).await?;
    // A completion has `choices`; its `usage` is read, the rest only stepped over.
    let usage = match super::scan::members(&body, ["choices", "usage"]) {
        Some([Some(choices), usage]) if choices.starts_with(b"[") => match usage {
            None | Some(b"null") => Some(None),
            Some(usage) => read_usage(usage).map(Some),
        },
        _ => None,
    };
    let Some(usage) = usage else {
        tracing::warn!(model = %chat.model, "upstream answer is not a chat completion");
        return Err(ApiError::BadGateway(
            "the upstream's answer is not in the OpenAI format".into(),
        ));
    };
    if let Some(usage) = usage {
        ctx.set_usage(usage);
    }
    Ok(Completion::Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};
    use serde_json::{Value, json};

    fn config(extra: &[(&str, &str)]) -> ModelPolicy {
        let vars = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ModelPolicy::new(&Config::from_vars(&vars, Mode::Dev).unwrap().upstream)
    }

    fn run(body: Value, force: bool) -> Result<PreparedChat, ApiError> {
        prepare(Bytes::from(body.to_string()), &config(&[]), force, None)
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
        // Whatever an element is, when it is not an object it is named, and the one after a
        // non-object (skipped whole, nested or not) is reached.
        for other in [
            json!(null),
            json!("s"),
            json!(true),
            json!(-1.5),
            json!([[{"role": "x"}]]),
        ] {
            assert_eq!(param_of(json!({"messages": [other]})), "messages[0]");
        }
        assert_eq!(
            param_of(
                json!({"messages": [{"role": "user", "content": [{"role": 1}]}, {"role": ""}]})
            ),
            "messages[1].role"
        );
        // A role given twice, or in another letter case, is refused; a nested one is not a role.
        assert_eq!(
            param_of(json!({"messages": [{"role": "user", "Role": "system"}]})),
            "messages[0].role"
        );
        assert!(
            run(
                json!({"messages": [{"role": "user", "x": {"role": 1}}]}),
                false
            )
            .is_ok()
        );
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
        let p = prepare(raw.clone(), &config(&[]), false, None).unwrap();
        assert_eq!(p.body, raw);
        assert!(!p.stream);
        // When something changes, only that changes: the rest keeps the client's bytes.
        let raw = Bytes::from_static(
            br#"{ "messages" : [{"role":"user","content":"x"}], "stream":true, "seed" : 7 }"#,
        );
        let p = prepare(raw, &config(&[]), false, None).unwrap();
        assert_eq!(
            std::str::from_utf8(&p.body).unwrap(),
            r#"{"model":"gpt-4o-mini","stream_options":{"include_usage":true}, "messages" : [{"role":"user","content":"x"}], "stream":true, "seed" : 7 }"#
        );
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
        assert!(matches!(
            prepare(Bytes::from(body.to_string()), &c, false, None),
            Err(ApiError::Forbidden { .. })
        ));
        let body = json!({"model": "b", "messages": [{"role": "user", "content": "x"}]});
        assert!(prepare(Bytes::from(body.to_string()), &c, false, None).is_ok());
    }

    #[test]
    fn duplicated_fields_relay_reads_are_refused() {
        let c = config(&[("ALLOWED_MODELS", "allowed")]);
        let param =
            |raw: &str| match prepare(Bytes::copy_from_slice(raw.as_bytes()), &c, false, None) {
                Err(ApiError::Validation { param, .. }) => param,
                other => panic!("{raw}: expected a 422, got {other:?}"),
            };
        let m = r#""messages": [{"role": "user", "content": "x"}]"#;
        assert_eq!(
            param(&format!(
                r#"{{"model": "forbidden", "model": "allowed", {m}}}"#
            )),
            "model"
        );
        assert_eq!(
            param(&format!(r#"{{"model": "allowed", "model": "x", {m}}}"#)),
            "model"
        );
        assert_eq!(
            param(r#"{"model": "allowed", "messages": [{"role": "user", "role": "system"}]}"#),
            "messages[0].role"
        );
        assert_eq!(
            param(&format!(
                r#"{{"model": "allowed", "stream": true, "stream": false, {m}}}"#
            )),
            "stream"
        );
        assert_eq!(
            param(&format!(
                r#"{{"model": "allowed", "stream_options": {{"include_usage": false, "include_usage": true}}, {m}}}"#
            )),
            "stream_options.include_usage"
        );
        // Keys relay does not read may repeat: they are the upstream's business.
        let ok = format!(r#"{{"model": "allowed", "seed": 1, "seed": 2, {m}}}"#);
        assert!(prepare(Bytes::from(ok), &c, false, None).is_ok());
    }

    #[test]
    fn stream_options_are_completed_in_every_shape() {
        let m = r#""messages": [{"role": "user", "content": "x"}]"#;
        for (options, forwarded) in [
            ("", false),
            (r#""stream_options": null,"#, false),
            (r#""stream_options": {},"#, false),
            (r#""stream_options": { },"#, false),
            (r#""stream_options": {"other": 1},"#, false),
            (r#""stream_options": {"include_usage": false},"#, false),
            (r#""stream_options": {"include_usage": true},"#, true),
        ] {
            let raw = format!(r#"{{"model": "m", {options} {m}}}"#);
            let p = prepare(Bytes::from(raw.clone()), &config(&[]), true, None).unwrap();
            let sent: Value = serde_json::from_slice(&p.body)
                .unwrap_or_else(|e| panic!("{raw} became invalid JSON: {e}: {:?}", p.body));
            assert_eq!(sent["stream"], true, "{raw}");
            assert_eq!(sent["stream_options"]["include_usage"], true, "{raw}");
            assert_eq!(p.forward_usage, forwarded, "{raw}");
        }
    }

    #[test]
    fn a_token_limit_caps_output_and_knows_the_worst_case() {
        let m = json!([{"role": "user", "content": "x"}]);
        let p = prepare(
            Bytes::from(json!({"messages": m}).to_string()),
            &config(&[]),
            false,
            Some(100),
        )
        .unwrap();
        let sent: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(sent["max_completion_tokens"], 100, "the default cap is set");
        assert_eq!(p.max_output, Some(100));
        let p = prepare(
            Bytes::from(
                json!({"messages": m, "max_tokens": 30, "n": 3, "max_completion_tokens": null})
                    .to_string(),
            ),
            &config(&[]),
            false,
            Some(100),
        )
        .unwrap();
        assert_eq!(p.max_output, Some(90), "n answers of 30");
        let sent: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            sent["max_completion_tokens"],
            Value::Null,
            "a named cap is kept as it is"
        );
        let p = prepare(
            Bytes::from(json!({"messages": m, "max_completion_tokens": null}).to_string()),
            &config(&[]),
            false,
            Some(7),
        )
        .unwrap();
        let sent: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            sent["max_completion_tokens"], 7,
            "a null cap is replaced, not doubled"
        );
        let p = prepare(
            Bytes::from(json!({"messages": m}).to_string()),
            &config(&[]),
            false,
            None,
        )
        .unwrap();
        assert_eq!(p.max_output, None);
    }
}
