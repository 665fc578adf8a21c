//! `/models` and `/chat/models`: the models clients may use.

use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthUser;
use crate::error::{ApiError, ErrorEnvelope};
use crate::relay::Model;
use crate::state::AppState;

/// `GET /models` answer.
#[derive(Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The models clients may use.
    pub data: Vec<Model>,
}

async fn allowed_models(state: &AppState) -> Result<Json<ModelList>, ApiError> {
    Ok(Json(ModelList {
        object: "list",
        data: state.upstream.allowed_models().await?,
    }))
}

/// The models clients may use: the upstream's list (cached), filtered by `ALLOWED_MODELS`.
#[utoipa::path(
    get, path = "/api/v1/chat/models", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    responses((status = 200, description = "Models", body = ModelList))
)]
pub async fn list_chat_models(
    State(state): State<AppState>,
    _user: AuthUser,
) -> Result<Json<ModelList>, ApiError> {
    allowed_models(&state).await
}

/// Same as `/chat/models`, at the path the official SDKs use.
#[utoipa::path(
    get, path = "/api/v1/models", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    responses((status = 200, description = "Models", body = ModelList))
)]
pub async fn list_models(
    State(state): State<AppState>,
    _user: AuthUser,
) -> Result<Json<ModelList>, ApiError> {
    allowed_models(&state).await
}

/// One model the server offers, by id.
#[utoipa::path(
    get, path = "/api/v1/models/{model}", tag = "chat",
    security(("bearer" = []), ("oauth2" = [])),
    params(("model" = String, Path, description = "Model id")),
    responses(
        (status = 200, description = "The model", body = Model),
        (status = 404, description = "Not a model clients may use", body = ErrorEnvelope),
    )
)]
pub async fn get_model(
    State(state): State<AppState>,
    _user: AuthUser,
    Path(model): Path<String>,
) -> Result<Json<Model>, ApiError> {
    state
        .upstream
        .allowed_models()
        .await?
        .into_iter()
        .find(|m| m.id == model)
        .map(Json)
        .ok_or_else(|| ApiError::ModelNotFound(model))
}
