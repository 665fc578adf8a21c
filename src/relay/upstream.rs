//! The upstream client: one pooled HTTP client (hyper's, with rustls) for the whole process.
//!
//! Timeouts are per phase, never per request, so that long streams live: a connect timeout,
//! `UPSTREAM_TIMEOUT_SECONDS` for the response headers (the first byte), and the same as an idle
//! (between reads) timeout for bodies. The client's `Authorization` never reaches the upstream:
//! requests are built fresh with relay's key, and no client header is copied, which also drops
//! every hop-by-hop header.
//!
//! The client is hyper's own pooled client, without a layer on top: an API answers and does not
//! redirect, a retried POST could run (and bill) a completion twice, and every layer costs time
//! and memory on each request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use url::Url;

use crate::config::UpstreamConfig;
use crate::error::ApiError;

/// An upstream answer whose headers arrived; its body is read (or streamed) by the caller.
pub type UpstreamResponse = http::Response<Incoming>;

/// How long the model list is cached.
const MODELS_TTL: Duration = Duration::from_secs(300);
/// Largest upstream error body read (they are small; anything bigger is not an OpenAI error).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest non-streamed completion read from the upstream.
const MAX_COMPLETION_BODY: usize = 64 * 1024 * 1024;

/// One entry of `GET /models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Model {
    /// Model id, e.g. `gpt-4o-mini`.
    pub id: String,
    /// Always `model`.
    #[serde(default = "model_object")]
    pub object: String,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created: i64,
    /// Owner.
    #[serde(default = "unknown_owner")]
    pub owned_by: String,
}

fn model_object() -> String {
    "model".to_owned()
}

fn unknown_owner() -> String {
    "unknown".to_owned()
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<Model>,
}

/// The shared upstream client.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    chat_uri: Uri,
    models_uri: Uri,
    authorization: HeaderValue,
    api_key: Option<SecretString>,
    timeout: Duration,
    models: RwLock<Option<(Instant, Arc<Vec<Model>>)>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("chat_uri", &self.chat_uri)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn join(base: &Url, path: &str) -> anyhow::Result<Uri> {
    Ok(Uri::try_from(format!(
        "{}/{path}",
        base.as_str().trim_end_matches('/')
    ))?)
}

const USER_AGENT_VALUE: HeaderValue =
    HeaderValue::from_static(concat!("relay/", env!("CARGO_PKG_VERSION")));

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
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(https);
        Ok(Upstream {
            client,
            chat_uri: join(&config.base_url, "chat/completions")?,
            models_uri: join(&config.base_url, "models")?,
            authorization,
            api_key,
            timeout: config.timeout,
            models: RwLock::new(None),
        })
    }

    /// Sends a chat completion request. Returns the upstream's response once its headers
    /// arrived with a success status; every failure is already mapped to the client's error.
    pub async fn post_chat(&self, body: Bytes, stream: bool) -> Result<UpstreamResponse, ApiError> {
        let accept = if stream {
            HeaderValue::from_static("text/event-stream")
        } else {
            HeaderValue::from_static("application/json")
        };
        let request = Request::post(self.chat_uri.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(ACCEPT, accept)
            .header(USER_AGENT, USER_AGENT_VALUE)
            .body(Full::new(body));
        self.send(request).await
    }

    async fn send(
        &self,
        request: http::Result<Request<Full<Bytes>>>,
    ) -> Result<UpstreamResponse, ApiError> {
        // Built from values checked when the client was made; this cannot fail.
        let request = request.map_err(|e| ApiError::Internal(e.into()))?;
        let response = match tokio::time::timeout(self.timeout, self.client.request(request)).await
        {
            Err(_) => {
                tracing::warn!("upstream sent no answer in time");
                return Err(ApiError::GatewayTimeout);
            }
            Ok(Err(err)) => return Err(transport_error(&err, err.is_connect())),
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(self.error_response(response).await)
        }
    }

    /// Turns an upstream error answer into the client's error: the same status and the
    /// upstream's error body when it is an OpenAI error envelope (with anything key-like
    /// masked), else a 502.
    async fn error_response(&self, response: UpstreamResponse) -> ApiError {
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).cloned();
        let body = match self.read_limited(response, MAX_ERROR_BODY).await {
            Ok(body) => body,
            Err(err) => return err,
        };
        let envelope = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .filter(|v| {
                v.get("error")
                    .is_some_and(|e| e.is_object() || e.is_string())
            });
        let Some(envelope) = envelope else {
            tracing::warn!(
                status = status.as_u16(),
                "upstream error answer is not an OpenAI error"
            );
            return ApiError::BadGateway(format!(
                "the upstream answered {} with a body that is not an OpenAI error",
                status.as_u16()
            ));
        };
        if status == StatusCode::UNAUTHORIZED {
            // The upstream refused relay's key: the client's credentials are fine, so a 401
            // would mislead it (and SDKs would ask the user to log in again).
            tracing::error!("the upstream rejected OPENAI_API_KEY (401)");
            return ApiError::BadGateway("the upstream rejected relay's credentials".into());
        }
        let body = self.sanitize_error(envelope);
        ApiError::Upstream {
            status,
            body,
            retry_after,
        }
    }

    /// Keeps only the envelope's standard fields and masks the key and anything like it.
    fn sanitize_error(&self, envelope: serde_json::Value) -> Bytes {
        let error = &envelope["error"];
        let field = |name: &str| error.get(name).cloned().unwrap_or(serde_json::Value::Null);
        let message = error
            .get("message")
            .and_then(|m| m.as_str())
            .or_else(|| error.as_str())
            .unwrap_or("upstream error");
        let clean = serde_json::json!({
            "error": {
                "message": message,
                "type": field("type"),
                "code": field("code"),
                "param": field("param"),
            }
        });
        // Masked as a whole, so that no field can carry the key out.
        Bytes::from(self.mask(&clean.to_string()))
    }

    fn mask(&self, text: &str) -> String {
        let mut text = text.to_owned();
        if let Some(key) = &self.api_key {
            let key = key.expose_secret();
            if !key.is_empty() {
                text = text.replace(key, "[redacted]");
            }
        }
        // Anything shaped like an OpenAI key (`sk-…`), wherever it stands.
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find("sk-") {
            let boundary = at == 0 || !rest.as_bytes()[at - 1].is_ascii_alphanumeric();
            let end = rest[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*')))
                .map_or(rest.len(), |n| at + n);
            out.push_str(&rest[..at]);
            out.push_str(if boundary {
                "[redacted]"
            } else {
                &rest[at..end]
            });
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }

    /// Reads a whole (non-streamed) completion, bounded in size.
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
            let room = limit.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if buf.len() >= limit {
                break;
            }
        }
        Ok(buf.freeze())
    }

    /// The upstream's models, cached for five minutes.
    pub async fn models(&self) -> Result<Arc<Vec<Model>>, ApiError> {
        if let Some((at, models)) = self.models.read().await.as_ref()
            && at.elapsed() < MODELS_TTL
        {
            return Ok(models.clone());
        }
        let models = Arc::new(self.fetch_models().await?);
        *self.models.write().await = Some((Instant::now(), models.clone()));
        Ok(models)
    }

    async fn fetch_models(&self) -> Result<Vec<Model>, ApiError> {
        let request = Request::get(self.models_uri.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, USER_AGENT_VALUE)
            .body(Full::new(Bytes::new()));
        let response = self.send(request).await?;
        let body = self.read_limited(response, MAX_ERROR_BODY * 64).await?;
        serde_json::from_slice::<ModelList>(&body)
            .map(|list| list.data)
            .map_err(|_| {
                ApiError::BadGateway("the upstream's model list is not in the OpenAI format".into())
            })
    }

    /// For `/health/detailed`: can the upstream list its models right now?
    pub async fn check(&self) -> Result<(), ApiError> {
        let models = Arc::new(self.fetch_models().await?);
        *self.models.write().await = Some((Instant::now(), models));
        Ok(())
    }
}

/// Maps a transport failure (no usable HTTP answer) to a 504 when something timed out (the TCP
/// connect, or the system's timeouts on a socket), else a 502; logs the cause. hyper's errors
/// name neither the URL nor any header: safe to log.
fn transport_error(err: &(dyn std::error::Error + 'static), connect: bool) -> ApiError {
    let mut cause = err.to_string();
    let mut timed_out = false;
    let mut source = Some(err);
    while let Some(e) = source {
        timed_out |= e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout);
        if !std::ptr::addr_eq(e, err) {
            cause.push_str(": ");
            cause.push_str(&e.to_string());
        }
        source = e.source();
    }
    tracing::warn!(error = %cause, "upstream request failed");
    if timed_out {
        ApiError::GatewayTimeout
    } else if connect {
        ApiError::BadGateway("the upstream is unreachable".into())
    } else {
        ApiError::BadGateway("the upstream connection failed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that wraps another, as hyper-util's connect errors do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn timeouts_anywhere_in_the_chain_are_504_other_failures_502() {
        let timed_out = Wrapped(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(
            transport_error(&timed_out, true),
            ApiError::GatewayTimeout
        ));
        let refused = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(
            matches!(transport_error(&refused, true), ApiError::BadGateway(m) if m.contains("unreachable"))
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(
            matches!(transport_error(&reset, false), ApiError::BadGateway(m) if m.contains("failed"))
        );
    }
}
