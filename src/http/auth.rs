//! `/auth/*`: register, login (JSON or OAuth2 form), me, refresh with rotation, logout.

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::response::Response;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::auth::extractor::token_rejection;
use crate::auth::jwt::{TokenKind, token_hash};
use crate::auth::password::Verdict;
use crate::config::Endpoint;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{ApiJson, BodyKind, body_kind, parse_form, parse_json, read_body};
use crate::http::ratelimit::{
    ClientIp, Limited, LoginLimit, RefreshLimit, RegisterLimit, most_restrictive, rejection,
};
use crate::ratelimit::Subject;
use crate::state::AppState;
use crate::store::{NewRefreshToken, Spend};
use crate::users::{self, Registration, User};

/// `POST /auth/register` body.
#[derive(Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// A valid email address; stored lower-cased.
    #[schema(example = "ann@example.com")]
    pub email: String,
    /// 8 to 128 characters.
    #[schema(example = "correct horse battery")]
    pub password: String,
    /// Optional display name.
    pub full_name: Option<String>,
}

/// `POST /auth/login` body (JSON form; the OAuth2 form uses `username` for the email).
#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    /// The email registered with.
    #[schema(example = "ann@example.com")]
    pub email: String,
    /// The password.
    pub password: String,
}

#[derive(Deserialize)]
struct OAuth2Form {
    username: String,
    password: String,
}

/// Login credentials from a JSON body or an OAuth2 password-flow form.
pub struct Credentials(LoginRequest);

impl<S: Send + Sync> FromRequest<S> for Credentials {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let kind = body_kind(req.headers());
        let bytes = read_body(req).await?;
        match kind {
            BodyKind::Json => parse_json(&bytes).map(Credentials),
            BodyKind::Form => {
                let form: OAuth2Form = parse_form(&bytes)?;
                Ok(Credentials(LoginRequest {
                    email: form.username,
                    password: form.password,
                }))
            }
            BodyKind::Other => Err(ApiError::UnsupportedMediaType(
                "expected application/json or application/x-www-form-urlencoded".into(),
            )),
        }
    }
}

/// `POST /auth/refresh` and `POST /auth/logout` body.
#[derive(Deserialize, ToSchema)]
pub struct RefreshRequest {
    /// A refresh token from login or a previous refresh.
    pub refresh_token: String,
}

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

fn invalid_credentials() -> ApiError {
    ApiError::Unauthorized {
        message: "incorrect email or password",
        code: "invalid_credentials",
    }
}

fn inactive() -> ApiError {
    ApiError::Forbidden {
        message: "this account is disabled".into(),
        code: "user_inactive",
    }
}

/// Signs a new pair and records the refresh token in `family_id`.
async fn issue_pair(
    state: &AppState,
    user_id: Uuid,
    is_admin: bool,
    family_id: Uuid,
) -> Result<TokenPair, ApiError> {
    let access = state
        .jwt
        .issue(TokenKind::Access, user_id, is_admin)
        .map_err(ApiError::internal)?;
    let refresh = state
        .jwt
        .issue(TokenKind::Refresh, user_id, false)
        .map_err(ApiError::internal)?;
    state
        .store
        .insert_refresh_token(NewRefreshToken {
            id: refresh.jti,
            user_id,
            family_id,
            token_hash: token_hash(&refresh.token),
            expires_at: refresh.expires_at,
        })
        .await?;
    Ok(TokenPair {
        access_token: access.token,
        refresh_token: refresh.token,
        token_type: "bearer".to_owned(),
        expires_in: state.jwt.access_ttl().as_secs(),
    })
}

/// Create an account.
#[utoipa::path(
    post, path = "/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Created", body = User),
        (status = 409, description = "Email already registered", body = ErrorEnvelope),
        (status = 422, description = "Invalid email or password", body = ErrorEnvelope),
    )
)]
pub async fn register_user(
    State(state): State<AppState>,
    limit: Limited<RegisterLimit>,
    req: Request,
) -> Response {
    // The body is read after the limit, so that its errors carry the rate-limit headers too.
    let result = match ApiJson::<RegisterRequest>::from_request(req, &()).await {
        Ok(ApiJson(body)) => register(state, body).await,
        Err(e) => Err(e),
    };
    limit.wrap(result)
}

async fn register(
    state: AppState,
    body: RegisterRequest,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let user = users::create_user(
        &state.store,
        &state.passwords,
        Registration {
            email: body.email,
            password: body.password,
            full_name: body.full_name,
            is_admin: false,
        },
    )
    .await?;
    tracing::info!(user_id = %user.id, "user registered");
    Ok((StatusCode::CREATED, Json(user)))
}

/// Log in with email and password (JSON), or `username`/`password` as an OAuth2 form.
#[utoipa::path(
    post, path = "/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Tokens", body = TokenPair),
        (status = 401, description = "Wrong email or password", body = ErrorEnvelope),
        (status = 403, description = "Account disabled", body = ErrorEnvelope),
    )
)]
pub async fn login_user(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    req: Request,
) -> Response {
    // Limited by client IP, then by the email tried, so that a password-guessing run is
    // stopped from many addresses too; both before any hashing. The email's bucket is only
    // charged for attempts the IP's bucket let through, so one refused address cannot keep a
    // victim's email locked.
    let by_ip = state.limiter.check(Endpoint::Login, &Subject::Ip(ip)).await;
    if !by_ip.allowed {
        return rejection(&by_ip);
    }
    let body = match Credentials::from_request(req, &()).await {
        Ok(Credentials(body)) => body,
        Err(e) => return Limited::<LoginLimit>::new(by_ip).wrap(Err::<(), _>(e)),
    };
    let email = Subject::Email(body.email.trim().to_lowercase());
    let by_email = state.limiter.check(Endpoint::Login, &email).await;
    let decision = most_restrictive(&[by_ip, by_email]).unwrap_or(by_email);
    if !decision.allowed {
        return rejection(&decision);
    }
    Limited::<LoginLimit>::new(decision).wrap(login(state, body).await)
}

async fn login(state: AppState, body: LoginRequest) -> Result<Json<TokenPair>, ApiError> {
    // An address that cannot be valid cannot be registered either; it still costs one hash,
    // so that the answer's timing says nothing.
    let email = users::normalize_email(&body.email).ok();
    let user = match &email {
        Some(email) => state.store.user_by_email(email).await?,
        None => None,
    };
    let verdict = state
        .passwords
        .verify(
            body.password.clone(),
            user.as_ref().map(|u| u.password_hash.clone()),
        )
        .await
        .map_err(ApiError::internal)?;
    let user = match (user, verdict) {
        (Some(user), Verdict::Match | Verdict::MatchNeedsRehash) => {
            if verdict == Verdict::MatchNeedsRehash {
                rehash(&state, user.id, body.password).await;
            }
            user
        }
        _ => return Err(invalid_credentials()),
    };
    if !user.is_active {
        return Err(inactive());
    }
    let pair = issue_pair(&state, user.id, user.is_admin, Uuid::new_v4()).await?;
    Ok(Json(pair))
}

/// Upgrades an old hash (bcrypt, or weaker argon2) to current argon2id. Best effort: the
/// login succeeds even if this fails, and it is tried again at the next login.
async fn rehash(state: &AppState, user_id: Uuid, password: String) {
    match state.passwords.hash(password).await {
        Ok(hash) => match state.store.set_password_hash(user_id, &hash).await {
            Ok(()) => tracing::info!(user_id = %user_id, "password rehashed to argon2id"),
            Err(e) => tracing::warn!(user_id = %user_id, error = %e, "could not store rehash"),
        },
        Err(e) => tracing::warn!(user_id = %user_id, error = %e, "could not rehash"),
    }
}

/// The authenticated user.
#[utoipa::path(
    get, path = "/auth/me", tag = "auth",
    security(("bearer" = []), ("oauth2" = [])),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
    )
)]
pub async fn get_me(State(state): State<AppState>, auth: AuthUser) -> Result<Json<User>, ApiError> {
    let user = state
        .store
        .user_by_id(auth.id)
        .await?
        .ok_or(ApiError::Unauthorized {
            message: "the token's user no longer exists",
            code: "invalid_token",
        })?;
    if !user.is_active {
        return Err(inactive());
    }
    Ok(Json(user.into()))
}

/// Exchange a refresh token for a new pair. The old one is spent; presenting it again revokes
/// every token of its family.
#[utoipa::path(
    post, path = "/auth/refresh", tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens", body = TokenPair),
        (status = 401, description = "Invalid, expired, spent or revoked refresh token", body = ErrorEnvelope),
    )
)]
pub async fn refresh_token(
    State(state): State<AppState>,
    limit: Limited<RefreshLimit>,
    req: Request,
) -> Response {
    let result = match ApiJson::<RefreshRequest>::from_request(req, &()).await {
        Ok(ApiJson(body)) => refresh(state, body).await,
        Err(e) => Err(e),
    };
    limit.wrap(result)
}

async fn refresh(state: AppState, body: RefreshRequest) -> Result<Json<TokenPair>, ApiError> {
    let claims = state
        .jwt
        .verify(&body.refresh_token, TokenKind::Refresh)
        .map_err(token_rejection)?;
    match state
        .store
        .spend_refresh_token(&token_hash(&body.refresh_token))
        .await?
    {
        Spend::Spent { user_id, family_id } if user_id == claims.sub => {
            let user = state
                .store
                .user_by_id(user_id)
                .await?
                .ok_or(ApiError::Unauthorized {
                    message: "the token's user no longer exists",
                    code: "invalid_token",
                })?;
            if !user.is_active {
                state.store.revoke_family(family_id).await?;
                return Err(inactive());
            }
            Ok(Json(
                issue_pair(&state, user.id, user.is_admin, family_id).await?,
            ))
        }
        Spend::Reused { user_id } => {
            tracing::warn!(user_id = %user_id, "refresh token reused; its family is revoked");
            Err(ApiError::Unauthorized {
                message: "refresh token already used; the session has been revoked",
                code: "token_reused",
            })
        }
        Spend::Spent { .. } | Spend::Revoked | Spend::Unknown => Err(ApiError::Unauthorized {
            message: "invalid token",
            code: "invalid_token",
        }),
    }
}

/// Revoke a refresh token (and the session it belongs to).
#[utoipa::path(
    post, path = "/auth/logout", tag = "auth",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = RefreshRequest,
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
    )
)]
pub async fn logout_user(
    State(state): State<AppState>,
    auth: AuthUser,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    // The signature is checked so that garbage never reaches the database; expiry is not, so
    // that an expired session can still be closed cleanly.
    match state.jwt.verify(&body.refresh_token, TokenKind::Refresh) {
        Ok(_) | Err(crate::auth::jwt::TokenError::Expired) => {}
        Err(e) => return Err(token_rejection(e)),
    }
    let family = state
        .store
        .refresh_token_family(&token_hash(&body.refresh_token), auth.id)
        .await?
        .ok_or(ApiError::Unauthorized {
            message: "invalid token",
            code: "invalid_token",
        })?;
    state.store.revoke_family(family).await?;
    Ok(StatusCode::NO_CONTENT)
}
