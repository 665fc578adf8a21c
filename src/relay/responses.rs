//! The Responses API: [`prepare`] validates what relay relies on and fills in the default model
//! (every other field forwarded as it came, the client's bytes untouched when nothing changes);
//! [`create`] sends it upstream and hands back the typed event stream or the response object;
//! [`stored`] relays the calls on a stored response (`GET`, `DELETE`, `/cancel`,
//! `/input_items`).
//!
//! The upstream keeps responses by id under relay's one key, so an id is a capability: whoever
//! presents it could read the conversation, continue it (`previous_response_id`) or delete it.
//! relay therefore records who created each response ([`Owners`]) and serves an id only to its
//! owner; for anyone else it is a 404 and nothing reaches the upstream. Ids relay cannot check
//! are refused: `conversation` (the Conversations API, which relay does not serve) and input
//! items of type `item_reference` (items of stored responses, whose owner relay does not track).

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use http::header::CONTENT_TYPE;
use http_body_util::BodyDataStream;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::Upstream;
use super::body::{self, Fields, Scalar, Splices, check_number};
use super::client::Api;
use super::sse::{Protocol, ResponseView, SseRelay};
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::store::Store;

/// The top-level fields relay reads; every other one is forwarded as it came.
const FIELDS: &[&str] = &[
    "model",
    "input",
    "stream",
    "max_output_tokens",
    "temperature",
    "top_p",
    "previous_response_id",
    "conversation",
];

/// A request ready to send upstream.
#[derive(Debug)]
pub struct PreparedResponse {
    /// The body to send (the client's bytes when nothing had to change).
    pub body: Bytes,
    /// Whether the answer is streamed.
    pub stream: bool,
    /// The model used.
    pub model: String,
    /// The response this one continues, whose owner must be the caller.
    pub previous_response_id: Option<String>,
}

/// Whether `id` looks like an id the upstream gives (`resp_…`: letters, digits, `_`, `-`);
/// anything else is not looked up anywhere.
pub fn plausible_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Each input item may be anything the upstream takes, except a reference to a stored item.
fn check_input_item(i: usize, raw: &RawValue) -> Result<(), ApiError> {
    if let Some(Ok(item)) = body::object(raw, &["type"])
        && item.scalar("type") == Scalar::Str("item_reference".into())
    {
        return Err(ApiError::validation(
            format!("input[{i}].type"),
            "relay does not forward item references (items of stored responses); send the \
             item itself, or continue the response with previous_response_id",
        ));
    }
    Ok(())
}

fn validate(body: &Fields<'_>) -> Result<(), ApiError> {
    match body.scalar("input") {
        Scalar::Absent | Scalar::Null => {
            return Err(ApiError::validation("input", "input is required"));
        }
        Scalar::Str(_) => {}
        Scalar::Other
            if body
                .get("input")
                .is_some_and(|raw| raw.get().starts_with('[')) =>
        {
            if let Some(input) = body.get("input") {
                body::each_element(input, check_input_item)?;
            }
        }
        _ => {
            return Err(ApiError::validation(
                "input",
                "input must be a string or an array of input items",
            ));
        }
    }
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
        Scalar::Absent | Scalar::Null | Scalar::Bool(_) => {}
        _ => return Err(ApiError::validation("stream", "stream must be a boolean")),
    }
    match body.scalar("previous_response_id") {
        Scalar::Absent | Scalar::Null => {}
        Scalar::Str(id) if !id.is_empty() => {}
        _ => {
            return Err(ApiError::validation(
                "previous_response_id",
                "previous_response_id must be a response id (a string)",
            ));
        }
    }
    if !matches!(body.scalar("conversation"), Scalar::Absent | Scalar::Null) {
        return Err(ApiError::validation(
            "conversation",
            "relay does not serve the Conversations API; continue a conversation with \
             previous_response_id",
        ));
    }
    check_number(body, "max_output_tokens", 1.0, None, true)?;
    check_number(body, "temperature", 0.0, Some(2.0), false)?;
    check_number(body, "top_p", 0.0, Some(1.0), false)?;
    Ok(())
}

/// Validates and prepares a request: reads only the fields relay needs, and splices the
/// default model into the client's bytes when `model` is missing.
pub fn prepare(original: Bytes, policy: &super::ModelPolicy) -> Result<PreparedResponse, ApiError> {
    let body = body::fields(&original, FIELDS)?;
    validate(&body)?;
    let mut edits = Splices::new(&original);
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
    let previous_response_id = match body.scalar("previous_response_id") {
        Scalar::Str(id) => Some(id.into_owned()),
        _ => None,
    };
    Ok(PreparedResponse {
        stream: body.scalar("stream") == Scalar::Bool(true),
        body: edits.apply(&original),
        model,
        previous_response_id,
    })
}

/// Who created which stored response: the caller, and where that is recorded.
pub struct Owners<'a> {
    /// The database holding `response_owners`.
    pub store: &'a Store,
    /// The authenticated caller.
    pub user: Uuid,
}

impl Owners<'_> {
    /// A 404 unless the caller created `id` (`param`: the request field it came from).
    pub async fn check(&self, id: &str, param: Option<&'static str>) -> Result<(), ApiError> {
        let not_found = || ApiError::ResponseNotFound {
            id: id.chars().take(128).collect(),
            param,
        };
        if !plausible_id(id) || !self.store.owns_response(id, self.user).await? {
            return Err(not_found());
        }
        Ok(())
    }

    /// Records the caller as the owner of `id`. A failure is logged, not returned: the answer
    /// is already paid for, and an id without an owner is merely served to nobody.
    async fn record(&self, id: &str) {
        if !plausible_id(id) {
            tracing::warn!("the upstream gave a response id relay cannot record");
            return;
        }
        if let Err(err) = self.store.record_response_owner(id, self.user).await {
            tracing::error!(error = %err, "could not record a response's owner");
        }
    }
}

/// A relayed event stream.
pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static>>;

/// What the upstream answered, ready for the client.
pub enum Answer {
    /// Typed server-sent events, relayed as they arrive (usage recorded in the context).
    Stream(EventStream),
    /// A whole response object, checked, usage recorded, bytes untouched.
    Json(Bytes),
}

/// Sends a prepared request upstream (after checking that the caller owns the response it
/// continues) and records the caller as the new response's owner before the client can learn
/// its id: from the JSON answer, or from the stream's first event (`response.created`), which
/// relay waits for before it starts the client's stream.
pub async fn create(
    upstream: &Upstream,
    owners: &Owners<'_>,
    request: PreparedResponse,
    ctx: Arc<RequestContext>,
) -> Result<Answer, ApiError> {
    if let Some(previous) = &request.previous_response_id {
        owners.check(previous, Some("previous_response_id")).await?;
    }
    let response = upstream
        .post(Api::Responses, request.body, request.stream)
        .await?;
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if request.stream && is_sse {
        let mut events = Box::pin(SseRelay::new(
            BodyDataStream::new(response.into_body()),
            upstream.timeout(),
            Protocol::Responses,
            ctx,
            upstream.mask(),
        ));
        // The first read holds `response.created` (OpenAI sends it first); relay waits for
        // that read only, never for more, so that a server that sends no such event is still
        // streamed (its ids are then served to nobody).
        let first = events.next().await;
        if let Some(id) = events.response_id() {
            owners.record(id).await;
        }
        let head = futures_util::stream::iter(first);
        return Ok(Answer::Stream(Box::pin(head.chain(events))));
    }
    let body = upstream.read_completion(response).await?;
    let view: ResponseView = serde_json::from_slice(&body).map_err(|_| {
        tracing::warn!(model = %request.model, "upstream answer is not a response object");
        ApiError::BadGateway("the upstream's answer is not in the OpenAI format".into())
    })?;
    owners.record(&view.id).await;
    if let Some(usage) = view.usage {
        ctx.set_usage(usage.into());
    }
    Ok(Answer::Json(body))
}

/// A call on a stored response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredCall {
    /// `GET /responses/{id}`.
    Get,
    /// `DELETE /responses/{id}`.
    Delete,
    /// `POST /responses/{id}/cancel`.
    Cancel,
    /// `GET /responses/{id}/input_items`.
    InputItems,
}

/// Relays `call` on the stored response `id` for its owner (404 for anyone else, with nothing
/// sent upstream), with the client's query string (`include[]`, paging) when it has one.
/// Returns the upstream's JSON answer, checked to be JSON.
pub async fn stored(
    upstream: &Upstream,
    owners: &Owners<'_>,
    call: StoredCall,
    id: &str,
    query: Option<&str>,
) -> Result<Bytes, ApiError> {
    owners.check(id, None).await?;
    if let Some(query) = query
        && url::form_urlencoded::parse(query.as_bytes())
            .any(|(key, value)| key == "stream" && value != "false")
    {
        return Err(ApiError::validation(
            "stream",
            "relay does not resume the stream of a stored response; fetch it without stream",
        ));
    }
    let (method, suffix) = match call {
        StoredCall::Get => (http::Method::GET, ""),
        StoredCall::Delete => (http::Method::DELETE, ""),
        StoredCall::Cancel => (http::Method::POST, "/cancel"),
        StoredCall::InputItems => (http::Method::GET, "/input_items"),
    };
    let path = match query.filter(|q| !q.is_empty()) {
        Some(query) => format!("responses/{id}{suffix}?{query}"),
        None => format!("responses/{id}{suffix}"),
    };
    let response = upstream.call(method, &path, Bytes::new()).await?;
    let body = upstream.read_completion(response).await?;
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        tracing::warn!("upstream answer about a stored response is not JSON");
        return Err(ApiError::BadGateway(
            "the upstream's answer is not in the OpenAI format".into(),
        ));
    }
    if call == StoredCall::Delete
        && let Err(err) = owners.store.forget_response(id).await
    {
        tracing::warn!(error = %err, "could not forget a deleted response's owner");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Mode};
    use crate::relay::ModelPolicy;
    use serde_json::{Value, json};

    fn policy(extra: &[(&str, &str)]) -> ModelPolicy {
        let vars = extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ModelPolicy::new(&Config::from_vars(&vars, Mode::Dev).unwrap().upstream)
    }

    fn param_of(body: Value) -> String {
        match prepare(Bytes::from(body.to_string()), &policy(&[])) {
            Err(ApiError::Validation { param, .. }) => param,
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(param_of(json!({})), "input");
        assert_eq!(param_of(json!({"input": null})), "input");
        assert_eq!(param_of(json!({"input": 3})), "input");
        assert_eq!(param_of(json!({"input": {"role": "user"}})), "input");
        assert_eq!(param_of(json!({"input": "x", "model": 4})), "model");
        assert_eq!(param_of(json!({"input": "x", "stream": "yes"})), "stream");
        assert_eq!(
            param_of(json!({"input": "x", "max_output_tokens": 0})),
            "max_output_tokens"
        );
        assert_eq!(
            param_of(json!({"input": "x", "temperature": 3})),
            "temperature"
        );
        assert_eq!(
            param_of(json!({"input": "x", "previous_response_id": 7})),
            "previous_response_id"
        );
        assert_eq!(
            param_of(json!({"input": "x", "conversation": "conv_1"})),
            "conversation"
        );
        assert_eq!(
            param_of(json!({"input": [
                {"role": "user", "content": "x"},
                {"type": "item_reference", "id": "msg_someone_elses"}
            ]})),
            "input[1].type"
        );
        for ok in [
            json!({"input": "x"}),
            json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}]}),
            json!({"input": "x", "max_output_tokens": 16, "stream": false, "conversation": null}),
        ] {
            assert!(prepare(Bytes::from(ok.to_string()), &policy(&[])).is_ok());
        }
    }

    #[test]
    fn bodies_are_forwarded_unchanged_but_for_a_missing_model() {
        let raw = Bytes::from_static(
            br#"{"model":"m", "input":"x","tools":[{"type":"web_search"}],"store":true}"#,
        );
        let p = prepare(raw.clone(), &policy(&[])).unwrap();
        assert_eq!(p.body, raw);
        assert!(!p.stream);
        let raw = Bytes::from_static(
            br#"{ "input" : "x", "stream": true, "previous_response_id": "resp_1" }"#,
        );
        let p = prepare(raw, &policy(&[])).unwrap();
        assert_eq!(
            std::str::from_utf8(&p.body).unwrap(),
            r#"{"model":"gpt-4o-mini", "input" : "x", "stream": true, "previous_response_id": "resp_1" }"#
        );
        assert!(p.stream);
        assert_eq!(p.previous_response_id.as_deref(), Some("resp_1"));
    }

    #[test]
    fn allowed_models_and_duplicates_are_enforced() {
        let c = policy(&[("ALLOWED_MODELS", "a")]);
        assert!(matches!(
            prepare(Bytes::from_static(br#"{"model":"b","input":"x"}"#), &c),
            Err(ApiError::Forbidden { .. })
        ));
        assert!(matches!(
            prepare(
                Bytes::from_static(br#"{"model":"b","model":"a","input":"x"}"#),
                &c
            ),
            Err(ApiError::Validation { ref param, .. }) if param == "model"
        ));
        assert!(matches!(
            prepare(
                Bytes::from_static(br#"{"model":"a","input":"x","previous_response_id":"resp_1","previous_response_id":"resp_2"}"#),
                &c
            ),
            Err(ApiError::Validation { ref param, .. }) if param == "previous_response_id"
        ));
    }

    #[test]
    fn only_plain_ids_are_looked_up() {
        assert!(plausible_id("resp_68af0c1e9f2c81a0"));
        assert!(!plausible_id(""));
        assert!(!plausible_id("resp_1/../../models"));
        assert!(!plausible_id("resp_1?x=1"));
        assert!(!plausible_id(&"a".repeat(129)));
    }
}
