//! `AuthUser`: the Bearer-token extractor every protected handler takes.
//!
//! It checks the access token in memory only (signature, algorithm, expiry, issuer, kind): no
//! database query on the request path, which is what lets the chat relay stay fast. The price
//! is that a deactivated user keeps a working access token until it expires (minutes); login
//! and refresh, which do touch the database, refuse inactive users.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::header::AUTHORIZATION;
use http::request::Parts;
use uuid::Uuid;

use crate::auth::jwt::TokenError;
use crate::error::ApiError;
use crate::http::middleware::RequestContext;
use crate::state::AppState;

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    /// The user's id (the token's `sub`).
    pub id: Uuid,
    /// Whether the token says the user is an admin.
    pub is_admin: bool,
}

/// Takes the token out of `Authorization: Bearer <token>` (scheme case-insensitive).
pub fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized {
            message: "missing bearer token",
            code: "missing_token",
        })?;
    let value = value.to_str().map_err(|_| ApiError::Unauthorized {
        message: "malformed authorization header",
        code: "invalid_token",
    })?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::Unauthorized {
            message: "authorization header must be `Bearer <token>`",
            code: "invalid_token",
        }),
    }
}

/// Maps a token failure to the 401 the client sees.
pub fn token_rejection(err: TokenError) -> ApiError {
    match err {
        TokenError::Expired => ApiError::Unauthorized {
            message: "token expired",
            code: "token_expired",
        },
        TokenError::Invalid => ApiError::Unauthorized {
            message: "invalid token",
            code: "invalid_token",
        },
        TokenError::WrongKind => ApiError::Unauthorized {
            message: "wrong token type",
            code: "invalid_token",
        },
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(parts)?;
        let access = state.jwt.verify_access(token).map_err(token_rejection)?;
        // Put the user on the request's log line.
        if let Some(ctx) = parts.extensions.get::<Arc<RequestContext>>() {
            ctx.set_user(access.user_id);
        }
        Ok(AuthUser {
            id: access.user_id,
            is_admin: access.is_admin,
        })
    }
}
