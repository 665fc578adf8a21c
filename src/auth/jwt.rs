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

/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECONDS: u64 = 5;

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
    cache: VerifiedCache,
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
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl,
            refresh_ttl,
            cache: VerifiedCache::new(),
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

    /// Verifies an access token, remembering it so that the next request with the same token
    /// costs a hash lookup (see `VerifiedCache`). Same checks and errors as [`Self::verify`].
    pub fn verify_access(&self, token: &str) -> Result<Access, TokenError> {
        if let Some(access) = self.cache.get(token) {
            if Utc::now().timestamp() > access.exp + LEEWAY_SECONDS as i64 {
                return Err(TokenError::Expired);
            }
            return Ok(access);
        }
        let claims = self.verify(token, TokenKind::Access)?;
        let access = Access {
            user_id: claims.sub,
            is_admin: claims.adm,
            exp: claims.exp,
            iat: claims.iat,
        };
        self.cache.insert(token, access);
        Ok(access)
    }
}

/// What an access token grants, once verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The user's id.
    pub user_id: Uuid,
    /// Admin flag.
    pub is_admin: bool,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issue time, seconds since the epoch (a revocation refuses tokens issued until then).
    pub iat: i64,
}

/// Shards of the verified-token cache; a power of two.
const CACHE_SHARDS: usize = 16;
/// Entries per shard before the shard is emptied (so at most 16 × 4096 tokens are held).
const CACHE_SHARD_CAPACITY: usize = 4096;

/// Access tokens already verified, so that a client's every request does not pay for base64,
/// two JSON parses and an HMAC again. Keyed by a per-process random hash of the token; a hit
/// must match the whole token, compared in constant time (a timing difference would otherwise
/// let a caller guess another user's cached token byte by byte), and its expiry is checked
/// again on every hit. Memory is bounded: a full shard is simply emptied. The hash is foldhash,
/// seeded per process: SipHash of a ~290-byte token was 1 % of a request, and a collision, even
/// a contrived one, only costs a verification (the whole token is compared).
type Shard = std::collections::HashMap<u64, (Box<str>, Access), foldhash::fast::RandomState>;

struct VerifiedCache {
    hasher: foldhash::fast::RandomState,
    shards: [std::sync::Mutex<Shard>; CACHE_SHARDS],
}

impl VerifiedCache {
    fn new() -> Self {
        VerifiedCache {
            hasher: foldhash::fast::RandomState::default(),
            shards: std::array::from_fn(|_| std::sync::Mutex::new(Shard::default())),
        }
    }

    fn slot(&self, token: &str) -> (u64, usize) {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(token);
        (hash, (hash as usize) & (CACHE_SHARDS - 1))
    }

    fn get(&self, token: &str) -> Option<Access> {
        let (hash, shard) = self.slot(token);
        let map = self.shards[shard].lock().ok()?;
        let (cached, access) = map.get(&hash)?;
        same_bytes(cached.as_bytes(), token.as_bytes()).then_some(*access)
    }

    fn insert(&self, token: &str, access: Access) {
        let (hash, shard) = self.slot(token);
        if let Ok(mut map) = self.shards[shard].lock() {
            if map.len() >= CACHE_SHARD_CAPACITY {
                map.clear();
            }
            map.insert(hash, (token.into(), access));
        }
    }
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only: eight bytes
/// are compared at a time, their differences ORed together and looked at once, at the end.
/// (`subtle`'s slice comparison puts an optimisation barrier after every byte: about 290 for a
/// token, on every request.)
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let mut diff = 0u64;
    for (x, y) in a_words.iter().zip(b_words) {
        diff |= u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y);
    }
    for (x, y) in a_rest.iter().zip(b_rest) {
        diff |= u64::from(x ^ y);
    }
    bool::from(diff.ct_eq(&0))
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
    fn same_bytes_compares_every_byte() {
        let token = b"eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-0123456789";
        assert!(same_bytes(token, token));
        assert!(same_bytes(b"", b""));
        assert!(!same_bytes(token, &token[..token.len() - 1]));
        for at in 0..token.len() {
            let mut other = token.to_vec();
            other[at] ^= 1;
            assert!(!same_bytes(token, &other), "a difference at byte {at}");
        }
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
    fn cached_access_tokens_keep_every_check() {
        let k = keys();
        let user = Uuid::new_v4();
        let t = k.issue(TokenKind::Access, user, false).unwrap();
        assert_eq!(k.verify_access(&t.token).unwrap().user_id, user);
        // Now cached: still the same answer, and a one-byte change is still refused.
        assert_eq!(k.verify_access(&t.token).unwrap().user_id, user);
        let mut forged = t.token.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(k.verify_access(&forged), Err(TokenError::Invalid));
        // A refresh token never enters the access cache.
        let r = k.issue(TokenKind::Refresh, user, false).unwrap();
        assert_eq!(k.verify_access(&r.token), Err(TokenError::WrongKind));
        assert_eq!(k.verify_access(&r.token), Err(TokenError::WrongKind));
        // A cached token that has expired since is refused.
        k.cache.insert(
            "expired-token",
            Access {
                user_id: user,
                is_admin: false,
                exp: Utc::now().timestamp() - 60,
                iat: Utc::now().timestamp() - 120,
            },
        );
        assert_eq!(k.verify_access("expired-token"), Err(TokenError::Expired));
    }

    #[test]
    fn hash_is_stable_hex() {
        assert_eq!(token_hash("abc").len(), 64);
        assert_eq!(token_hash("abc"), token_hash("abc"));
        assert_ne!(token_hash("abc"), token_hash("abd"));
    }
}
