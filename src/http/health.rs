//! `/health` (liveness, touches nothing) and `/health/detailed` (checks each dependency).

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// How long a dependency check may take before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health` answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
    /// relay's version.
    pub version: &'static str,
}

/// One dependency's state.
#[derive(Serialize, ToSchema)]
pub struct Check {
    /// `ok`, `down` or `not_configured`.
    pub status: &'static str,
    /// Round-trip time of the check, when it ran.
    pub latency_ms: Option<f64>,
}

impl Check {
    fn not_configured() -> Self {
        Check {
            status: "not_configured",
            latency_ms: None,
        }
    }
}

/// The dependency checks.
#[derive(Serialize, ToSchema)]
pub struct Checks {
    /// SQLite or PostgreSQL.
    pub database: Check,
    /// The shared rate-limit store.
    pub redis: Check,
    /// The OpenAI-compatible upstream.
    pub upstream: Check,
}

/// `GET /health/detailed` answer.
#[derive(Serialize, ToSchema)]
pub struct DetailedHealth {
    /// `ok` when every configured check is ok, `down` when the database is, else `degraded`.
    pub status: &'static str,
    /// relay's version.
    pub version: &'static str,
    /// Seconds since start-up.
    pub uptime_seconds: u64,
    /// Each dependency.
    pub checks: Checks,
    /// Which rate-limit backend is live: `redis` or `memory`.
    pub rate_limiter: &'static str,
    /// `sqlite` or `postgres`.
    pub database_engine: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/api/v1/health", tag = "health",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn get_health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

async fn timed<F, E>(check: F) -> Check
where
    F: std::future::Future<Output = Result<(), E>>,
{
    let start = Instant::now();
    let ok = matches!(tokio::time::timeout(CHECK_TIMEOUT, check).await, Ok(Ok(())));
    Check {
        status: if ok { "ok" } else { "down" },
        latency_ms: Some((start.elapsed().as_secs_f64() * 1e6).round() / 1e3),
    }
}

/// Readiness: every dependency checked, in parallel.
#[utoipa::path(get, path = "/api/v1/health/detailed", tag = "health",
    responses(
        (status = 200, description = "Ok or degraded", body = DetailedHealth),
        (status = 503, description = "The database is down", body = DetailedHealth),
    ))]
pub async fn get_health_detailed(State(state): State<AppState>) -> Response {
    let redis = async {
        if state.limiter.redis_configured() {
            timed(state.limiter.ping_redis()).await
        } else {
            Check::not_configured()
        }
    };
    let (database, upstream, redis) = tokio::join!(
        timed(state.store.ping()),
        timed(state.upstream.check()),
        redis
    );
    let checks = Checks {
        database,
        redis,
        upstream,
    };
    let all = [&checks.database, &checks.redis, &checks.upstream];
    let status = if checks.database.status == "down" {
        "down"
    } else if all.iter().all(|c| c.status != "down") {
        "ok"
    } else {
        "degraded"
    };
    let code = if status == "down" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = DetailedHealth {
        status,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started_at.elapsed().as_secs(),
        checks,
        rate_limiter: state.limiter.backend().as_str(),
        database_engine: state.store.engine(),
    };
    (code, Json(body)).into_response()
}
