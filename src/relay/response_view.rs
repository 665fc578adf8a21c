//! The Responses API's objects, as far as relay reads them: a response's id, the ids of its
//! output items (both recorded as the caller's, see `relay::responses`), and its usage.
//!
//! Each is read on its own and leniently, so that a field relay cannot read (a `null` count,
//! an item without an id, a shape from a newer API version) costs only that field, never the
//! answer. Nothing else in the object is built: the rest is skipped.

use serde::Deserialize;

use crate::context::Usage;

/// The most ids one response may give its caller (its own and its output items').
pub const MAX_OWNED_IDS: usize = 1024;

#[derive(Deserialize)]
struct Id {
    id: String,
}

#[derive(Deserialize)]
struct UsageOf {
    #[serde(default)]
    usage: Option<ResponseUsage>,
}

#[derive(Deserialize)]
struct OutputOf {
    #[serde(default)]
    output: Vec<ItemId>,
}

#[derive(Deserialize)]
struct ItemId {
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
struct Wrapped<T> {
    response: T,
}

#[derive(Deserialize)]
struct ItemOf {
    item: Id,
}

/// The Responses API's usage object.
#[derive(Debug, Clone, Copy, Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

impl From<ResponseUsage> for Usage {
    fn from(usage: ResponseUsage) -> Self {
        Usage {
            prompt_tokens: usage.input_tokens.unwrap_or(0),
            completion_tokens: usage.output_tokens.unwrap_or(0),
        }
    }
}

/// A response object (the JSON answer, or the `response` of an event).
pub struct ResponseView {
    /// The id the upstream stores it under.
    pub id: String,
    /// The ids of its output items.
    pub item_ids: Vec<String>,
    /// Its token counts, once complete.
    pub usage: Option<Usage>,
}

impl ResponseView {
    /// Reads a response object; `None` when it has no string `id`.
    pub fn read(json: &[u8]) -> Option<ResponseView> {
        Self::from_parts(
            serde_json::from_slice::<Id>(json).ok()?.id,
            serde_json::from_slice::<OutputOf>(json).ok(),
            serde_json::from_slice::<UsageOf>(json).ok(),
        )
    }

    /// Reads the `response` of an event (`response.created`, `response.completed`, …).
    pub fn read_event(json: &[u8]) -> Option<ResponseView> {
        Self::from_parts(
            serde_json::from_slice::<Wrapped<Id>>(json)
                .ok()?
                .response
                .id,
            serde_json::from_slice::<Wrapped<OutputOf>>(json)
                .ok()
                .map(|w| w.response),
            serde_json::from_slice::<Wrapped<UsageOf>>(json)
                .ok()
                .map(|w| w.response),
        )
    }

    fn from_parts(
        id: String,
        output: Option<OutputOf>,
        usage: Option<UsageOf>,
    ) -> Option<ResponseView> {
        let item_ids = output
            .map(|o| o.output.into_iter().filter_map(|item| item.id).collect())
            .unwrap_or_default();
        Some(ResponseView {
            id,
            item_ids,
            // A usage object without counts is no usage: unknown, not zero.
            usage: usage
                .and_then(|u| u.usage)
                .filter(|u| u.input_tokens.is_some() || u.output_tokens.is_some())
                .map(Usage::from),
        })
    }

    /// Every id the response gives its caller: its own, then its items'.
    pub fn owned_ids(self) -> Vec<String> {
        let mut ids = Vec::with_capacity(1 + self.item_ids.len());
        ids.push(self.id);
        ids.extend(self.item_ids);
        ids.truncate(MAX_OWNED_IDS);
        ids
    }
}

/// The id of the `item` of an output-item event (`response.output_item.added` / `.done`).
pub fn item_id_of_event(json: &[u8]) -> Option<String> {
    serde_json::from_slice::<ItemOf>(json)
        .ok()
        .map(|e| e.item.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_usage_are_read_leniently() {
        let view = ResponseView::read(
            br#"{"id":"resp_1","output":[{"type":"message","id":"msg_1"},{"type":"x"},{"id":"rs_2"}],"usage":{"input_tokens":3,"output_tokens":null}}"#,
        )
        .unwrap();
        assert_eq!(
            view.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 0
            })
        );
        assert_eq!(view.owned_ids(), ["resp_1", "msg_1", "rs_2"]);
        // A broken usage or output costs only itself.
        let view =
            ResponseView::read(br#"{"id":"resp_1","output":"?","usage":{"input_tokens":"3"}}"#)
                .unwrap();
        assert_eq!(view.usage, None);
        assert_eq!(view.owned_ids(), ["resp_1"]);
        assert!(ResponseView::read(br#"{"output":[]}"#).is_none());
        let event = ResponseView::read_event(
            br#"{"type":"response.completed","response":{"id":"resp_9","usage":{"input_tokens":1,"output_tokens":2}}}"#,
        )
        .unwrap();
        assert_eq!(event.id, "resp_9");
        assert_eq!(
            item_id_of_event(br#"{"type":"response.output_item.added","item":{"id":"fc_1","type":"function_call"}}"#)
                .as_deref(),
            Some("fc_1")
        );
    }
}
