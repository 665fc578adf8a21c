//! `GET /metrics`: the Prometheus text format (see `measure` for the series), at the root, not
//! rate limited; behind `METRICS_TOKEN` when it is set.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret as _;
use subtle::ConstantTimeEq as _;

use crate::error::ApiError;
use crate::http::extract::bearer_token;
use crate::state::AppState;

/// The metrics, for Prometheus.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(handle) = &state.metrics else {
        return ApiError::NotFound.into_response();
    };
    if let Some(expected) = &state.config.metrics.token {
        let given = bearer_token(&headers).unwrap_or_default();
        // Constant time: the comparison tells nothing of how much of a guess was right.
        let right: bool = given
            .as_bytes()
            .ct_eq(expected.expose_secret().as_bytes())
            .into();
        if !right {
            return ApiError::unauthorized("/metrics needs its token", "invalid_token")
                .into_response();
        }
    }
    crate::measure::set_backend(state.limiter.backend() == crate::ratelimit::Backend::Redis);
    handle.run_upkeep();
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        handle.render(),
    )
        .into_response()
}
