//! Metric series, named in one place, with bounded labels.
//!
//! Series are recorded through the `metrics` facade; `/metrics` installs the Prometheus
//! recorder. Without a recorder installed, recording a value costs a check and nothing else.
//! No label ever holds a user id, an email or a raw path; a model label is one of the first
//! [`MAX_MODELS`] models seen, else `other`, however many names clients send.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// Tokens used, by `model` and `kind` (`prompt` | `completion`); fed by the usage writer, the
/// one place where each request's usage (reported or estimated) is final.
pub const TOKENS_TOTAL: &str = "relay_tokens_total";
/// Usage records dropped (the queue was full, or the database refused them for too long).
pub const USAGE_RECORDS_DROPPED_TOTAL: &str = "relay_usage_records_dropped_total";

/// Distinct model labels kept; later models are counted as `other`.
pub const MAX_MODELS: usize = 100;

/// The models given labels so far (at most [`MAX_MODELS`]).
#[derive(Default)]
pub struct ModelLabels(Mutex<HashSet<String>>);

impl ModelLabels {
    /// The label for `model`: itself while fewer than [`MAX_MODELS`] distinct models have been
    /// labelled (or when it is one of them), else `other`.
    pub fn label(&self, model: &str) -> String {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < MAX_MODELS {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }
}

/// The process's model labels.
pub fn model_label(model: &str) -> String {
    static MODELS: OnceLock<ModelLabels> = OnceLock::new();
    MODELS.get_or_init(ModelLabels::default).label(model)
}

/// Counts one request's tokens in [`TOKENS_TOTAL`].
pub fn count_tokens(model: &str, prompt: u64, completion: u64) {
    if prompt == 0 && completion == 0 {
        return;
    }
    let model = model_label(model);
    metrics::counter!(TOKENS_TOTAL, "model" => model.clone(), "kind" => "prompt").increment(prompt);
    metrics::counter!(TOKENS_TOTAL, "model" => model, "kind" => "completion").increment(completion);
}

/// Counts `n` usage records dropped in [`USAGE_RECORDS_DROPPED_TOTAL`].
pub fn count_dropped_records(n: u64) {
    metrics::counter!(USAGE_RECORDS_DROPPED_TOTAL).increment(n);
}

#[cfg(test)]
mod tests {
    use metrics_util::CompositeKey;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// A counter: its name, its labels and its value.
    type Counter = (String, Vec<(String, String)>, u64);
    type Snapshot = Vec<(
        CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )>;

    fn counters(snapshot: Snapshot) -> Vec<Counter> {
        let mut out: Vec<_> = snapshot
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(n) => {
                    let (_, key) = key.into_parts();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    Some((key.name().to_owned(), labels, n))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn tokens_are_counted_by_model_and_kind() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            count_tokens("gpt-test-a", 12, 30);
            count_tokens("gpt-test-a", 1, 2);
            count_tokens("gpt-test-b", 0, 0);
        });
        let label = |model: &str, kind: &str| {
            vec![
                ("model".to_owned(), model.to_owned()),
                ("kind".to_owned(), kind.to_owned()),
            ]
        };
        assert_eq!(
            counters(snapshotter.snapshot().into_vec()),
            vec![
                (
                    TOKENS_TOTAL.to_owned(),
                    label("gpt-test-a", "completion"),
                    32
                ),
                (TOKENS_TOTAL.to_owned(), label("gpt-test-a", "prompt"), 13),
            ]
        );
    }

    #[test]
    fn model_labels_are_bounded() {
        let models = ModelLabels::default();
        let labels: HashSet<String> = (0..MAX_MODELS * 3)
            .map(|i| models.label(&format!("flood-{i}")))
            .collect();
        assert_eq!(
            models.label("flood-0"),
            "flood-0",
            "a model seen first keeps its label"
        );
        assert!(labels.len() <= MAX_MODELS + 1, "{}", labels.len());
        assert!(labels.contains("other"));
    }
}
