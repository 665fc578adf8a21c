//! What the client is told when the upstream fails: upstream error answers passed through with
//! their status but only the envelope's standard fields and every key-like string masked, and
//! transport failures mapped to 502 or 504. Nothing the upstream says reaches the client
//! unexamined, and relay's key never does.

use bytes::Bytes;
use http::StatusCode;
use http::header::RETRY_AFTER;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;

use crate::error::{ApiError, ErrorEnvelope, error_type_for};

/// Masks relay's upstream key, and anything shaped like an OpenAI key, in text.
#[derive(Clone, Default)]
pub struct KeyMask {
    key: Option<SecretString>,
}

impl KeyMask {
    /// A mask for `key` (and every `sk-…` string).
    pub fn new(key: Option<SecretString>) -> Self {
        KeyMask { key }
    }

    /// `text` with every secret replaced by `[redacted]`: relay's key and anything shaped like
    /// an OpenAI key (`sk-…`), in any letter case (an upstream may echo a key upper-cased).
    pub fn mask(&self, text: &str) -> String {
        // ASCII lower-casing keeps every byte offset, so spans found in `lower` cut `text`.
        let lower = text.to_ascii_lowercase();
        let bytes = lower.as_bytes();
        let mut cuts: Vec<(usize, usize)> = Vec::new();
        if let Some(key) = &self.key {
            let key = key.expose_secret().to_ascii_lowercase();
            if !key.is_empty() {
                cuts.extend(lower.match_indices(&key).map(|(at, k)| (at, at + k.len())));
            }
        }
        let mut from = 0;
        while let Some(found) = lower[from..].find("sk-") {
            let at = from + found;
            let end = lower[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*')))
                .map_or(lower.len(), |n| at + n);
            if at == 0 || !bytes[at - 1].is_ascii_alphanumeric() {
                cuts.push((at, end));
            }
            from = end;
        }
        if cuts.is_empty() {
            return text.to_owned();
        }
        cuts.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in cuts {
            if end <= at {
                continue;
            }
            out.push_str(&text[at..start.max(at)]);
            out.push_str("[redacted]");
            at = end;
        }
        out.push_str(&text[at..]);
        out
    }
}

/// Turns an upstream error answer (its status, headers and at most the first 64 KiB of its
/// body) into the client's error: the same status and the upstream's error when the body is
/// an OpenAI error envelope (sanitised), else a 502. A 401 from the upstream is relay's key
/// being refused, not the client's: a 502 too.
pub fn upstream_error(
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &[u8],
    mask: &KeyMask,
) -> ApiError {
    let retry_after = headers.get(RETRY_AFTER).cloned();
    let envelope = serde_json::from_slice::<Value>(body).ok().filter(|v| {
        v.get("error")
            .is_some_and(|e| e.is_object() || e.is_string())
    });
    let Some(envelope) = envelope else {
        tracing::warn!(
            status = status.as_u16(),
            "upstream error answer is not an OpenAI error"
        );
        return ApiError::BadGateway(format!(
            "the upstream answered {} with a body that is not an OpenAI error",
            status.as_u16()
        ));
    };
    if status == StatusCode::UNAUTHORIZED {
        // The client's credentials are fine, so a 401 would mislead it (and SDKs would ask the
        // user to log in again).
        tracing::error!("the upstream rejected OPENAI_API_KEY (401)");
        return ApiError::BadGateway("the upstream rejected relay's credentials".into());
    }
    ApiError::Upstream {
        status,
        body: sanitize(status, &envelope["error"], mask),
        retry_after,
    }
}

/// Keeps only the envelope's standard fields (as strings) and masks the key and anything like
/// it, in the whole body at once so that no field can carry it out.
fn sanitize(status: StatusCode, error: &Value, mask: &KeyMask) -> Bytes {
    let text = |name: &str| match error.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .unwrap_or("upstream error");
    let kind = text("type").unwrap_or_else(|| error_type_for(status).to_owned());
    let clean = ErrorEnvelope::new(kind, message, text("code"), text("param")).to_bytes();
    Bytes::from(mask.mask(&String::from_utf8_lossy(&clean)))
}

/// Maps a transport failure (no usable HTTP answer) to a 504 when something timed out (the TCP
/// connect, or the system's timeouts on a socket), else a 502; logs the cause. These errors
/// name neither the URL nor any header: safe to log.
pub fn transport_error(err: &(dyn std::error::Error + 'static), connect: bool) -> ApiError {
    let mut cause = err.to_string();
    let mut timed_out = false;
    let mut source = Some(err);
    while let Some(e) = source {
        timed_out |= e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || e.downcast_ref::<super::h1::WireError>()
                .is_some_and(super::h1::WireError::is_timeout);
        if !std::ptr::addr_eq(e, err) {
            cause.push_str(": ");
            cause.push_str(&e.to_string());
        }
        source = e.source();
    }
    tracing::warn!(error = %cause, "upstream request failed");
    if timed_out {
        ApiError::GatewayTimeout
    } else if connect {
        ApiError::BadGateway("the upstream is unreachable".into())
    } else {
        ApiError::BadGateway("the upstream connection failed".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that wraps another, as hyper-util's connect errors do.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn timeouts_anywhere_in_the_chain_are_504_other_failures_502() {
        let timed_out = Wrapped(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(
            transport_error(&timed_out, true),
            ApiError::GatewayTimeout
        ));
        let refused = Wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(
            matches!(transport_error(&refused, true), ApiError::BadGateway(m) if m.contains("unreachable"))
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(
            matches!(transport_error(&reset, false), ApiError::BadGateway(m) if m.contains("failed"))
        );
    }

    #[test]
    fn keys_are_masked_in_any_letter_case() {
        let mask = KeyMask::new(Some(SecretString::from("relay-Secret-key-123")));
        assert_eq!(
            mask.mask("a RELAY-SECRET-KEY-123 b relay-secret-key-123c SK-ABC_1 ask-me task-x"),
            "a [redacted] b [redacted]c [redacted] ask-me task-x"
        );
        assert_eq!(mask.mask("nothing here"), "nothing here");
        assert_eq!(mask.mask("sk-"), "[redacted]");
    }

    #[test]
    fn upstream_errors_keep_the_standard_fields_and_lose_every_key() {
        let mask = KeyMask::new(Some(SecretString::from("relay-secret-key")));
        let body = br#"{"error": {"message": "bad key relay-secret-key or sk-abc123 here",
            "type": "invalid_request_error", "code": 42, "param": null, "extra": "sk-zzz"}}"#;
        let err = upstream_error(
            StatusCode::BAD_REQUEST,
            &http::HeaderMap::new(),
            body,
            &mask,
        );
        let ApiError::Upstream { status, body, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let sent: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"error": {
                "message": "bad key [redacted] or [redacted] here",
                "type": "invalid_request_error", "code": "42", "param": null}})
        );
        // Not an envelope, or the upstream refusing relay's key: 502.
        for (status, body) in [
            (StatusCode::BAD_REQUEST, &b"<html>"[..]),
            (StatusCode::UNAUTHORIZED, &br#"{"error": "no"}"#[..]),
        ] {
            let err = upstream_error(status, &http::HeaderMap::new(), body, &mask);
            assert!(matches!(err, ApiError::BadGateway(_)), "{err:?}");
        }
    }
}
