//! `/auth/*`: register, login (JSON or OAuth2 form), me, refresh with rotation, logout. Thin
//! handlers: the accounts and sessions themselves live in `auth::users` and `auth::session`.

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::response::{IntoResponse as _, Response};
use http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::TokenPair;
use crate::auth::users::{self, Registration, User};
use crate::config::Endpoint;
use crate::error::{ApiError, ErrorEnvelope};
use crate::http::extract::{
    ApiJson, BodyKind, SessionUser, body_kind, parse_form, parse_json, read_body,
};
use crate::http::ratelimit::{ClientIp, most_restrictive, rejection, set_headers};
use crate::ratelimit::Subject;
use crate::state::AppState;

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

/// Create an account.
#[utoipa::path(
    post, path = "/api/v1/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Created", body = User),
        (status = 403, description = "Registration closed, or the email's domain is not allowed", body = ErrorEnvelope),
        (status = 409, description = "Email already registered", body = ErrorEnvelope),
        (status = 422, description = "Invalid email or password", body = ErrorEnvelope),
    )
)]
pub async fn register_user(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<User>), ApiError> {
    let auth = &state.config.auth;
    if !auth.registration_open {
        return Err(ApiError::Forbidden {
            message: "registration is closed: ask an administrator for an account".into(),
            code: "registration_closed",
        });
    }
    if let Some(domains) = &auth.registration_domains {
        let domain = body
            .email
            .trim()
            .rsplit_once('@')
            .map(|(_, domain)| domain.to_lowercase());
        if !domain.is_some_and(|d| domains.contains(&d)) {
            return Err(ApiError::Forbidden {
                message: format!(
                    "registration is open to email addresses at {} only",
                    domains.join(", ")
                ),
                code: "email_domain_not_allowed",
            });
        }
    }
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
    post, path = "/api/v1/auth/login", tag = "auth",
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
    // charged for failed attempts the IP's bucket let through, so one refused address cannot
    // keep a victim's email locked.
    let by_ip = state.limiter.check(Endpoint::Login, &Subject::Ip(ip)).await;
    if !by_ip.allowed {
        return rejection(&by_ip);
    }
    let (decision, result) = match Credentials::from_request(req, &()).await {
        Err(e) => (by_ip, Err(e)),
        Ok(Credentials(body)) => {
            // The email's bucket counts failed attempts only: a token is taken before hashing
            // (atomically, so concurrent guesses cannot all slip through) and given back when
            // the password was right, so strangers cannot lock its owner out by logging in as
            // them. A client that hangs up mid-attempt keeps its attempt counted.
            let email = Subject::Email(body.email.trim().to_lowercase());
            let by_email = state.limiter.check(Endpoint::Login, &email).await;
            let decision = most_restrictive(&[by_ip, by_email]).unwrap_or(by_email);
            if !decision.allowed {
                return rejection(&decision);
            }
            let pair = state.sessions().login(&body.email, body.password).await;
            if !matches!(pair, Err(ApiError::Unauthorized { .. })) {
                state.limiter.refund(Endpoint::Login, &email).await;
            }
            (decision, pair.map(Json))
        }
    };
    let mut response = result.into_response();
    set_headers(&mut response, &decision);
    response
}

/// The authenticated user.
#[utoipa::path(
    get, path = "/api/v1/auth/me", tag = "auth",
    security(("bearer" = []), ("oauth2" = [])),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
        (status = 403, description = "An API key (account endpoints take an access token)", body = ErrorEnvelope),
    )
)]
pub async fn get_me(
    State(state): State<AppState>,
    SessionUser(auth): SessionUser,
) -> Result<Json<User>, ApiError> {
    state.sessions().me(auth.id).await.map(Json)
}

/// Exchange a refresh token for a new pair. The old one is spent; presenting it again revokes
/// every token of its family.
#[utoipa::path(
    post, path = "/api/v1/auth/refresh", tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens", body = TokenPair),
        (status = 401, description = "Invalid, expired, spent or revoked refresh token", body = ErrorEnvelope),
    )
)]
pub async fn refresh_token(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    state
        .sessions()
        .refresh(&body.refresh_token)
        .await
        .map(Json)
}

/// Revoke a refresh token (and the session it belongs to).
#[utoipa::path(
    post, path = "/api/v1/auth/logout", tag = "auth",
    security(("bearer" = []), ("oauth2" = [])),
    request_body = RefreshRequest,
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "Missing or invalid token", body = ErrorEnvelope),
    )
)]
pub async fn logout_user(
    State(state): State<AppState>,
    SessionUser(auth): SessionUser,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .sessions()
        .logout(auth.id, &body.refresh_token)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
