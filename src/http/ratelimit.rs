//! Applying rate limits to routes: a `route_layer` per limited route group, the client IP, and
//! the `X-RateLimit-*` headers.
//!
//! The layer decides before any extractor runs, so a limited request never reaches the body,
//! the upstream or the password hasher; a refused one gets a 429 with `Retry-After`. Every
//! answer that passes through it — success, handler error or extractor rejection — carries
//! the headers. Groups keyed by user verify the Bearer token once, here, and leave the
//! [`AuthUser`] in the request's extensions for the handler's extractor; a request without a
//! valid token is keyed by its IP (and then refused by the extractor, with the headers).
//! Login checks its two buckets (IP, then email) in its handler, since the second key is in
//! the body.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderName, HeaderValue};

use crate::auth::AuthUser;
use crate::config::Endpoint;
use crate::context::{RequestContext, Settlement};
use crate::error::ApiError;
use crate::http::extract::authenticate;
use crate::ratelimit::tokens::TokenDecision;
use crate::ratelimit::{Decision, Subject};
use crate::state::AppState;

/// Whose bucket a limited route group takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyBy {
    /// The user of a valid access token, else the client IP.
    User,
    /// The client IP.
    Ip,
}

/// What [`limit`] needs: the app, and which limit applies how.
#[derive(Clone)]
pub struct LimitState {
    /// The app (limiter, JWT keys, proxy settings).
    pub app: AppState,
    /// Which endpoint's limit.
    pub endpoint: Endpoint,
    /// Whose bucket.
    pub by: KeyBy,
    /// Whether the group's requests reach the upstream and are metered by token limits (chat,
    /// responses, embeddings): for a user a token limit applies to, the request check is left
    /// to the handler ([`Deferred`]), to be made with the token reservation in one call.
    pub metered: bool,
}

/// A request-limit check that [`limit`] left to the handler of a metered route: the handler
/// makes it in [`admit`], together with the request's token reservation, once the body (and so
/// the worst case) is known — one Redis round trip for both. When the handler answers without
/// admitting (a body it refused), [`limit`] makes the check afterwards, so that such a request
/// counts all the same.
#[derive(Clone)]
pub struct Deferred(Arc<DeferredCheck>);

struct DeferredCheck {
    endpoint: Endpoint,
    decision: OnceLock<Decision>,
}

/// The [`Deferred`] check of this request, if [`limit`] left one (an extractor, never refusing).
pub struct Admission(Option<Deferred>);

impl<S: Sync> FromRequestParts<S> for Admission {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Admission(parts.extensions.get::<Deferred>().cloned()))
    }
}

/// The middleware of a limited route group (see the module documentation); installed with
/// `axum::middleware::from_fn_with_state(LimitState { .. }, limit)` as a `route_layer`.
pub async fn limit(State(limit): State<LimitState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let user = match limit.by {
        KeyBy::User => authenticate(&parts, &limit.app).await.ok(),
        KeyBy::Ip => None,
    };
    let subject = match user {
        Some(user) => {
            parts.extensions.insert(user);
            Subject::User(user.id)
        }
        None => Subject::Ip(client_ip(
            &parts,
            limit.app.config.server.trust_proxy_headers,
        )),
    };
    let defer = limit.metered
        && user.is_some_and(|user| limit.app.limiter.token_shape(user.token_limit).is_some());
    if defer {
        let deferred = Deferred(Arc::new(DeferredCheck {
            endpoint: limit.endpoint,
            decision: OnceLock::new(),
        }));
        parts.extensions.insert(deferred.clone());
        let mut response = next.run(Request::from_parts(parts, body)).await;
        let decision = match deferred.0.decision.get() {
            Some(decision) => *decision,
            None => {
                // Answered without admitting (a refused body): it counts all the same.
                let decision = limit.app.limiter.check(limit.endpoint, &subject).await;
                if !decision.allowed {
                    return rejection(&decision);
                }
                decision
            }
        };
        set_headers(&mut response, &decision);
        return response;
    }
    let decision = limit.app.limiter.check(limit.endpoint, &subject).await;
    if !decision.allowed {
        return rejection(&decision);
    }
    let mut response = next.run(Request::from_parts(parts, body)).await;
    set_headers(&mut response, &decision);
    response
}

/// The client's IP: the connection's peer, or with `TRUST_PROXY_HEADERS` the right-most
/// entry of `X-Forwarded-For` (the one the trusted proxy itself appended; entries to its left
/// come from the client and can be anything). When that entry is not a bare IP address (a
/// port, `unknown`, garbage), the peer is used: never an entry further left, which the client
/// would choose.
pub fn client_ip(parts: &Parts, trust_proxy: bool) -> IpAddr {
    client_ip_of(&parts.headers, &parts.extensions, trust_proxy)
}

/// [`client_ip`] from a request's headers and extensions.
pub fn client_ip_of(
    headers: &http::HeaderMap,
    extensions: &http::Extensions,
    trust_proxy: bool,
) -> IpAddr {
    if trust_proxy
        && let Some(last) = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
        && let Ok(ip) = last.trim().parse::<IpAddr>()
    {
        return ip;
    }
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// The client's IP as an extractor (see [`client_ip`]).
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(
            parts,
            state.config.server.trust_proxy_headers,
        )))
    }
}

fn seconds(ms: u64) -> HeaderValue {
    HeaderValue::from(ms.div_ceil(1000))
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset`. Built once: `HeaderName::from_static` checks
/// a custom name byte by byte each time it runs (about 150 instructions a name, issue 14).
static REQUEST_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-reset"),
];

/// The same for a token-limit decision.
static TOKEN_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

/// Adds `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full).
pub fn set_headers(response: &mut Response, decision: &Decision) {
    stamp(response, decision, &REQUEST_HEADERS);
}

/// Adds `X-RateLimit-Limit-Tokens`, `-Remaining-Tokens` and `-Reset-Tokens` (a token-limit
/// decision).
pub fn set_token_headers(response: &mut Response, decision: &Decision) {
    stamp(response, decision, &TOKEN_HEADERS);
}

/// Sets the limit, remaining and reset (seconds) of `decision` under `names`.
fn stamp(response: &mut Response, decision: &Decision, names: &'static [HeaderName; 3]) {
    let headers = response.headers_mut();
    let [limit, remaining, reset] = names;
    headers.insert(limit.clone(), HeaderValue::from(decision.limit));
    headers.insert(remaining.clone(), HeaderValue::from(decision.remaining));
    headers.insert(reset.clone(), seconds(decision.reset_ms));
}

/// Admits a metered request before it goes upstream: makes the request-limit check that
/// [`limit`] left to it (if it did), and reserves the request's worst case (`worst` tokens: the
/// prompt's bound plus its output cap) from `user`'s token bucket when a token limit applies —
/// in one call to the limiter. The settlement goes into `ctx`, for the request's end. Returns
/// the token decision (for the headers), or the 429 when either limit refuses.
pub async fn admit(
    state: &AppState,
    user: &AuthUser,
    ctx: &RequestContext,
    admission: &Admission,
    worst: u64,
) -> Result<Option<Decision>, Response> {
    let deferred = admission.0.as_ref().map(|d| &d.0);
    let subject = Subject::User(user.id);
    let (request, tokens) = state
        .limiter
        .admit(
            deferred.map(|d| (d.endpoint, &subject)),
            user.id,
            user.token_limit,
            worst,
        )
        .await;
    if let (Some(deferred), Some(request)) = (deferred, request) {
        let _ = deferred.decision.set(request);
        if !request.allowed {
            return Err(rejection(&request));
        }
    }
    match tokens {
        TokenDecision::Off => Ok(None),
        TokenDecision::Admitted(reservation, decision) => {
            ctx.set_settlement(Settlement(Box::new(move |used| reservation.settle(used))));
            Ok(Some(decision))
        }
        TokenDecision::Refused(decision) => {
            let retry_after = decision.retry_after_ms.div_ceil(1000).max(1);
            let error = if worst > decision.limit {
                ApiError::TokenLimited {
                    retry_after,
                    message: format!(
                        "this request may use up to {worst} tokens (its prompt, bounded by its \
                         size, and its output cap), more than your token limit of {}; lower \
                         max_tokens / max_output_tokens or send a shorter prompt",
                        decision.limit
                    ),
                }
            } else {
                ApiError::TokenLimited {
                    retry_after,
                    message: format!(
                        "token limit exceeded: this request may use up to {worst} tokens and \
                         {} are left; retry later",
                        decision.remaining
                    ),
                }
            };
            let never_fits = worst > decision.limit;
            let mut response = error.into_response();
            set_token_headers(&mut response, &decision);
            if never_fits {
                // Retrying the same request cannot help; the OpenAI SDKs honour this.
                response.headers_mut().insert(
                    HeaderName::from_static("x-should-retry"),
                    HeaderValue::from_static("false"),
                );
            }
            Err(response)
        }
    }
}

/// Tokens counted for each image a request includes: more than any current model charges for
/// one high-detail image (gpt-4o-mini's multiplier makes one about 25,000 to 48,000), which
/// its bytes (a URL, or a compressed image) do not bound.
pub const IMAGE_TOKENS: u64 = 50_000;

/// A request's worst case in tokens: its prompt, bounded by the body's size in bytes plus
/// [`IMAGE_TOKENS`] per image, plus its output cap. Bytes bound tokens because every token of
/// the tokenizers in use is at least one byte of text, and the body holds the text (escaped,
/// so never shorter) along with the JSON around it, which is longer than the few tokens each
/// message adds. Files (PDFs) are not bounded by their bytes: with a token limit on, they are
/// refused. Images and files are found by their decoded type (see `relay::body::attachments`).
pub fn worst_case(body: &[u8], max_output: Option<u64>) -> Result<u64, ApiError> {
    let Some(found) = crate::relay::body::attachments(body) else {
        return Err(ApiError::validation(
            "body",
            "with a token limit on, relay must read the whole body, and this one nests too deep",
        ));
    };
    if found.files > 0 {
        return Err(ApiError::validation(
            "input",
            "with a token limit on, relay cannot bound what a file costs: send its text instead",
        ));
    }
    Ok((body.len() as u64)
        .saturating_add(found.images.saturating_mul(IMAGE_TOKENS))
        .saturating_add(max_output.unwrap_or(0)))
}

/// The output cap relay sets on `user`'s requests that name none, when a token limit applies
/// to them.
pub fn default_output(state: &AppState, user: &AuthUser) -> Option<u32> {
    state
        .limiter
        .token_shape(user.token_limit)
        .map(|_| state.config.rate_limits.max_output_tokens)
}

/// The 429 for a denied decision, with `Retry-After` (whole seconds, at least 1).
pub fn rejection(decision: &Decision) -> Response {
    let retry_after = decision.retry_after_ms.div_ceil(1000).max(1);
    let mut response = ApiError::RateLimited { retry_after }.into_response();
    set_headers(&mut response, decision);
    response
}

/// Of several decisions, the one to act on: the denial with the longest wait if any, else
/// the one with the fewest requests remaining.
pub fn most_restrictive(decisions: &[Decision]) -> Option<Decision> {
    decisions
        .iter()
        .copied()
        .min_by_key(|d| (d.allowed, std::cmp::Reverse(d.retry_after_ms), d.remaining))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_worst_case_bounds_text_images_and_output() {
        let text = br#"{"messages":[{"role":"user","content":"hello"}]}"#;
        assert_eq!(worst_case(text, Some(10)).unwrap(), text.len() as u64 + 10);
        let image = br#"{"input":[{"type":"input_image","image_url":"https://x/y.png"}]}"#;
        assert_eq!(
            worst_case(image, None).unwrap(),
            image.len() as u64 + IMAGE_TOKENS
        );
        let file = br#"{"input":[{"type":"input_file","file_id":"file-1"}]}"#;
        assert!(worst_case(file, None).is_err());
    }

    use super::*;

    fn ip_of(forwarded: &[&str], trust: bool) -> IpAddr {
        let mut req = http::Request::builder();
        for value in forwarded {
            req = req.header("x-forwarded-for", *value);
        }
        let (mut parts, ()) = req.body(()).unwrap().into_parts();
        parts
            .extensions
            .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 1], 4000))));
        client_ip(&parts, trust)
    }

    #[test]
    fn only_the_right_most_forwarded_entry_counts() {
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            ip_of(&["203.0.113.7, 10.9.9.9"], true),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ip_of(&["203.0.113.7", "10.1.1.1"], true),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ip_of(&[" 2001:db8::1 "], true),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // An unparsable right-most entry never lets the client pick an entry to its left.
        for bad in [
            "203.0.113.7, 10.9.9.9:4711",
            "203.0.113.7, unknown",
            "203.0.113.7,",
            "x",
        ] {
            assert_eq!(ip_of(&[bad], true), peer, "{bad}");
        }
        assert_eq!(ip_of(&["203.0.113.7"], false), peer);
        assert_eq!(ip_of(&[], true), peer);
    }
}
