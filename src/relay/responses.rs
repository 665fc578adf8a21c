//! The Responses API: [`prepare`] validates what relay relies on and fills in the default model
//! (every other field forwarded as it came, the client's bytes untouched when nothing changes);
//! [`create`] sends it upstream and hands back the typed event stream or the response object;
//! [`stored`] relays the calls on a stored response (`GET`, `DELETE`, `/cancel`,
//! `/input_items`).
//!
//! The upstream keeps responses and their output items by id under relay's one key, so an id
//! is a capability: whoever presents it could read the conversation, continue it
//! (`previous_response_id`, or an input item that names an item by `id`, such as the
//! `item_reference`s the AI SDK sends) or delete it. relay therefore records who created each
//! response and each of its output items ([`Owners`]), before the client can learn the ids, and
//! accepts an id only from its owner; for anyone else it is a 404 and nothing reaches the
//! upstream. Ids relay cannot check are refused: `conversation` (the Conversations API, which
//! relay does not serve) and code-interpreter container ids.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use futures_util::future::BoxFuture;
use http_body_util::BodyDataStream;
use uuid::Uuid;

use super::Upstream;
use super::body::{self, Element, Fields, Scalar, Splices, check_number};
use super::chat::{allowed_model, check_model_and_stream, output_cap};
use super::client::{Api, is_event_stream};
use super::response_view::{MAX_OWNED_IDS, ResponseView};
use super::sse::{BodyError, Protocol, SseRelay};
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
    "tools",
    "prompt",
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
    /// The ids the request names (`previous_response_id`, input items' `id`s), each with the
    /// field it is in: the caller must own every one.
    pub referenced: Vec<(String, String)>,
    /// The first field that brings into the prompt content this body does not hold, so that
    /// its size does not bound its tokens: `previous_response_id`, an input item that only
    /// names a stored item, a stored `prompt`, a hosted tool.
    pub stored_context: Option<String>,
    /// The most output tokens the answer may have, when it is capped.
    pub max_output: Option<u64>,
}

/// Whether `id` looks like an id the upstream gives (`resp_…`: letters, digits, `_`, `-`);
/// anything else is not looked up anywhere.
pub fn plausible_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The fields of an input item relay reads.
const INPUT_ITEM_FIELDS: &[&str] = &["type", "id", "content"];
/// The fields of a tool relay reads.
const TOOL_FIELDS: &[&str] = &["type", "container"];

/// Each input item may be anything the upstream takes; one that names an `id` (an
/// `item_reference`, with or without its `type`, or an output item sent back, such as a
/// reasoning item or a function call) refers to a stored item, which the caller must own.
fn check_input_item(
    i: usize,
    item: Element<'_>,
    referenced: &mut Vec<(String, String)>,
    stored_context: &mut Option<String>,
) -> Result<(), ApiError> {
    let item = match item {
        None => return Ok(()),
        Some(Err(name)) => {
            return Err(ApiError::validation(
                format!("input[{i}].{name}"),
                format!("{name} appears more than once (or also in another letter case)"),
            ));
        }
        Some(Ok(item)) => item,
    };
    let pure_reference = match item.scalar("type") {
        // No type: a message if it has content, else a reference.
        Scalar::Absent | Scalar::Null => item.get("content").is_none(),
        Scalar::Str(kind) => kind == "item_reference",
        _ => false,
    };
    match item.scalar("id") {
        Scalar::Absent | Scalar::Null => Ok(()),
        Scalar::Str(id) if referenced.len() < MAX_OWNED_IDS => {
            // An item that is only a reference brings stored content; one that carries its
            // content (an assistant message sent back with its id) does not.
            if pure_reference && stored_context.is_none() {
                *stored_context = Some(format!("input[{i}].id"));
            }
            referenced.push((format!("input[{i}].id"), id.into_owned()));
            Ok(())
        }
        Scalar::Str(_) => Err(ApiError::validation(
            "input",
            format!("input names more than {MAX_OWNED_IDS} stored items"),
        )),
        _ => Err(ApiError::validation(
            format!("input[{i}].id"),
            "an item's id must be a string",
        )),
    }
}

/// A code-interpreter tool may start a container (`{"type": "auto"}`) but not name one: a
/// container holds the files of whoever used it, and relay does not track containers' owners.
fn check_tool(i: usize, tool: Element<'_>, unbounded: &mut Option<String>) -> Result<(), ApiError> {
    let Some(tool) = tool else {
        return Ok(());
    };
    let tool = tool.map_err(|name| {
        ApiError::validation(
            format!("tools[{i}].{name}"),
            format!("{name} appears more than once (or also in another letter case)"),
        )
    })?;
    // A hosted tool (web search, file search, code interpreter, MCP, …) feeds its results
    // back as input the body does not hold; function and custom tools run on the client.
    if unbounded.is_none()
        && !matches!(tool.scalar("type"), Scalar::Str(ref t) if t == "function" || t == "custom")
    {
        *unbounded = Some(format!("tools[{i}].type"));
    }
    if matches!(tool.scalar("container"), Scalar::Str(_)) {
        return Err(ApiError::validation(
            format!("tools[{i}].container"),
            "relay does not forward container ids; use {\"type\": \"auto\"} for a new \
             container",
        ));
    }
    Ok(())
}

/// What a request names that the upstream has stored.
struct Named {
    /// Every id, with its field.
    referenced: Vec<(String, String)>,
    /// The first field that brings stored content into the prompt, if any.
    stored_context: Option<String>,
}

/// Checks `body`; returns the ids it names.
fn validate(body: &Fields<'_>) -> Result<Named, ApiError> {
    let mut referenced = Vec::new();
    let mut stored_context = None;
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
                body::each_object(input, INPUT_ITEM_FIELDS, |i, item| {
                    check_input_item(i, item, &mut referenced, &mut stored_context)
                })?;
            }
        }
        _ => {
            return Err(ApiError::validation(
                "input",
                "input must be a string or an array of input items",
            ));
        }
    }
    check_model_and_stream(body)?;
    match body.scalar("previous_response_id") {
        Scalar::Absent | Scalar::Null => {}
        Scalar::Str(id) if !id.is_empty() => {
            referenced.push(("previous_response_id".to_owned(), id.into_owned()));
            stored_context = Some("previous_response_id".to_owned());
        }
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
    if let Some(tools) = body.get("tools") {
        body::each_object(tools, TOOL_FIELDS, |i, tool| {
            check_tool(i, tool, &mut stored_context)
        })?;
    }
    // A stored prompt template is content the body does not hold.
    if stored_context.is_none() && !matches!(body.scalar("prompt"), Scalar::Absent | Scalar::Null) {
        stored_context = Some("prompt".to_owned());
    }
    check_number(body, "max_output_tokens", 1.0, None, true)?;
    check_number(body, "temperature", 0.0, Some(2.0), false)?;
    check_number(body, "top_p", 0.0, Some(1.0), false)?;
    Ok(Named {
        referenced,
        stored_context,
    })
}

/// Validates and prepares a request: reads only the fields relay needs, and splices the
/// default model into the client's bytes when `model` is missing (and, when a token limit
/// applies, `default_output` as `max_output_tokens` when it is missing).
pub fn prepare(
    original: Bytes,
    policy: &super::ModelPolicy,
    default_output: Option<u32>,
) -> Result<PreparedResponse, ApiError> {
    let body = body::fields(&original, FIELDS)?;
    let Named {
        referenced,
        stored_context,
    } = validate(&body)?;
    let mut edits = Splices::new(&original);
    let model = allowed_model(&body, &mut edits, policy)?;
    let max_output = output_cap(&body, &mut edits, &["max_output_tokens"], default_output);
    Ok(PreparedResponse {
        stream: body.scalar("stream") == Scalar::Bool(true),
        body: edits.apply(&original),
        model,
        referenced,
        stored_context,
        max_output,
    })
}

/// How long recording an answer's ids may hold it back.
const RECORD_TIMEOUT: Duration = Duration::from_secs(2);

/// Who created which stored response or item: the caller, and where that is recorded.
pub struct Owners<'a> {
    /// The database holding `response_owners`.
    pub store: &'a Store,
    /// The authenticated caller.
    pub user: Uuid,
}

impl Owners<'_> {
    /// A 404 unless the caller created `id` (`param`: the request field it came from).
    pub async fn check(&self, id: &str, param: Option<&str>) -> Result<(), ApiError> {
        self.check_all(&[(param.unwrap_or_default(), id)]).await
    }

    /// A 404 naming the first of `(field, id)` the caller did not create (field empty for a
    /// path). Ids that cannot be the upstream's are not looked up.
    async fn check_all(&self, ids: &[(&str, &str)]) -> Result<(), ApiError> {
        let not_found = |param: &str, id: &str| ApiError::ResponseNotFound {
            id: id.chars().take(128).collect(),
            param: (!param.is_empty()).then(|| param.to_owned()),
        };
        if let Some((param, id)) = ids.iter().find(|(_, id)| !plausible_id(id)) {
            return Err(not_found(param, id));
        }
        let plain: Vec<&str> = ids.iter().map(|(_, id)| *id).collect();
        if let Some(missing) = self.store.first_not_owned(&plain, self.user).await? {
            let param = ids
                .iter()
                .find(|(_, id)| *id == missing)
                .map_or("", |(p, _)| p);
            return Err(not_found(param, missing));
        }
        Ok(())
    }
}

/// Records `user` as the owner of `ids`, within [`RECORD_TIMEOUT`]. A failure is logged, not
/// returned: the answer is paid for, and an id without an owner is merely served to nobody.
async fn record(store: Store, user: Uuid, mut ids: Vec<String>) {
    ids.retain(|id| plausible_id(id));
    match tokio::time::timeout(RECORD_TIMEOUT, store.record_owned(&ids, user)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::error!(error = %err, "could not record a response's owner"),
        Err(_) => tracing::error!("recording a response's owner took too long"),
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

pin_project_lite::pin_project! {
    /// The event relay, holding back each chunk that gives the caller new ids (the response's
    /// in `response.created`, its items' in `response.output_item.added`) until they are
    /// recorded as the caller's: a client never holds an id relay would refuse it.
    struct Recording<S> {
        #[pin]
        events: SseRelay<S>,
        store: Store,
        user: Uuid,
        recorded: usize,
        held: Option<(Bytes, BoxFuture<'static, ()>)>,
    }
}

impl<S, E> Stream for Recording<S>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: BodyError,
{
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if let Some((_, recording)) = this.held.as_mut() {
            ready!(recording.as_mut().poll(cx));
            return Poll::Ready(this.held.take().map(|(chunk, _)| Ok(chunk)));
        }
        let chunk = match ready!(this.events.as_mut().poll_next(cx)) {
            None => return Poll::Ready(None),
            Some(Ok(chunk)) => chunk,
            Some(Err(never)) => match never {},
        };
        let owned = this.events.as_ref().get_ref().owned_ids();
        if owned.len() > *this.recorded {
            let new = owned[*this.recorded..].to_vec();
            *this.recorded = owned.len();
            let mut recording: BoxFuture<'static, ()> =
                Box::pin(record(this.store.clone(), *this.user, new));
            if recording.as_mut().poll(cx).is_pending() {
                *this.held = Some((chunk, recording));
                return Poll::Pending;
            }
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// Sends a prepared request upstream (after checking that the caller owns every id it names)
/// and records the caller as the owner of the new response and its items before the client
/// can learn their ids: from the JSON answer, or as the stream gives them.
pub async fn create(
    upstream: &Upstream,
    owners: &Owners<'_>,
    request: PreparedResponse,
    ctx: Arc<RequestContext>,
) -> Result<Answer, ApiError> {
    let referenced: Vec<(&str, &str)> = request
        .referenced
        .iter()
        .map(|(param, id)| (param.as_str(), id.as_str()))
        .collect();
    owners.check_all(&referenced).await?;
    let response = upstream
        .post_for(
            &ctx,
            Api::Responses,
            &request.model,
            request.body,
            request.stream,
        )
        .await?;
    if request.stream && is_event_stream(&response) {
        let events = SseRelay::new(
            BodyDataStream::new(response.into_body()),
            upstream.timeout(),
            Protocol::Responses,
            ctx,
            upstream.mask(),
        );
        return Ok(Answer::Stream(Box::pin(Recording {
            events,
            store: owners.store.clone(),
            user: owners.user,
            recorded: 0,
            held: None,
        })));
    }
    let body = upstream.read_completion(response).await?;
    let Some(view) = ResponseView::read(&body) else {
        tracing::warn!(model = %request.model, "upstream answer is not a response object");
        return Err(ApiError::BadGateway(
            "the upstream's answer is not in the OpenAI format".into(),
        ));
    };
    if let Some(usage) = view.usage {
        ctx.set_usage(usage);
    }
    record(owners.store.clone(), owners.user, view.owned_ids()).await;
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

/// The query parameters relay passes on for a stored response (`include[]`, paging); any
/// other is refused, and the query is rebuilt from them rather than copied.
const QUERY_KEYS: &[&str] = &[
    "include",
    "include[]",
    "include_obfuscation",
    "starting_after",
    "after",
    "before",
    "limit",
    "order",
];

/// The longest query string relay passes on.
const MAX_QUERY_BYTES: usize = 2048;

/// The query to send upstream, rebuilt from the client's known parameters.
fn upstream_query(query: Option<&str>) -> Result<String, ApiError> {
    let query = query.unwrap_or_default();
    if query.len() > MAX_QUERY_BYTES {
        return Err(ApiError::validation(
            "query",
            format!("the query string is longer than {MAX_QUERY_BYTES} bytes"),
        ));
    }
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == "stream" {
            if value == "false" {
                continue;
            }
            return Err(ApiError::validation(
                "stream",
                "relay does not resume the stream of a stored response; fetch it without stream",
            ));
        }
        if !QUERY_KEYS.contains(&&*key) {
            return Err(ApiError::validation(
                key.chars().take(64).collect::<String>(),
                format!(
                    "relay does not pass on this query parameter; it passes on {}",
                    QUERY_KEYS.join(", ")
                ),
            ));
        }
        out.append_pair(&key, &value);
    }
    Ok(out.finish())
}

/// Relays `call` on the stored response `id` for its owner (404 for anyone else, with nothing
/// sent upstream), with the client's known query parameters (`include[]`, paging). Returns the
/// upstream's JSON answer, checked to be JSON.
pub async fn stored(
    upstream: &Upstream,
    owners: &Owners<'_>,
    call: StoredCall,
    id: &str,
    query: Option<&str>,
) -> Result<Bytes, ApiError> {
    owners.check(id, None).await?;
    let query = upstream_query(query)?;
    let (method, suffix) = match call {
        StoredCall::Get => (http::Method::GET, ""),
        StoredCall::Delete => (http::Method::DELETE, ""),
        StoredCall::Cancel => (http::Method::POST, "/cancel"),
        StoredCall::InputItems => (http::Method::GET, "/input_items"),
    };
    let path = if query.is_empty() {
        format!("responses/{id}{suffix}")
    } else {
        format!("responses/{id}{suffix}?{query}")
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
        && let Err(err) = owners.store.forget_owned(id, owners.user).await
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
        match prepare(Bytes::from(body.to_string()), &policy(&[]), None) {
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
        assert_eq!(param_of(json!({"input": [{"id": 5}]})), "input[0].id");
        assert_eq!(
            param_of(
                json!({"input": "x", "tools": [{"type": "code_interpreter", "container": "cntr_1"}]})
            ),
            "tools[0].container"
        );
        assert_eq!(
            param_of(json!({"input": "x", "Conversation": "c"})),
            "conversation"
        );
        for ok in [
            json!({"input": "x"}),
            json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}]}),
            json!({"input": "x", "max_output_tokens": 16, "stream": false, "conversation": null}),
            json!({"input": "x", "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}),
        ] {
            assert!(prepare(Bytes::from(ok.to_string()), &policy(&[]), None).is_ok());
        }
    }

    #[test]
    fn bodies_are_forwarded_unchanged_but_for_a_missing_model() {
        let raw = Bytes::from_static(
            br#"{"model":"m", "input":"x","tools":[{"type":"web_search"}],"store":true}"#,
        );
        let p = prepare(raw.clone(), &policy(&[]), None).unwrap();
        assert_eq!(p.body, raw);
        assert!(!p.stream);
        let raw = Bytes::from_static(
            br#"{ "input" : "x", "stream": true, "previous_response_id": "resp_1" }"#,
        );
        let p = prepare(raw, &policy(&[]), None).unwrap();
        assert_eq!(
            std::str::from_utf8(&p.body).unwrap(),
            r#"{"model":"gpt-4o-mini", "input" : "x", "stream": true, "previous_response_id": "resp_1" }"#
        );
        assert!(p.stream);
        assert_eq!(
            p.referenced,
            [("previous_response_id".to_owned(), "resp_1".to_owned())]
        );
    }

    #[test]
    fn allowed_models_and_duplicates_are_enforced() {
        let c = policy(&[("ALLOWED_MODELS", "a")]);
        assert!(matches!(
            prepare(
                Bytes::from_static(br#"{"model":"b","input":"x"}"#),
                &c,
                None
            ),
            Err(ApiError::Forbidden { .. })
        ));
        assert!(matches!(
            prepare(
                Bytes::from_static(br#"{"model":"b","model":"a","input":"x"}"#),
                &c,
                None
            ),
            Err(ApiError::Validation { ref param, .. }) if param == "model"
        ));
        assert!(matches!(
            prepare(
                Bytes::from_static(br#"{"model":"a","input":"x","previous_response_id":"resp_1","previous_response_id":"resp_2"}"#),
                &c,
                None
            ),
            Err(ApiError::Validation { ref param, .. }) if param == "previous_response_id"
        ));
    }

    #[test]
    fn every_named_item_is_a_reference_to_check() {
        let raw = br#"{"input": [
            {"role": "user", "content": "hi"},
            {"type": "item_reference", "id": "msg_1"},
            {"id": "msg_2"},
            {"type": null, "id": "msg_3"},
            {"type": "reasoning", "id": "rs_4", "summary": []}
        ], "previous_response_id": "resp_0"}"#;
        let p = prepare(Bytes::from_static(raw), &policy(&[]), None).unwrap();
        let ids: Vec<(&str, &str)> = p
            .referenced
            .iter()
            .map(|(f, i)| (f.as_str(), i.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("input[1].id", "msg_1"),
                ("input[2].id", "msg_2"),
                ("input[3].id", "msg_3"),
                ("input[4].id", "rs_4"),
                ("previous_response_id", "resp_0"),
            ]
        );
        // A second `type` or `id` (in any letter case) would let another value through.
        for raw in [
            r#"{"input": [{"type": "message", "type": "item_reference", "id": "x"}]}"#,
            r#"{"input": [{"id": "msg_mine", "ID": "msg_theirs"}]}"#,
        ] {
            assert!(matches!(
                prepare(Bytes::from(raw), &policy(&[]), None),
                Err(ApiError::Validation { .. })
            ));
        }
    }

    #[test]
    fn queries_are_rebuilt_from_known_keys() {
        assert_eq!(upstream_query(None).unwrap(), "");
        assert_eq!(
            upstream_query(Some("include[]=a.b&limit=5&stream=false")).unwrap(),
            "include%5B%5D=a.b&limit=5"
        );
        assert!(upstream_query(Some("stream=true")).is_err());
        assert!(upstream_query(Some("x=1")).is_err());
        assert!(upstream_query(Some(&"limit=1&".repeat(300))).is_err());
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
