//! Applying rate limits to endpoints: the `Limited<E>` extractor, the client IP, and the
//! `X-RateLimit-*` headers.
//!
//! The extractor runs before the body is read, so a limited request never reaches the
//! upstream or the password hasher. Handlers pass their result through [`Limited::wrap`], so
//! that every answer of a limited endpoint — success or error — carries the headers.

use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{HeaderName, HeaderValue};

use crate::auth::extractor::bearer_token;
use crate::config::Endpoint;
use crate::error::ApiError;
use crate::ratelimit::{Decision, Subject};
use crate::state::AppState;

/// An endpoint with a rate limit.
pub trait LimitedEndpoint {
    /// Which one.
    const ENDPOINT: Endpoint;
    /// Keyed by the user when a valid token is presented (else by IP).
    const BY_USER: bool;
}

macro_rules! endpoints {
    ($($name:ident => $endpoint:ident, $by_user:expr;)*) => {$(
        #[doc = concat!("Marker for the `", stringify!($endpoint), "` limit.")]
        pub struct $name;
        impl LimitedEndpoint for $name {
            const ENDPOINT: Endpoint = Endpoint::$endpoint;
            const BY_USER: bool = $by_user;
        }
    )*};
}

endpoints! {
    ChatLimit => Chat, true;
    ModelsLimit => Models, true;
    RegisterLimit => Register, false;
    RefreshLimit => Refresh, false;
    LoginLimit => Login, false;
}

/// The client's IP: the connection's peer, or with `TRUST_PROXY_HEADERS` the right-most
/// address of `X-Forwarded-For` (the one the trusted proxy itself appended; entries to its
/// left come from the client and can be anything).
pub fn client_ip(parts: &Parts, trust_proxy: bool) -> IpAddr {
    if trust_proxy
        && let Some(ip) = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .next_back()
    {
        return ip;
    }
    parts
        .extensions
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
        Ok(ClientIp(client_ip(parts, state.config.trust_proxy_headers)))
    }
}

/// A request that passed its endpoint's limit; holds the decision for the headers.
pub struct Limited<E> {
    /// The (most restrictive) decision.
    pub decision: Decision,
    _endpoint: PhantomData<E>,
}

impl<E> Limited<E> {
    /// Wraps a decision.
    pub fn new(decision: Decision) -> Self {
        Limited {
            decision,
            _endpoint: PhantomData,
        }
    }

    /// Turns the handler's result into a response carrying the rate-limit headers.
    pub fn wrap<T: IntoResponse>(self, result: Result<T, ApiError>) -> Response {
        let mut response = result.into_response();
        set_headers(&mut response, &self.decision);
        response
    }
}

fn seconds(ms: u64) -> HeaderValue {
    HeaderValue::from(ms.div_ceil(1000))
}

/// Adds `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full).
pub fn set_headers(response: &mut Response, decision: &Decision) {
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("x-ratelimit-limit"),
        HeaderValue::from(decision.limit),
    );
    headers.insert(
        HeaderName::from_static("x-ratelimit-remaining"),
        HeaderValue::from(decision.remaining),
    );
    headers.insert(
        HeaderName::from_static("x-ratelimit-reset"),
        seconds(decision.reset_ms),
    );
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

impl<E: LimitedEndpoint + Send + Sync> FromRequestParts<AppState> for Limited<E> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let user = if E::BY_USER {
            bearer_token(parts)
                .ok()
                .and_then(|token| state.jwt.verify_access(token).ok())
                .map(|access| Subject::User(access.user_id))
        } else {
            None
        };
        let subject =
            user.unwrap_or_else(|| Subject::Ip(client_ip(parts, state.config.trust_proxy_headers)));
        let decision = state.limiter.check(E::ENDPOINT, &subject).await;
        if decision.allowed {
            Ok(Limited::new(decision))
        } else {
            Err(rejection(&decision))
        }
    }
}
