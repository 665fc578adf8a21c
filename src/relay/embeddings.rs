//! Embeddings: check what relay relies on (`model` a non-empty string the server allows,
//! `input` present), forward the client's bytes unchanged, and read the usage from the answer.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::Upstream;
use super::body::{self, Scalar};
use super::client::Api;
use crate::context::{RequestContext, Usage};
use crate::error::ApiError;

/// The fields relay reads; every other one (`dimensions`, `encoding_format`, `user`, …) is
/// forwarded as it came.
const FIELDS: &[&str] = &["model", "input"];

/// An embeddings answer's usage, as far as relay reads it (the vectors are stepped over,
/// never built: see `relay::scan`).
#[derive(Deserialize)]
struct EmbeddingsUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
}

/// Checks `body`, sends it upstream, and returns the upstream's JSON answer as it came.
pub async fn create(
    upstream: &Upstream,
    body: Bytes,
    ctx: Arc<RequestContext>,
) -> Result<Bytes, ApiError> {
    let fields = body::fields(&body, FIELDS)?;
    let model = match fields.scalar("model") {
        Scalar::Str(model) if !model.trim().is_empty() => model.into_owned(),
        Scalar::Absent | Scalar::Null => {
            return Err(ApiError::validation("model", "model is required"));
        }
        _ => {
            return Err(ApiError::validation(
                "model",
                "model must be a non-empty string",
            ));
        }
    };
    match fields.scalar("input") {
        Scalar::Absent | Scalar::Null => {
            return Err(ApiError::validation("input", "input is required"));
        }
        Scalar::Str(_) | Scalar::Other => {}
        _ => {
            return Err(ApiError::validation(
                "input",
                "input must be a string or an array",
            ));
        }
    }
    upstream.policy().check(&model)?;
    let response = upstream
        .post_for(&ctx, Api::Embeddings, &model, body, false)
        .await?;
    let answer = upstream.read_completion(response).await?;
    let usage = match super::scan::members(&answer, ["data", "usage"]) {
        Some([Some(_), usage]) => match usage {
            None => Some(None),
            Some(usage) => serde_json::from_slice::<Option<EmbeddingsUsage>>(usage).ok(),
        },
        _ => None,
    };
    let Some(usage) = usage else {
        tracing::warn!(model = %model, "upstream answer is not an embeddings list");
        return Err(ApiError::BadGateway(
            "the upstream's answer is not in the OpenAI format".into(),
        ));
    };
    if let Some(prompt_tokens) = usage.and_then(|u| u.prompt_tokens) {
        ctx.set_usage(Usage {
            prompt_tokens,
            completion_tokens: 0,
        });
    }
    Ok(answer)
}
