//! Sessions: login, refresh with rotation and reuse detection, logout, and the signed-in user.
//!
//! A session is a family of refresh tokens: login starts one, each refresh spends a token and
//! adds its successor, and presenting a spent token again revokes the whole family (a stolen
//! token dies together with its legitimate copy). Access tokens are never stored: they are
//! checked in memory and expire on their own.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::jwt::{JwtKeys, TokenError, TokenKind, token_hash};
use super::password::normalized;
use super::password::{Passwords, Verdict};
use super::users::{MAX_PASSWORD_BYTES, MAX_PASSWORD_CHARS, User, normalize_email};
use crate::error::ApiError;
use crate::store::{NewRefreshToken, Spend, Store, UserRecord};

/// The least time a failed login takes. Well above the slowest hash relay verifies (bcrypt at
/// passlib's cost 12, about 0.3 s on one core, more on a busy one), so that unknown emails,
/// argon2 and bcrypt accounts all answer a wrong password after the same time.
pub const FAILED_LOGIN_FLOOR: std::time::Duration = std::time::Duration::from_millis(750);

/// A new token pair.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenPair {
    /// Send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Exchange at `/auth/refresh`; single use.
    pub refresh_token: String,
    /// Always `bearer`.
    #[schema(example = "bearer")]
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

impl From<TokenError> for ApiError {
    /// The 401 a client sees for a token that failed verification.
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Expired => ApiError::unauthorized("token expired", "token_expired"),
            TokenError::Invalid => invalid_token(),
            TokenError::WrongKind => ApiError::unauthorized("wrong token type", "invalid_token"),
        }
    }
}

fn invalid_credentials() -> ApiError {
    ApiError::unauthorized("incorrect email or password", "invalid_credentials")
}

fn invalid_token() -> ApiError {
    ApiError::unauthorized("invalid token", "invalid_token")
}

fn user_gone() -> ApiError {
    ApiError::unauthorized("the token's user no longer exists", "invalid_token")
}

fn inactive() -> ApiError {
    ApiError::Forbidden {
        message: "this account is disabled".into(),
        code: "user_inactive",
    }
}

/// What sessions need: the keys, the store and the hasher (borrowed from the app's state).
#[derive(Clone, Copy)]
pub struct Sessions<'a> {
    /// Signs and verifies tokens.
    pub jwt: &'a JwtKeys,
    /// Users and refresh tokens.
    pub store: &'a Store,
    /// Password hashing on the blocking pool.
    pub passwords: &'a Passwords,
}

impl Sessions<'_> {
    /// Checks an email and password and starts a session. Unknown emails cost one hash too,
    /// so that the answer's timing says nothing; old hashes are upgraded on the way.
    pub async fn login(&self, email: &str, password: String) -> Result<TokenPair, ApiError> {
        if password.len() > MAX_PASSWORD_BYTES
            || normalized(&password).chars().count() > MAX_PASSWORD_CHARS
        {
            // No account has such a password: refused before any hashing.
            return Err(ApiError::validation(
                "password",
                format!("password must be at most {MAX_PASSWORD_CHARS} characters long"),
            ));
        }
        let started = tokio::time::Instant::now();
        let result = self.check_credentials(email, password).await;
        if let Err(ApiError::Unauthorized { .. }) = &result {
            // Every failed attempt takes as long, whatever the account's hash (a bcrypt hash
            // from the original takes several times an argon2 one): the time says nothing.
            tokio::time::sleep_until(started + FAILED_LOGIN_FLOOR).await;
        }
        let user = result?;
        if !user.is_active {
            return Err(inactive());
        }
        self.issue_pair(user.id, user.is_admin, Uuid::new_v4())
            .await
    }

    /// The account whose password this is, or a 401.
    async fn check_credentials(
        &self,
        email: &str,
        password: String,
    ) -> Result<UserRecord, ApiError> {
        // An address that cannot be valid cannot be registered either.
        let email = normalize_email(email).ok();
        let user = match &email {
            Some(email) => self.store.user_by_email(email).await?,
            None => None,
        };
        let verdict = self
            .passwords
            .verify(
                password.clone(),
                user.as_ref().map(|u| u.password_hash.clone()),
            )
            .await
            .map_err(ApiError::internal)?;
        match (user, verdict) {
            (Some(user), Verdict::Match | Verdict::MatchNeedsRehash) => {
                if verdict == Verdict::MatchNeedsRehash {
                    self.rehash(user.id, password).await;
                }
                Ok(user)
            }
            _ => Err(invalid_credentials()),
        }
    }

    /// Spends a refresh token and issues the next pair of its session. A token presented
    /// twice revokes its whole family.
    ///
    /// The new pair is signed first, and its refresh token is stored by the same transaction
    /// that spends the old one ([`Store::rotate_refresh_token`]). There is thus no moment when
    /// the old token is spent but its successor not yet stored: a revocation racing this
    /// refresh (a replay of the same token, a logout) either comes after it and revokes the
    /// successor too, or comes before it and nothing is stored. The pair is returned only if
    /// the successor was stored.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, ApiError> {
        let claims = self.jwt.verify(refresh_token, TokenKind::Refresh)?;
        let spent_hash = token_hash(refresh_token);
        let user = self.existing_user(claims.sub).await?;
        if !user.is_active {
            // A disabled account's session ends here.
            let family = self
                .store
                .refresh_token_family(&spent_hash, user.id)
                .await?
                .ok_or_else(invalid_token)?;
            self.store.revoke_family(family).await?;
            return Err(inactive());
        }
        let (pair, successor) = self.sign_pair(user.id, user.is_admin)?;
        let successor = crate::store::SuccessorToken {
            id: successor.jti,
            token_hash: token_hash(&successor.token),
            expires_at: successor.expires_at,
        };
        match self
            .store
            .rotate_refresh_token(&spent_hash, user.id, &successor)
            .await?
        {
            Spend::Spent { .. } => Ok(pair),
            Spend::Reused { family_id } => {
                tracing::warn!(
                    user_id = %user.id,
                    family_id = %family_id,
                    "refresh token reused; its family is revoked"
                );
                Err(ApiError::unauthorized(
                    "refresh token already used; the session has been revoked",
                    "token_reused",
                ))
            }
            Spend::Revoked | Spend::Unknown => Err(invalid_token()),
        }
    }

    /// Ends the session `refresh_token` belongs to, if `user_id` owns it.
    pub async fn logout(&self, user_id: Uuid, refresh_token: &str) -> Result<(), ApiError> {
        // The signature is checked so that garbage never reaches the database; expiry is not,
        // so that an expired session can still be closed cleanly.
        match self.jwt.verify(refresh_token, TokenKind::Refresh) {
            Ok(_) | Err(TokenError::Expired) => {}
            Err(e) => return Err(e.into()),
        }
        let family = self
            .store
            .refresh_token_family(&token_hash(refresh_token), user_id)
            .await?
            .ok_or_else(invalid_token)?;
        self.store.revoke_family(family).await?;
        Ok(())
    }

    /// The signed-in user, if they still exist and are active.
    pub async fn me(&self, user_id: Uuid) -> Result<User, ApiError> {
        let user = self.existing_user(user_id).await?;
        if !user.is_active {
            return Err(inactive());
        }
        Ok(user.into())
    }

    /// The token's user, or a 401 when it was deleted since the token was issued.
    async fn existing_user(&self, user_id: Uuid) -> Result<UserRecord, ApiError> {
        self.store.user_by_id(user_id).await?.ok_or_else(user_gone)
    }

    /// Signs a new pair and starts session `family_id` with its refresh token.
    async fn issue_pair(
        &self,
        user_id: Uuid,
        is_admin: bool,
        family_id: Uuid,
    ) -> Result<TokenPair, ApiError> {
        let (pair, refresh) = self.sign_pair(user_id, is_admin)?;
        self.store
            .insert_refresh_token(NewRefreshToken {
                id: refresh.jti,
                user_id,
                family_id,
                token_hash: token_hash(&refresh.token),
                expires_at: refresh.expires_at,
            })
            .await?;
        Ok(pair)
    }

    /// Signs an access and a refresh token, storing nothing: the pair for the client, and the
    /// refresh token again for the store.
    fn sign_pair(
        &self,
        user_id: Uuid,
        is_admin: bool,
    ) -> Result<(TokenPair, super::jwt::IssuedToken), ApiError> {
        let access = self
            .jwt
            .issue(TokenKind::Access, user_id, is_admin)
            .map_err(ApiError::internal)?;
        let refresh = self
            .jwt
            .issue(TokenKind::Refresh, user_id, false)
            .map_err(ApiError::internal)?;
        let pair = TokenPair {
            access_token: access.token,
            refresh_token: refresh.token.clone(),
            token_type: "bearer".to_owned(),
            expires_in: self.jwt.access_ttl().as_secs(),
        };
        Ok((pair, refresh))
    }

    /// Upgrades an old hash (bcrypt, or weaker argon2) to current argon2id. Best effort: the
    /// login succeeds even if this fails, and it is tried again at the next login.
    async fn rehash(&self, user_id: Uuid, password: String) {
        match self.passwords.hash(password).await {
            Ok(hash) => match self.store.set_password_hash(user_id, &hash).await {
                Ok(()) => tracing::info!(user_id = %user_id, "password rehashed to argon2id"),
                Err(e) => tracing::warn!(user_id = %user_id, error = %e, "could not store rehash"),
            },
            Err(e) => tracing::warn!(user_id = %user_id, error = %e, "could not rehash"),
        }
    }
}
