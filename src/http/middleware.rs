//! The one outer middleware every request passes through.
//!
//! It does four cheap things in one place (one layer instead of four keeps the per-request
//! cost down): gives the request an id (the client's, if sane, else a new UUID); adds the
//! security headers; turns any error response that is not already JSON (axum's 405, a 413
//! from the body limit, …) into the OpenAI error envelope; and writes exactly one log line
//! per request (with the client IP) — when the response body is finished or dropped, so that a stream's line
//! carries its full duration and its token usage, or, when the client leaves before the
//! answer, as a 499. At the same moment a request that reached the upstream leaves its usage
//! record (`crate::usage`).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::response::Response;
use bytes::Bytes;
use http::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, StatusCode};

use crate::context::{RequestContext, Settlement, StreamEnd, Usage};
use crate::error::{ErrorDetail, envelope_response, error_code_for};
use crate::http::ratelimit::client_ip_of;
use crate::store::UsageRecord;
use crate::usage::{PendingRecord, UsageSink};

/// `X-Request-ID`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The CSP for API responses: nothing may be loaded or framed.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The longest unmatched path written to a log line, in bytes.
const MAX_LOGGED_PATH: usize = 256;

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn shorten(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn sane_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A random (v4) UUID from the thread-local generator: no system call per request, unlike
/// `Uuid::new_v4`.
fn new_request_id() -> HeaderValue {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_bytes(uuid.hyphenated().encode_lower(&mut buf).as_bytes())
        .unwrap_or(HeaderValue::from_static("invalid"))
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"))
}

fn default_message(status: StatusCode) -> String {
    match status {
        StatusCode::NOT_FOUND => "not found".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large".to_owned(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported content type".to_owned(),
        other => other
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase(),
    }
}

/// What `observe` needs besides the request.
#[derive(Clone)]
pub struct Observe {
    /// Whether `X-Forwarded-For` is trusted (`TRUST_PROXY_HEADERS`), for the client IP.
    pub trust_proxy: bool,
    /// Where a request that reached the upstream leaves its usage record (none in tests of
    /// the layers alone).
    pub usage: Option<UsageSink>,
}

/// The layer that runs [`ObserveService`] around every route (see the module documentation).
///
/// A hand-written service rather than `axum::middleware::from_fn`: everything it does before
/// and after the inner service is synchronous, so it calls the inner service in `call` and
/// finishes in its future's last poll. `from_fn` cloned the inner service for each request,
/// boxed two futures and moved the request between them (about 1,200 instructions a request,
/// issue 14).
#[derive(Clone)]
pub struct ObserveLayer(pub Observe);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> ObserveService<S> {
        ObserveService {
            inner,
            observe: self.0.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    observe: Observe,
}

impl<S, B> tower::Service<Request> for ObserveService<S>
where
    S: tower::Service<Request, Response = http::Response<B>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Observed<S::Future> {
        let request_id = req
            .headers()
            .get(&X_REQUEST_ID)
            .filter(|v| sane_request_id(v))
            .cloned()
            .unwrap_or_else(new_request_id);
        let ctx = Arc::new(RequestContext::new(request_id.clone()));
        let start = ctx.started;
        req.extensions_mut().insert(ctx.clone());
        let client_ip = client_ip_of(req.headers(), req.extensions(), self.observe.trust_proxy);
        let method = req.method().clone();
        let route = req.extensions().get::<MatchedPath>().cloned();
        // No route matched: the path itself goes on the log line (bounded), so that a client
        // calling something relay does not serve can be seen.
        let unmatched_path = route
            .is_none()
            .then(|| shorten(req.uri().path(), MAX_LOGGED_PATH).to_owned());
        // Should the client leave before the answer (the connection closes while the handler
        // waits for the upstream), this future is dropped: the guard still logs the request,
        // as 499, and leaves its usage record.
        let unanswered = Unanswered(Some(RequestLog {
            ctx,
            usage: self.observe.usage.clone(),
            client_ip,
            method,
            route,
            unmatched_path,
            status: CLIENT_CLOSED_REQUEST,
            start,
        }));
        Observed {
            inner: self.inner.call(req),
            unanswered,
            request_id: Some(request_id),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`ObserveService`]: the inner service's, then what `observe` does to its
    /// answer.
    pub struct Observed<F> {
        #[pin]
        inner: F,
        unanswered: Unanswered,
        request_id: Option<HeaderValue>,
    }
}

impl<F, B, E> std::future::Future for Observed<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, E>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?.map(Body::new);
        let (Some(log), Some(request_id)) = (this.unanswered.0.take(), this.request_id.take())
        else {
            return Poll::Ready(Ok(response));
        };
        Poll::Ready(Ok(finish(response, log, request_id)))
    }
}

/// What `observe` does to an answer: logs a 5xx's detail, puts a non-JSON error into the
/// envelope, adds the request id and the security headers, and logs the request when its body
/// ends.
fn finish(mut response: Response, mut log: RequestLog, request_id: HeaderValue) -> Response {
    let status = response.status();
    if let Some(ErrorDetail(detail)) = response.extensions_mut().remove::<ErrorDetail>() {
        let request_id = String::from_utf8_lossy(request_id.as_bytes());
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(request_id = %request_id, error = %detail, "internal error");
        } else {
            tracing::warn!(request_id = %request_id, reason = %detail, "dependency unavailable");
        }
    }
    if (status.is_client_error() || status.is_server_error()) && !is_json(&response) {
        let mut enveloped = envelope_response(
            status,
            default_message(status),
            error_code_for(status),
            None,
        );
        for (name, value) in response.headers() {
            if name != CONTENT_TYPE && name != http::header::CONTENT_LENGTH {
                enveloped.headers_mut().append(name.clone(), value.clone());
            }
        }
        response = enveloped;
    }

    let headers = response.headers_mut();
    headers.insert(X_REQUEST_ID.clone(), request_id);
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // What the CORS layer's answers depend on, on every answer (as tower-http's default did),
    // so that a cache never serves one origin's answer to another.
    headers.append(http::header::VARY, HeaderValue::from_static(CORS_VARY));
    if !headers.contains_key(CONTENT_SECURITY_POLICY) {
        headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(API_CSP));
    }

    log.status = status;
    if http_body::Body::is_end_stream(response.body()) {
        // Nothing to send (a 204, a redirect): the server will not poll the body, so log now.
        log.emit(true);
        return response;
    }
    response.map(|body| {
        Body::new(LoggedBody {
            inner: body,
            log: Some(log),
        })
    })
}

/// The request headers CORS answers vary by.
const CORS_VARY: &str = "origin, access-control-request-method, access-control-request-headers";

/// The status logged for a request whose client left before the answer (nginx's 499).
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Logs its request (unanswered) when dropped while still holding it.
struct Unanswered(Option<RequestLog>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(log) = self.0.take() {
            log.emit(false);
        }
    }
}

struct RequestLog {
    ctx: Arc<RequestContext>,
    usage: Option<UsageSink>,
    client_ip: IpAddr,
    method: Method,
    route: Option<MatchedPath>,
    unmatched_path: Option<String>,
    status: StatusCode,
    start: Instant,
}

impl RequestLog {
    fn emit(self, completed: bool) {
        // The line's fields are only made when the line is written (not at LOG_LEVEL=warn).
        if tracing::enabled!(target: "relay::request", tracing::Level::INFO) {
            let latency_ms = self.start.elapsed().as_secs_f64() * 1000.0;
            let user_id = self.ctx.user().map(|u| u.to_string());
            let usage = self.ctx.usage();
            tracing::info!(
                target: "relay::request",
                method = %self.method,
                route = self.route.as_ref().map_or("-", MatchedPath::as_str),
                path = self.unmatched_path.as_deref(),
                status = self.status.as_u16(),
                latency_ms = (latency_ms * 1000.0).round() / 1000.0,
                request_id = %String::from_utf8_lossy(self.ctx.request_id.as_bytes()),
                client_ip = %self.client_ip,
                user_id = user_id.as_deref(),
                prompt_tokens = usage.map(|u| u.prompt_tokens),
                completion_tokens = usage.map(|u| u.completion_tokens),
                completed,
                "request"
            );
        }
        crate::measure::count_request(
            self.route.as_ref().map(MatchedPath::as_str),
            &self.method,
            self.status.as_u16(),
            self.start.elapsed(),
        );
        count_upstream(&self.ctx, self.status, completed);
        settle_tokens(&self.ctx, self.status);
        if let Some(sink) = &self.usage {
            record_usage(sink, &self.ctx, self.status, completed);
        }
    }
}

/// Counts a request that reached the upstream in the metrics: its outcome (`ok`, `cancelled`
/// by the client, `timeout`, `rate_limited` by the upstream, `client_error` for the
/// upstream's other 4xx, else `error`) and its time to first byte.
fn count_upstream(ctx: &RequestContext, status: StatusCode, completed: bool) {
    let Some(call) = ctx.upstream() else {
        return;
    };
    let end = ctx.stream_end();
    let status = match end {
        Some(StreamEnd::Failed(code)) => code,
        _ => status.as_u16(),
    };
    let outcome = if !completed && end != Some(StreamEnd::Done) {
        "cancelled"
    } else {
        match status {
            200..=299 => "ok",
            429 => "rate_limited",
            504 => "timeout",
            400..=499 => "client_error",
            _ => "error",
        }
    };
    let first_byte = ctx.first_byte().map(|at| at - ctx.started);
    crate::measure::count_upstream(call.endpoint, &call.model, outcome, first_byte);
}

/// Settles the request's token reservation, if it made one: what its usage did not spend goes
/// back. Without usage, all goes back if the upstream was never asked or answered an error
/// (nothing was billed), and nothing otherwise (a stream cut short, a stalled upstream, may
/// have spent it all).
fn settle_tokens(ctx: &RequestContext, status: StatusCode) {
    let Some(Settlement(settle)) = ctx.take_settlement() else {
        return;
    };
    let used = match (ctx.usage(), ctx.upstream()) {
        (Some(usage), _) => Some(usage.prompt_tokens.saturating_add(usage.completion_tokens)),
        (None, None) => Some(0),
        // An error answer before any output; but a 502 or 504 may be an upstream that
        // failed or stalled while it worked (and billed), and a 499 a client that left while
        // the upstream worked (and billed): those keep the reservation.
        (None, Some(_))
            if ctx.stream_end().is_none()
                && (status.is_client_error() || status.is_server_error())
                && !matches!(status.as_u16(), 499 | 502 | 504) =>
        {
            Some(0)
        }
        (None, Some(_)) => None,
    };
    settle(used);
}

/// The longest model name recorded, in bytes.
const MAX_RECORDED_MODEL: usize = 256;

/// A model name fit for a record: control characters (a NUL would fail PostgreSQL's insert of
/// the whole batch) replaced, cut to [`MAX_RECORDED_MODEL`] bytes. Without `ALLOWED_MODELS`,
/// clients name any model they like.
fn recorded_model(model: &str) -> String {
    let model = shorten(model, MAX_RECORDED_MODEL);
    // The usual name (printable ASCII) is copied as it is, not rebuilt a character at a time.
    if model.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return model.to_owned();
    }
    model
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Leaves the usage record of a request that reached the upstream (none for the others).
fn record_usage(sink: &UsageSink, ctx: &RequestContext, status: StatusCode, completed: bool) {
    let (Some(call), Some(user_id)) = (ctx.upstream(), ctx.user()) else {
        return;
    };
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let end = ctx.stream_end();
    // A stream that failed after it started was answered 200, but did not succeed.
    let status = match end {
        Some(StreamEnd::Failed(code)) => code,
        _ => status.as_u16(),
    };
    // Cancelled: the client left before the answer ended (not merely before the server saw the
    // body's end after the stream's last event).
    let cancelled = !completed && end != Some(StreamEnd::Done);
    let (usage, pending) = match ctx.usage() {
        Some(usage) => (usage, None),
        // A stream that ended before its usage, or a request whose client left before the
        // answer: estimated from what was delivered (if anything), by the writer (off the
        // request path).
        None if (call.streamed && (200..300).contains(&status)) || cancelled || end.is_some() => {
            (Usage::default(), Some(ctx.take_delivered()))
        }
        None => (Usage::default(), None),
    };
    sink.record(PendingRecord {
        record: UsageRecord {
            user_id,
            api_key_id: ctx.api_key(),
            endpoint: call.endpoint,
            model: recorded_model(&call.model),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            status,
            streamed: call.streamed,
            cancelled,
            estimated: pending.is_some(),
            duration_ms: millis(ctx.started.elapsed()),
            ttfb_ms: ctx.first_byte().map(|at| millis(at - ctx.started)),
            request_id: String::from_utf8_lossy(ctx.request_id.as_bytes()).into_owned(),
            created_at: chrono::Utc::now()
                - chrono::Duration::from_std(ctx.started.elapsed()).unwrap_or_default(),
        },
        delivered: pending,
        prompt_bytes: call.prompt_bytes,
    });
}

pin_project_lite::pin_project! {
    /// A response body that logs the request's line once it ends or is dropped.
    struct LoggedBody {
        #[pin]
        inner: Body,
        log: Option<RequestLog>,
    }

    impl PinnedDrop for LoggedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(log) = this.log.take() {
                // Dropped before the end: the client went away mid-response.
                log.emit(false);
            }
        }
    }
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let polled = inner.as_mut().poll_frame(cx);
        let finished = match &polled {
            Poll::Ready(None) => true,
            // The server stops polling a body that says it has ended, so check after each frame.
            Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => false,
        };
        if finished && let Some(log) = this.log.take() {
            log.emit(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_models_are_plain_and_short() {
        assert_eq!(recorded_model("gpt-4o"), "gpt-4o");
        assert_eq!(recorded_model("a\u{0}b\nc"), "a\u{fffd}b\u{fffd}c");
        assert_eq!(recorded_model(&"é".repeat(200)).len(), 256);
        assert_eq!(recorded_model("gpt-4o mini@x+y"), "gpt-4o mini@x+y");
        assert_eq!(recorded_model("a\u{7f}b\u{85}c"), "a\u{fffd}b\u{fffd}c");
        assert_eq!(recorded_model(&"m".repeat(300)), "m".repeat(256));
    }

    #[test]
    fn request_ids_are_checked() {
        for ok in ["a", "abc-DEF_123.x", &"x".repeat(128)] {
            assert!(sane_request_id(&HeaderValue::from_str(ok).unwrap()), "{ok}");
        }
        for bad in ["", "a b", "a/b", "<script>", &"x".repeat(129)] {
            assert!(
                !sane_request_id(&HeaderValue::from_str(bad).unwrap()),
                "{bad}"
            );
        }
    }
}
