//! [`Upstream`], the one entry point to the upstream: one pooled HTTP client for the whole
//! process (relay's own HTTP/1.1 connections, opened by hyper-util's connector with rustls),
//! with the model policy and the model list cache beside it.
//!
//! Timeouts are per phase, never per request, so that long streams live: a connect timeout,
//! `UPSTREAM_TIMEOUT_SECONDS` for the response headers (the first byte), and the same as an idle
//! (between reads) timeout for bodies. The client's `Authorization` never reaches the upstream:
//! requests are built fresh with relay's key, and no client header is copied, which also drops
//! every hop-by-hop header.
//!
//! The connections are relay's own small pool of HTTP/1.1 connections ([`super::pool`]),
//! each driven by the request using it, without a layer on top: an API answers and does not
//! redirect, a retried POST could run (and bill) a completion twice, and every layer costs time
//! and memory on each request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper_util::client::legacy::connect::HttpConnector;
use secrecy::ExposeSecret as _;
use url::Url;

use super::errors::{KeyMask, transport_error, upstream_error};
use super::models::{Model, ModelCache, ModelPolicy, UpstreamModelList};
use super::pool::{Pool, SendError, UpstreamBody};
use crate::config::UpstreamConfig;
use crate::context::{RequestContext, UpstreamCall};
use crate::error::ApiError;

/// The upstream APIs relay forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /chat/completions`.
    ChatCompletions,
    /// `POST /embeddings`.
    Embeddings,
    /// `POST /responses`.
    Responses,
}

impl Api {
    /// The endpoint's name in usage records: `chat`, `embeddings`, `responses`.
    pub fn name(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat",
            Api::Embeddings => "embeddings",
            Api::Responses => "responses",
        }
    }
}

/// Whether an upstream answer is a server-sent event stream.
pub fn is_event_stream(response: &UpstreamResponse) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"))
}

/// An upstream answer whose headers arrived; its body is read (or streamed) by the caller.
pub type UpstreamResponse = http::Response<UpstreamBody>;

/// Largest upstream error body read (they are small; anything bigger is not an OpenAI error).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest non-streamed completion read from the upstream.
const MAX_COMPLETION_BODY: usize = 64 * 1024 * 1024;
/// How often `/health/detailed` may ask the upstream.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Largest model list read from the upstream.
const MAX_MODELS_BODY: usize = 4 * 1024 * 1024;

/// The shared upstream client.
pub struct Upstream {
    pool: Arc<Pool>,
    /// The headers of each kind of request relay sends, made once.
    heads: Heads,
    chat_uri: Uri,
    embeddings_uri: Uri,
    responses_uri: Uri,
    models_uri: Uri,
    /// The base URL's path without its trailing slash, for paths built per request.
    base: String,
    mask: Arc<KeyMask>,
    timeout: Duration,
    policy: ModelPolicy,
    models: ModelCache,
    /// When the upstream was last checked for `/health/detailed`, and whether it answered.
    last_check: std::sync::Mutex<Option<(Instant, bool)>>,
    /// Held while a check runs.
    check_flight: tokio::sync::Mutex<()>,
    /// When the last check started (it may have been given up before it ended).
    check_started: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("chat_uri", &self.chat_uri)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `path` under the base URL's path, in origin form (what an HTTP/1.1 request line carries).
fn join(base: &Url, path: &str) -> anyhow::Result<Uri> {
    Ok(Uri::try_from(format!(
        "{}/{path}",
        base.path().trim_end_matches('/')
    ))?)
}

const USER_AGENT_VALUE: HeaderValue =
    HeaderValue::from_static(concat!("relay/", env!("CARGO_PKG_VERSION")));

/// The headers relay sends upstream (its own only: no client header is copied), by kind of
/// request. A request clones one: 700 instructions, where building the map with
/// `http::request::Builder` took 2,000 (callgrind, issue 14).
struct Heads {
    /// A JSON body, a JSON answer.
    json: HeaderMap,
    /// A JSON body, an event stream.
    stream: HeaderMap,
    /// No body, a JSON answer.
    bare: HeaderMap,
}

impl Heads {
    fn new(host: HeaderValue, authorization: HeaderValue) -> Heads {
        let head = |body: bool, accept: &'static str| {
            let mut headers = HeaderMap::with_capacity(8);
            headers.insert(HOST, host.clone());
            headers.insert(AUTHORIZATION, authorization.clone());
            if body {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            headers.insert(ACCEPT, HeaderValue::from_static(accept));
            headers.insert(USER_AGENT, USER_AGENT_VALUE);
            headers
        };
        Heads {
            json: head(true, "application/json"),
            stream: head(true, "text/event-stream"),
            bare: head(false, "application/json"),
        }
    }
}

impl Upstream {
    /// Builds the client. `api_key` must be set (dev mode sets the mock's).
    pub fn new(config: &UpstreamConfig) -> anyhow::Result<Upstream> {
        let api_key = config.api_key.clone();
        let key = api_key
            .as_ref()
            .map(|k| k.expose_secret().to_owned())
            .unwrap_or_default();
        let mut authorization = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
            anyhow::anyhow!("OPENAI_API_KEY contains characters not allowed in a header")
        })?;
        authorization.set_sensitive(true);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout.min(Duration::from_secs(10))));
        // TCP keep-alive probes keep a silent connection (a long wait for a completion's
        // headers, an idle pooled connection) alive through NATs and firewalls, and find a
        // dead peer.
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| anyhow::anyhow!("cannot load the system's TLS roots: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let base = &config.base_url;
        let host = base
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("OPENAI_BASE_URL has no host"))?;
        let authority = match base.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let origin = Uri::try_from(format!("{}://{authority}", base.scheme()))?;
        Ok(Upstream {
            pool: Pool::new(https, origin, 1024, Duration::from_secs(90)),
            heads: Heads::new(HeaderValue::try_from(authority)?, authorization),
            chat_uri: join(&config.base_url, "chat/completions")?,
            embeddings_uri: join(&config.base_url, "embeddings")?,
            responses_uri: join(&config.base_url, "responses")?,
            models_uri: join(&config.base_url, "models")?,
            base: config.base_url.path().trim_end_matches('/').to_owned(),
            mask: Arc::new(KeyMask::new(api_key)),
            timeout: config.timeout,
            policy: ModelPolicy::new(config),
            models: ModelCache::default(),
            last_check: std::sync::Mutex::new(None),
            check_flight: tokio::sync::Mutex::new(()),
            check_started: std::sync::Mutex::new(None),
        })
    }

    /// `UPSTREAM_TIMEOUT_SECONDS`: for the first byte, and between reads.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Masks relay's key (and anything like it) in what the upstream says.
    pub fn mask(&self) -> Arc<KeyMask> {
        self.mask.clone()
    }

    /// Which models clients may use.
    pub fn policy(&self) -> &ModelPolicy {
        &self.policy
    }

    /// A request to the upstream with the headers `headers` (one of [`Heads`]).
    fn request(method: Method, uri: Uri, headers: &HeaderMap, body: Bytes) -> Request<Bytes> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers.clone();
        request
    }

    /// Sends a request to `api`. Returns the upstream's response once its headers arrived with
    /// a success status; every failure is already mapped to the client's error.
    pub async fn post(
        &self,
        api: Api,
        body: Bytes,
        stream: bool,
    ) -> Result<UpstreamResponse, ApiError> {
        let headers = if stream {
            &self.heads.stream
        } else {
            &self.heads.json
        };
        let uri = match api {
            Api::ChatCompletions => &self.chat_uri,
            Api::Embeddings => &self.embeddings_uri,
            Api::Responses => &self.responses_uri,
        };
        let request = Self::request(Method::POST, uri.clone(), headers, body);
        self.send(request).await
    }

    /// Sends `method` to `path` under the base URL (e.g. `responses/resp_1/cancel`, with a
    /// query string when the client gave one), asking for JSON; `body` for a POST. `path` must
    /// be made of characters already checked by the caller.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<UpstreamResponse, ApiError> {
        let uri =
            Uri::try_from(format!("{}/{path}", self.base)).map_err(|_| ApiError::BadRequest {
                message: "the request path or query is not valid".into(),
                code: "invalid_request",
            })?;
        let headers = if body.is_empty() {
            &self.heads.bare
        } else {
            &self.heads.json
        };
        let request = Self::request(method, uri, headers, body);
        self.send(request).await
    }

    /// [`Upstream::post`] for a client's request: marks it on `ctx` as a call to the upstream
    /// (it gets a usage record) before it is sent, and notes when the answer's headers arrived.
    pub async fn post_for(
        &self,
        ctx: &RequestContext,
        api: Api,
        model: &str,
        body: Bytes,
        stream: bool,
    ) -> Result<UpstreamResponse, ApiError> {
        ctx.set_upstream(UpstreamCall {
            endpoint: api.name(),
            model: model.to_owned(),
            streamed: stream,
            prompt_bytes: body.len() as u64,
        });
        let response = self.post(api, body, stream).await?;
        ctx.set_first_byte();
        Ok(response)
    }

    async fn send(&self, request: Request<Bytes>) -> Result<UpstreamResponse, ApiError> {
        let response = match tokio::time::timeout(self.timeout, self.pool.send(request)).await {
            Err(_) => {
                tracing::warn!("upstream sent no answer in time");
                return Err(ApiError::GatewayTimeout);
            }
            Ok(Err(err)) => {
                return Err(transport_error(&err, matches!(err, SendError::Connect(_))));
            }
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            return Ok(response);
        }
        let (status, headers) = (response.status(), response.headers().clone());
        let body = self.read_limited(response, MAX_ERROR_BODY).await?;
        Err(upstream_error(status, &headers, &body, &self.mask))
    }

    /// Reads a whole (non-streamed) answer, bounded in size.
    pub async fn read_completion(&self, response: UpstreamResponse) -> Result<Bytes, ApiError> {
        self.read_limited(response, MAX_COMPLETION_BODY).await
    }

    /// Reads a body up to `limit` bytes, each read within the idle timeout; a longer body is
    /// cut at the limit (and then fails to parse, which the callers report as a 502).
    async fn read_limited(
        &self,
        response: UpstreamResponse,
        limit: usize,
    ) -> Result<Bytes, ApiError> {
        let mut body = response.into_body();
        let mut buf = bytes::BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
                Err(_) => {
                    tracing::warn!("upstream stopped sending its answer");
                    return Err(ApiError::GatewayTimeout);
                }
                Ok(None) => break,
                Ok(Some(Err(err))) => return Err(transport_error(&err, false)),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(chunk) = frame.into_data() else {
                continue; // trailers
            };
            if buf.is_empty() && chunk.len() <= limit && body.is_end_stream() {
                // The whole body in one piece (a `Content-Length` answer read at once): no copy.
                return Ok(chunk);
            }
            let room = limit.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if buf.len() >= limit {
                break;
            }
        }
        Ok(buf.freeze())
    }

    /// The models clients may use: the upstream's list (cached for five minutes), filtered by
    /// `ALLOWED_MODELS`.
    pub async fn allowed_models(&self) -> Result<Vec<Model>, ApiError> {
        let models = match self.models.fresh().await {
            Some(models) => models,
            None => {
                let models = Arc::new(self.fetch_models().await?);
                self.models.store(models.clone()).await;
                models
            }
        };
        Ok(models
            .iter()
            .filter(|m| self.policy.allows(&m.id))
            .cloned()
            .collect())
    }

    async fn fetch_models(&self) -> Result<Vec<Model>, ApiError> {
        let request = Self::request(
            Method::GET,
            self.models_uri.clone(),
            &self.heads.bare,
            Bytes::new(),
        );
        let response = self.send(request).await?;
        let body = self.read_limited(response, MAX_MODELS_BODY).await?;
        serde_json::from_slice::<UpstreamModelList>(&body)
            .map(|list| list.data)
            .map_err(|_| {
                ApiError::BadGateway("the upstream's model list is not in the OpenAI format".into())
            })
    }

    /// For `/health/detailed`: could the upstream list its models at its last check? Checks
    /// at most once per [`CHECK_INTERVAL`], one call at a time shared by every caller, so that
    /// anonymous health requests cannot make relay spend the upstream key. A success refreshes
    /// the model cache; a failure never touches it.
    pub async fn check(&self) -> Result<(), ApiError> {
        let result = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ApiError::BadGateway(
                    "the upstream did not answer its last check".into(),
                ))
            }
        };
        if let Some(ok) = self.fresh_check() {
            return result(ok);
        }
        // One check at a time: callers arriving meanwhile wait for its result.
        let _one_at_a_time = self.check_flight.lock().await;
        if let Some(ok) = self.fresh_check() {
            return result(ok);
        }
        if let Ok(mut started) = self.check_started.lock() {
            if started.is_some_and(|at| at.elapsed() < CHECK_INTERVAL) {
                // A check started within the interval was given up by its caller (its own
                // timeout): do not start another before the interval is over.
                return result(self.last_check().is_some_and(|(_, ok)| ok));
            }
            *started = Some(Instant::now());
        }
        let checked = self.fetch_models().await;
        self.set_last_check(checked.is_ok());
        let models = checked?;
        self.models.store(Arc::new(models)).await;
        Ok(())
    }

    /// The last check's result, if it is recent.
    fn fresh_check(&self) -> Option<bool> {
        match self.last_check() {
            Some((at, ok)) if at.elapsed() < CHECK_INTERVAL => Some(ok),
            _ => None,
        }
    }

    fn last_check(&self) -> Option<(Instant, bool)> {
        self.last_check.lock().ok().and_then(|last| *last)
    }

    fn set_last_check(&self, ok: bool) {
        if let Ok(mut last) = self.last_check.lock() {
            *last = Some((Instant::now(), ok));
        }
    }
}
