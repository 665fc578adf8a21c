//! Authentication and accounts: JWTs, password hashing, users and sessions. Nothing here knows
//! about HTTP; `http::extract` turns a Bearer header into an [`AuthUser`].

pub mod api_keys;
mod cache;
pub mod jwt;
pub mod password;
pub mod session;
pub mod status;
pub mod users;

use uuid::Uuid;

pub use jwt::{Claims, JwtKeys, TokenKind};
pub use password::Passwords;
pub use session::{Sessions, TokenPair};

/// The authenticated caller of a request, from a verified access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    /// The user's id (the token's `sub`, or the API key's owner).
    pub id: Uuid,
    /// Whether the user is an admin now (from `auth::status`, a few seconds old at most).
    pub is_admin: bool,
    /// The API key the request came with (`None`: an access token).
    pub api_key: Option<Uuid>,
    /// When the access token was issued, in seconds since the epoch (`None`: an API key).
    pub issued_at: Option<i64>,
    /// The user's own token limit, if one is set (from `auth::status`, a few seconds old at
    /// most).
    pub token_limit: Option<UserTokenLimit>,
}

/// A user's own token limit, overriding `TOKEN_LIMIT` / `TOKEN_LIMIT_WINDOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserTokenLimit {
    /// Tokens per window.
    pub tokens: u64,
    /// The window in seconds (`None`: `TOKEN_LIMIT_WINDOW`).
    pub window_secs: Option<u64>,
}
