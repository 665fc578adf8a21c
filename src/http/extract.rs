//! Extractors whose rejections use our error envelope: the Bearer token ([`AuthUser`]), the
//! request's context ([`Ctx`]), and bodies ([`ApiJson`], [`RawJson`]).
//!
//! axum's own `Json` answers rejections in plain text; these answer 400 for broken JSON, 415
//! for a wrong content type, 413 for a body over `MAX_REQUEST_BYTES`, 408 for a body that did
//! not arrive within `REQUEST_BODY_TIMEOUT_SECONDS`, and 422 with `param` naming the field for
//! JSON of the wrong shape.
//!
//! `AuthUser` checks the access token in memory (signature, algorithm, expiry, issuer, kind),
//! and its user's state in a cache refreshed every few seconds (`auth::status`): no database
//! query per request, and a deactivated or deleted user is refused within seconds.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue};
use serde::de::DeserializeOwned;

use crate::auth::AuthUser;
use crate::auth::api_keys::looks_like_key;
use crate::context::RequestContext;
use crate::error::ApiError;
use crate::state::AppState;

/// Takes the token out of `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing bearer token", "missing_token"))?;
    // `HeaderValue::to_str`, a byte at a time: a header value has no control character but
    // tab (`HeaderValue` refuses them), so being ASCII is being visible ASCII, and `is_ascii`
    // checks a word at a time (300 instructions a request for a 290-byte token, issue 14).
    let value = Some(value.as_bytes())
        .filter(|bytes| bytes.is_ascii())
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::unauthorized("malformed authorization header", "invalid_token"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::unauthorized(
            "authorization header must be `Bearer <token>`",
            "invalid_token",
        )),
    }
}

/// Verifies the request's credential — an access token (in memory) or an API key (its tag in
/// memory, its state in a cache, see `auth::api_keys`) — checks that its user still exists, is
/// active and was not revoked since (a cache refreshed every few seconds, see `auth::status`),
/// and records the user (and key) on the request's context.
pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<AuthUser, ApiError> {
    let token = bearer_token(&parts.headers)?;
    let ctx = parts.extensions.get::<Arc<RequestContext>>();
    if looks_like_key(token) {
        let owner = state.keys.owner(token).await?;
        if let Some(ctx) = ctx {
            ctx.set_user(owner.user_id);
            ctx.set_api_key(owner.key_id);
        }
        let standing = state.users.check(owner.user_id).await?;
        return Ok(AuthUser {
            id: owner.user_id,
            is_admin: standing.is_admin,
            api_key: Some(owner.key_id),
            issued_at: None,
            token_limit: standing.token_limit,
        });
    }
    let access = state.jwt.verify_access(token)?;
    if let Some(ctx) = ctx {
        ctx.set_user(access.user_id);
    }
    let standing = state.users.check(access.user_id).await?;
    if standing.revoked(access.iat) {
        return Err(ApiError::unauthorized(
            "this session has been revoked; log in again",
            "token_revoked",
        ));
    }
    Ok(AuthUser {
        id: access.user_id,
        is_admin: standing.is_admin,
        api_key: None,
        issued_at: Some(access.iat),
        token_limit: standing.token_limit,
    })
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // A rate-limit layer keyed by user has verified the credential already.
        match parts.extensions.get::<AuthUser>() {
            Some(user) => Ok(*user),
            None => authenticate(parts, state).await,
        }
    }
}

/// The caller of an account endpoint (`/auth/*`, `/admin/*`): an access token only. An API key
/// there is a `403`: a leaked server key must not manage the account that owns it.
pub struct SessionUser(pub AuthUser);

impl FromRequestParts<AppState> for SessionUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let user = AuthUser::from_request_parts(parts, state).await?;
        if user.api_key.is_some() {
            return Err(ApiError::Forbidden {
                message: "API keys cannot be used on account endpoints; log in with a password"
                    .into(),
                code: "api_key_not_allowed",
            });
        }
        Ok(SessionUser(user))
    }
}

/// The caller of an admin endpoint: an access token of a user who is an admin now (checked
/// against the user's current state, not the token's claim); others get a `403`.
pub struct AdminUser(pub AuthUser);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let SessionUser(user) = SessionUser::from_request_parts(parts, state).await?;
        if !user.is_admin {
            return Err(ApiError::Forbidden {
                message: "this endpoint is for admins".into(),
                code: "admin_only",
            });
        }
        Ok(AdminUser(user))
    }
}

/// The request's [`RequestContext`] (see `http::middleware`).
pub struct Ctx(pub Arc<RequestContext>);

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Always there behind the `observe` middleware; a fresh one keeps handlers usable
        // without it (in unit tests).
        Ok(Ctx(parts
            .extensions
            .get::<Arc<RequestContext>>()
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(RequestContext::new(HeaderValue::from_static("-")))
            })))
    }
}

/// A response carrying `body`, JSON bytes relayed as they came.
pub fn json_bytes(body: Bytes) -> axum::response::Response {
    answer(
        axum::body::Body::from(body),
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
    )
}

/// How many headers an answer ends up with, about: its own, the rate-limit headers, the
/// request id and the security headers `middleware::ObserveLayer` adds.
const ANSWER_HEADERS: usize = 16;

/// An answer with `body` and `headers`, its header map made large enough for the headers the
/// layers above add: an empty map grows at the first and again at the seventh header (each
/// growth moves every entry; about 400 instructions a request, issue 14).
pub fn answer<const N: usize>(
    body: axum::body::Body,
    headers: [(http::HeaderName, HeaderValue); N],
) -> axum::response::Response {
    let mut response = axum::response::Response::new(body);
    let map = response.headers_mut();
    *map = HeaderMap::with_capacity(ANSWER_HEADERS);
    for (name, value) in headers {
        map.insert(name, value);
    }
    response
}

/// A JSON body as bytes, unparsed (the relay validates and forwards it): checks the content
/// type and reads the body with our rejections.
pub struct RawJson(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        expect_json(req.headers())?;
        read_body(req).await.map(RawJson)
    }
}

fn expect_json(headers: &HeaderMap) -> Result<(), ApiError> {
    if body_kind(headers) == BodyKind::Json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(
            "expected Content-Type: application/json".into(),
        ))
    }
}

/// A JSON body of type `T`.
pub struct ApiJson<T>(pub T);

/// The body's media type, as far as we care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` or `…+json` (or no content type at all: clients such as `curl -d`
    /// often forget it, and the body is then tried as JSON).
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// Anything else.
    Other,
}

/// Classifies the request's `Content-Type`.
pub fn body_kind(headers: &HeaderMap) -> BodyKind {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return BodyKind::Json;
    };
    let Ok(value) = value.to_str() else {
        return BodyKind::Other;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    // Compared without letter case and without a lower-cased copy (one allocation a request).
    let subtype = essence
        .get(.."application/".len())
        .filter(|lead| lead.eq_ignore_ascii_case("application/"))
        .and_then(|_| essence.get("application/".len()..));
    let Some(subtype) = subtype else {
        return BodyKind::Other;
    };
    let plus_json = subtype
        .len()
        .checked_sub("+json".len())
        .and_then(|at| subtype.get(at..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case("+json"));
    if subtype.eq_ignore_ascii_case("json") || plus_json {
        BodyKind::Json
    } else if subtype.eq_ignore_ascii_case("x-www-form-urlencoded") {
        BodyKind::Form
    } else {
        BodyKind::Other
    }
}

/// Reads the whole body (bounded by the body-limit layer and by its deadline, see
/// `http::deadline`) with our rejections.
pub async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, &()).await.map_err(|rejection| {
        if rejection.status() == http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else if crate::http::deadline::is_timed_out(&rejection) {
            ApiError::RequestTimeout
        } else {
            ApiError::BadRequest {
                message: "could not read the request body".into(),
                code: "invalid_body",
            }
        }
    })
}

/// Parses JSON into `T`: syntax errors are 400, shape errors 422 naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Syntax first (cheaply, into nothing), so that broken JSON is always a 400 even when its
    // first token already has the wrong type for `T`.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| ApiError::BadRequest {
        message: format!("the body is not valid JSON: {e}"),
        code: "invalid_json",
    })?;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        // Skipping a value (`IgnoredAny` above) does not check its strings, so broken UTF-8
        // or escapes may first be noticed here: still a syntax error, still a 400.
        if !inner.is_data() {
            ApiError::BadRequest {
                message: format!("the body is not valid JSON: {inner}"),
                code: "invalid_json",
            }
        } else {
            let param = if path == "." {
                missing_field(&inner.to_string()).unwrap_or_else(|| "body".to_owned())
            } else {
                path
            };
            let message = strip_position(&inner.to_string());
            ApiError::validation(param, message)
        }
    })?;
    Ok(value)
}

/// Parses a form body into `T`; a missing or malformed field is a 422.
pub fn parse_form<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_urlencoded::from_bytes(bytes).map_err(|e| {
        let message = e.to_string();
        let param = missing_field(&message).unwrap_or_else(|| "body".to_owned());
        ApiError::validation(param, message)
    })
}

fn missing_field(message: &str) -> Option<String> {
    let rest = message.split("missing field `").nth(1)?;
    Some(rest.split('`').next()?.to_owned())
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        expect_json(req.headers())?;
        let bytes = read_body(req).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Login {
        #[allow(dead_code)]
        email: String,
        #[allow(dead_code)]
        password: String,
    }

    #[test]
    fn rejections_name_the_field() {
        match parse_json::<Login>(br#"{"email": "a@b.c"}"#) {
            Err(ApiError::Validation { param, .. }) => assert_eq!(param, "password"),
            other => panic!("{other:?}"),
        }
        match parse_json::<Login>(br#"{"email": 5, "password": "x"}"#) {
            Err(ApiError::Validation { param, .. }) => assert_eq!(param, "email"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_json::<Login>(br#"{"email": "#),
            Err(ApiError::BadRequest { .. })
        ));
        assert!(matches!(
            parse_json::<Login>(br#"{"email":"a","password":"b"} trailing"#),
            Err(ApiError::BadRequest { .. })
        ));
    }

    #[test]
    fn bearer_tokens_are_read_from_visible_ascii_only() {
        let token = |value: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_bytes(value).unwrap());
            bearer_token(&h)
                .map(str::to_owned)
                .map_err(|e| e.to_string())
        };
        assert_eq!(token(b"Bearer abc.def").unwrap(), "abc.def");
        assert_eq!(token(b"bearer \tabc ").unwrap(), "abc");
        for bad in [
            &b"Bearer ab\xc3\xa9"[..],
            b"Bearer \xff",
            b"Basic abc",
            b"Bearer  ",
            b"abc",
        ] {
            assert!(token(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(bearer_token(&HeaderMap::new()).is_err());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert_eq!(body_kind(&h), BodyKind::Json);
        h.insert(
            CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(body_kind(&h), BodyKind::Json);
        h.insert(
            CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        assert_eq!(body_kind(&h), BodyKind::Form);
        h.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        assert_eq!(body_kind(&h), BodyKind::Other);
        for (value, kind) in [
            ("Application/JSON", BodyKind::Json),
            (" application/vnd.api+JSON ; x=1", BodyKind::Json),
            ("APPLICATION/X-WWW-FORM-URLENCODED", BodyKind::Form),
            ("application/jsonx", BodyKind::Other),
            ("application/json+x", BodyKind::Other),
            ("text/json", BodyKind::Other),
            ("text/x+json", BodyKind::Other),
            ("application", BodyKind::Other),
            ("", BodyKind::Other),
        ] {
            h.insert(CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(body_kind(&h), kind, "{value:?}");
        }
    }
}
