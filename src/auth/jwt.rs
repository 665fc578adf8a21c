//! Access and refresh tokens: HS256 JWTs, issued and checked in memory.
//!
//! The algorithm is fixed on both sides; a token whose header names any other algorithm
//! (including `none`) is rejected before its signature is even looked at. Required claims:
//! `sub`, `exp`, `iat`, `iss`, plus our own `typ` and `jti`, so that an access token can never be
//! used as a refresh token or the other way round.

use std::time::Duration;

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

/// The `iss` of every token relay issues.
pub const ISSUER: &str = "relay";

/// What a token may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Sent as `Authorization: Bearer` on API calls.
    Access,
    /// Exchanged at `/auth/refresh` for a new pair.
    Refresh,
}

/// The claims of both token kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: Uuid,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Unique token id.
    pub jti: Uuid,
    /// `access` or `refresh`.
    pub typ: TokenKind,
    /// Always [`ISSUER`].
    pub iss: String,
    /// Whether the user is an admin (access tokens only; checked without a database query).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adm: bool,
}

/// A freshly signed token with what the caller needs to store or return it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// Its `jti`.
    pub jti: Uuid,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
}

/// Why a token was refused. The client only ever learns "invalid token".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// Bad signature, bad algorithm, malformed, missing claims, wrong issuer.
    #[error("token invalid")]
    Invalid,
    /// A valid token of the other kind.
    #[error("wrong token type")]
    WrongKind,
}

/// Signing and verification keys plus lifetimes; built once at start-up.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: Duration,
    refresh_ttl: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys")
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .finish_non_exhaustive()
    }
}

impl JwtKeys {
    /// Keys from the `SECRET_KEY` bytes.
    pub fn new(secret: &[u8], access_ttl: Duration, refresh_ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss"]);
        validation.leeway = 5;
        validation.validate_exp = true;
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl,
            refresh_ttl,
        }
    }

    /// Lifetime of access tokens.
    pub fn access_ttl(&self) -> Duration {
        self.access_ttl
    }

    /// Signs a token of `kind` for `user_id`.
    pub fn issue(
        &self,
        kind: TokenKind,
        user_id: Uuid,
        is_admin: bool,
    ) -> Result<IssuedToken, jsonwebtoken::errors::Error> {
        let ttl = match kind {
            TokenKind::Access => self.access_ttl,
            TokenKind::Refresh => self.refresh_ttl,
        };
        let now = Utc::now();
        let expires_at = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let claims = Claims {
            sub: user_id,
            exp: expires_at.timestamp(),
            iat: now.timestamp(),
            jti: Uuid::new_v4(),
            typ: kind,
            iss: ISSUER.to_owned(),
            adm: is_admin && kind == TokenKind::Access,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok(IssuedToken {
            token,
            jti: claims.jti,
            expires_at,
        })
    }

    /// Verifies signature, algorithm, expiry, issuer and kind.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<Claims, TokenError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        if data.claims.typ != kind {
            return Err(TokenError::WrongKind);
        }
        Ok(data.claims)
    }
}

/// SHA-256 of a token, hex: what the database stores instead of the token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn keys() -> JwtKeys {
        JwtKeys::new(
            b"0123456789abcdef0123456789abcdef",
            Duration::from_secs(60),
            Duration::from_secs(600),
        )
    }

    #[test]
    fn round_trip_and_kind_check() {
        let k = keys();
        let user = Uuid::new_v4();
        let access = k.issue(TokenKind::Access, user, true).unwrap();
        let claims = k.verify(&access.token, TokenKind::Access).unwrap();
        assert_eq!(claims.sub, user);
        assert!(claims.adm);
        assert_eq!(
            k.verify(&access.token, TokenKind::Refresh),
            Err(TokenError::WrongKind)
        );
        let refresh = k.issue(TokenKind::Refresh, user, true).unwrap();
        assert!(!k.verify(&refresh.token, TokenKind::Refresh).unwrap().adm);
    }

    #[test]
    fn other_key_and_alg_none_are_rejected() {
        let k = keys();
        let other = JwtKeys::new(
            b"another-key-another-key-another-key",
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        let t = other
            .issue(TokenKind::Access, Uuid::new_v4(), false)
            .unwrap();
        assert_eq!(
            k.verify(&t.token, TokenKind::Access),
            Err(TokenError::Invalid)
        );

        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let valid = k.issue(TokenKind::Access, Uuid::new_v4(), false).unwrap();
        let payload = valid.token.split('.').nth(1).unwrap();
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            payload
        );
        assert_eq!(k.verify(&none, TokenKind::Access), Err(TokenError::Invalid));
    }

    #[test]
    fn hash_is_stable_hex() {
        assert_eq!(token_hash("abc").len(), 64);
        assert_eq!(token_hash("abc"), token_hash("abc"));
        assert_ne!(token_hash("abc"), token_hash("abd"));
    }
}
