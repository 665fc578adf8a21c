//! One error type for every handler, turned into the OpenAI error envelope in one place.
//!
//! Internal causes are logged here (once, inside the request's span, which carries the request
//! id); the client only ever sees a plain message. There is deliberately no blanket `From` for
//! arbitrary errors: a client mistake must never turn into a 500 by accident.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::store::StoreError;

/// Everything a handler can answer with besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not valid JSON, or the request is otherwise malformed.
    #[error("{message}")]
    BadRequest {
        /// What is wrong, for the client.
        message: String,
        /// Machine-readable code.
        code: &'static str,
    },
    /// 401: no usable credentials.
    #[error("{message}")]
    Unauthorized {
        /// What is wrong, for the client.
        message: &'static str,
        /// Machine-readable code.
        code: &'static str,
    },
    /// 403: authenticated, but not allowed.
    #[error("{message}")]
    Forbidden {
        /// What is wrong, for the client.
        message: String,
        /// Machine-readable code.
        code: &'static str,
    },
    /// 404: unknown route or resource.
    #[error("not found")]
    NotFound,
    /// 404: no model with this id among those clients may use.
    #[error("the model {0:?} does not exist or is not offered on this server")]
    ModelNotFound(String),
    /// 404: no stored response or item with this id that belongs to the caller (whether it
    /// exists for someone else is not said). `param` names the request field it came from.
    #[error("no response or item with id {id:?} was found")]
    ResponseNotFound {
        /// The id asked for (cut to 128 characters; sent back as JSON, so escaped).
        id: String,
        /// The request field, e.g. `previous_response_id` or `input[2].id`.
        param: Option<String>,
    },
    /// 404: no route serves this path.
    #[error(
        "{0} is not a path relay serves; under /api/v1 it serves auth/register, auth/login, \
         auth/me, auth/refresh, auth/logout, auth/api-keys, admin/users, admin/usage, \
         chat/completions, chat/completions/stream, \
         chat/models, models, models/{{model}}, embeddings, responses, responses/{{id}} (with \
         /cancel and /input_items), usage, health and health/detailed"
    )]
    NoRoute(String),
    /// 408: the request body did not arrive within `REQUEST_BODY_TIMEOUT_SECONDS`. Sent with
    /// `Connection: close`: the rest of the body may still be on its way.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// 409: the resource exists already.
    #[error("{0}")]
    Conflict(String),
    /// 413: the body is larger than `MAX_REQUEST_BYTES`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415: wrong `Content-Type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed JSON that fails validation; `param` names the field.
    #[error("{message}")]
    Validation {
        /// What is wrong, for the client.
        message: String,
        /// The offending field.
        param: String,
    },
    /// 429: rate limited.
    #[error("rate limit exceeded")]
    RateLimited {
        /// Whole seconds until a request would be allowed (≥ 1).
        retry_after: u64,
    },
    /// 429: the request's worst case does not fit the user's token bucket.
    #[error("{message}")]
    TokenLimited {
        /// Whole seconds until it would fit (≥ 1).
        retry_after: u64,
        /// What the client is told.
        message: String,
    },
    /// An upstream error answer, passed through with its own status and (sanitised) body.
    #[error("upstream answered {status}")]
    Upstream {
        /// The upstream's status.
        status: StatusCode,
        /// The upstream's error body, already checked to be an OpenAI error envelope.
        body: Bytes,
        /// The upstream's `Retry-After`, if any.
        retry_after: Option<HeaderValue>,
    },
    /// 502: upstream unreachable, or its answer is not the OpenAI format.
    #[error("{0}")]
    BadGateway(String),
    /// 503: a dependency this request needs is down.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 504: the upstream gave no first byte in time.
    #[error("upstream timed out")]
    GatewayTimeout,
    /// 500: a bug or an unexpected failure. The cause is logged, never sent.
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

/// The internal cause of a 5xx, carried to the request middleware, which logs it with the
/// request id. Never sent to the client.
#[derive(Debug, Clone)]
pub struct ErrorDetail(pub String);

/// The OpenAI error envelope: `{"error": {...}}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    /// The error itself.
    pub error: ErrorBody,
}

/// The inside of the OpenAI error envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Human-readable description.
    pub message: String,
    /// OpenAI error type, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: Cow<'static, str>,
    /// Machine-readable code.
    pub code: Option<String>,
    /// The request field the error is about, if any.
    pub param: Option<String>,
}

impl ErrorEnvelope {
    /// An envelope of type `kind` (see [`error_type_for`]).
    pub fn new(
        kind: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
        code: Option<String>,
        param: Option<String>,
    ) -> Self {
        ErrorEnvelope {
            error: ErrorBody {
                message: message.into(),
                kind: kind.into(),
                code,
                param,
            },
        }
    }

    /// The envelope as JSON bytes.
    pub fn to_bytes(&self) -> Bytes {
        // Strings only: serialising cannot fail; the fallback is never reached.
        Bytes::from(serde_json::to_vec(self).unwrap_or_else(|_| b"{\"error\":{}}".to_vec()))
    }

    /// The envelope as one server-sent event (`data: {...}` and a blank line): how a stream
    /// that already started reports a failure.
    pub fn to_sse_event(&self) -> Bytes {
        let json = self.to_bytes();
        let mut event = Vec::with_capacity(json.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&json);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

impl ApiError {
    /// A 500 whose cause is logged but not shown.
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Self::Internal(err.into())
    }

    /// A 401 with this message and code.
    pub fn unauthorized(message: &'static str, code: &'static str) -> Self {
        Self::Unauthorized { message, code }
    }

    /// A 422 about `param`.
    pub fn validation(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Validation {
            message: message.into(),
            param: param.into(),
        }
    }

    /// The HTTP status this error is sent with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound
            | Self::NoRoute(_)
            | Self::ModelNotFound(_)
            | Self::ResponseNotFound { .. } => StatusCode::NOT_FOUND,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } | Self::TokenLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream { status, .. } => *status,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::ServiceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Forbidden { code, .. } => code,
            Self::NotFound | Self::NoRoute(_) | Self::ResponseNotFound { .. } => "not_found",
            Self::ModelNotFound(_) => "model_not_found",
            Self::RequestTimeout => "request_timeout",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge => "request_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Validation { .. } => "invalid_value",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::TokenLimited { .. } => "token_limit_exceeded",
            Self::Upstream { .. } => "upstream_error",
            Self::BadGateway(_) => "bad_gateway",
            Self::ServiceUnavailable(_) => "service_unavailable",
            Self::GatewayTimeout => "upstream_timeout",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The OpenAI error `type` that goes with a status.
pub fn error_type_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// A generic code for a status, used when a response is produced outside our handlers
/// (axum's 405, a body-limit 413, …).
pub fn error_code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "invalid_token",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "request_too_large",
        415 => "unsupported_media_type",
        422 => "invalid_value",
        429 => "rate_limit_exceeded",
        502 => "bad_gateway",
        503 => "service_unavailable",
        504 => "upstream_timeout",
        _ => "internal_error",
    }
}

/// Builds an envelope response with the right status and content type.
pub fn envelope_response(
    status: StatusCode,
    message: impl Into<String>,
    code: &str,
    param: Option<String>,
) -> Response {
    let body = ErrorEnvelope::new(
        error_type_for(status),
        message,
        Some(code.to_owned()),
        param,
    );
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl From<StoreError> for ApiError {
    /// A conflict the caller did not map to its own message is a plain 409; an unreachable
    /// database a 503 (logged here); anything else a 500.
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict => ApiError::Conflict("already exists".into()),
            StoreError::Unavailable(e) => {
                tracing::error!(error = %e, "database unavailable");
                ApiError::ServiceUnavailable("the database is unavailable, try again later".into())
            }
            StoreError::Other(e) => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self {
            Self::Internal(ref err) => {
                let mut response =
                    envelope_response(status, "internal server error", self.code(), None);
                // Logged by the request middleware, next to the request id.
                response
                    .extensions_mut()
                    .insert(ErrorDetail(format!("{err:#}")));
                response
            }
            Self::ServiceUnavailable(ref why) => {
                let mut response = envelope_response(status, why.clone(), self.code(), None);
                response.extensions_mut().insert(ErrorDetail(why.clone()));
                response
            }
            Self::ResponseNotFound { ref param, .. } => {
                envelope_response(status, self.to_string(), self.code(), param.clone())
            }
            Self::Validation { message, param } => {
                envelope_response(status, message, "invalid_value", Some(param))
            }
            Self::RateLimited { retry_after } => {
                let mut response = envelope_response(
                    status,
                    "rate limit exceeded, retry later",
                    "rate_limit_exceeded",
                    None,
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
                response
            }
            Self::TokenLimited {
                retry_after,
                ref message,
            } => {
                let mut response =
                    envelope_response(status, message.clone(), "token_limit_exceeded", None);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
                response
            }
            Self::RequestTimeout => {
                let mut response = envelope_response(status, self.to_string(), self.code(), None);
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            Self::Upstream {
                status,
                body,
                retry_after,
            } => {
                let mut response = (
                    status,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
                    .into_response();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    let value = retry_after.unwrap_or(HeaderValue::from_static("1"));
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                response
            }
            other => {
                let code = other.code();
                envelope_response(status, other.to_string(), code, None)
            }
        }
    }
}
