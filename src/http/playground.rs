//! The playground page (`--dev` or `PLAYGROUND=true`): one static page at `/`, built into the
//! binary, that logs in and streams a chat through relay's own API. Its source in `web/` is
//! also the README's example of a frontend talking to relay.
//!
//! The page, its script and its style sheet are three routes so that the page runs under a
//! strict CSP of its own (no inline script or style); these routes set it, and `observe`
//! keeps a CSP already present instead of putting the API's on top. The routes stay out of
//! the OpenAPI document: they are not part of the API.

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use http::HeaderValue;
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use tower_http::set_header::SetResponseHeaderLayer;

/// The page's CSP: its own script, style and API calls, nothing inline, from nowhere else.
pub const PLAYGROUND_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

const PAGE: &str = include_str!("../../web/playground.html");
const SCRIPT: &str = include_str!("../../web/playground.js");
const STYLE: &str = include_str!("../../web/playground.css");

async fn get_page() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

async fn get_script() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT)
}

async fn get_style() -> impl IntoResponse {
    ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// `/`, `/playground.js` and `/playground.css`, with the page's CSP.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(get_page))
        .route("/playground.js", get(get_script))
        .route("/playground.css", get(get_style))
        .layer(SetResponseHeaderLayer::overriding(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PLAYGROUND_CSP),
        ))
        // The files change with the binary: a browser revalidates rather than keep a stale copy.
        .layer(SetResponseHeaderLayer::overriding(
            CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        ))
}
