//! Models: which ones clients may use (`DEFAULT_MODEL`, `ALLOWED_MODELS`, one check for chat
//! and for the list) and the upstream's model list, cached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::UpstreamConfig;
use crate::error::ApiError;

/// How long the upstream's model list is cached.
pub const MODELS_TTL: Duration = Duration::from_secs(300);

/// One entry of `GET /models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Model {
    /// Model id, e.g. `gpt-4o-mini`.
    pub id: String,
    /// Always `model`.
    #[serde(default = "model_object")]
    pub object: String,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created: i64,
    /// Owner.
    #[serde(default = "unknown_owner")]
    pub owned_by: String,
}

fn model_object() -> String {
    "model".to_owned()
}

fn unknown_owner() -> String {
    "unknown".to_owned()
}

/// The upstream's `GET /models` answer, as far as relay reads it.
#[derive(Deserialize)]
pub(super) struct UpstreamModelList {
    pub(super) data: Vec<Model>,
}

/// Which models clients may ask for.
#[derive(Debug, Clone)]
pub struct ModelPolicy {
    default_model: String,
    allowed: Option<Vec<String>>,
}

impl ModelPolicy {
    /// The policy of `DEFAULT_MODEL` and `ALLOWED_MODELS`.
    pub fn new(config: &UpstreamConfig) -> Self {
        ModelPolicy {
            default_model: config.default_model.clone(),
            allowed: config.allowed_models.clone(),
        }
    }

    /// The model used when a request names none.
    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    /// Whether clients may use `model` (every model when `ALLOWED_MODELS` is unset).
    pub fn allows(&self, model: &str) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == model))
    }

    /// `Ok` when `model` is allowed, else the 403 the client gets.
    pub fn check(&self, model: &str) -> Result<(), ApiError> {
        if self.allows(model) {
            Ok(())
        } else {
            Err(ApiError::Forbidden {
                message: format!("the model {model:?} is not allowed on this server"),
                code: "model_not_allowed",
            })
        }
    }
}

/// The upstream's model list, kept for [`MODELS_TTL`].
#[derive(Debug, Default)]
pub(super) struct ModelCache {
    slot: RwLock<Option<(Instant, Arc<Vec<Model>>)>>,
}

impl ModelCache {
    /// The cached list, if it is fresh.
    pub(super) async fn fresh(&self) -> Option<Arc<Vec<Model>>> {
        match self.slot.read().await.as_ref() {
            Some((at, models)) if at.elapsed() < MODELS_TTL => Some(models.clone()),
            _ => None,
        }
    }

    /// Replaces the list.
    pub(super) async fn store(&self, models: Arc<Vec<Model>>) {
        *self.slot.write().await = Some((Instant::now(), models));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_is_one_check() {
        let mut config = crate::config::Config::from_vars(
            &std::collections::HashMap::new(),
            crate::config::Mode::Dev,
        )
        .unwrap()
        .upstream;
        assert!(ModelPolicy::new(&config).allows("anything"));
        config.allowed_models = Some(vec!["a".into(), "b".into()]);
        let policy = ModelPolicy::new(&config);
        assert!(policy.allows("b") && policy.check("b").is_ok());
        assert!(!policy.allows("c"));
        assert!(matches!(policy.check("c"), Err(ApiError::Forbidden { .. })));
    }
}
