//! The mock's embeddings: small deterministic vectors (the same input always embeds the same
//! way), as floats or, with `encoding_format: base64`, as OpenAI sends them to the SDKs.

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::{MOCK_EMBEDDING_MODEL, error, request_of};

/// Numbers in each of the mock's embeddings.
const EMBEDDING_DIMENSIONS: usize = 8;

/// A small vector that depends only on `text` (a hash spread over `EMBEDDING_DIMENSIONS`
/// numbers in [-1, 1]): the same input always embeds the same way.
fn embed(text: &str) -> Vec<f64> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        state = (state ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..EMBEDDING_DIMENSIONS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            #[allow(clippy::cast_precision_loss)] // a mock's numbers
            let unit = (state % 2001) as f64 / 1000.0 - 1.0;
            unit
        })
        .collect()
}

/// `POST /v1/embeddings`.
pub(super) async fn create_embeddings(headers: HeaderMap, body: Bytes) -> Response {
    let request = match request_of(&headers, &body) {
        Ok(request) => request,
        Err(refused) => return *refused,
    };
    let inputs: Vec<String> = match &request["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input is required",
                "invalid_request_error",
                "missing_input",
            );
        }
    };
    let tokens: usize = inputs.iter().map(|i| i.split_whitespace().count()).sum();
    // As OpenAI does: floats, or with `encoding_format: base64` their little-endian f32 bytes
    // in base64 (what the SDKs ask for by default).
    let base64 = request["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embed(text);
            let embedding = if base64 {
                #[allow(clippy::cast_possible_truncation)] // f32 is the wire format
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|x| (*x as f32).to_le_bytes())
                    .collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": request["model"].as_str().unwrap_or(MOCK_EMBEDDING_MODEL),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    }))
    .into_response()
}
