//! The OpenAPI document and the interactive docs page (served only with `DEBUG` or `--dev`).

use axum::Router;
use http::HeaderValue;
use http::header::CONTENT_SECURITY_POLICY;
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::openapi::security::{
    Flow, HttpAuthScheme, HttpBuilder, OAuth2, Password, Scopes, SecurityScheme,
};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

/// The document's fixed parts; paths are added by the router.
#[derive(OpenApi)]
#[openapi(
    info(title = "relay", description = "An OpenAI API relay: users, JWTs, streaming chat, shared rate limits."),
    modifiers(&SecuritySchemes),
    tags(
        (name = "auth", description = "Users and tokens"),
        (name = "chat", description = "The OpenAI-compatible relay"),
        (name = "responses", description = "The Responses API; stored responses are served to their creator only"),
        (name = "usage", description = "What each request cost, in tokens"),
        (name = "api-keys", description = "API keys for servers: a Bearer credential for chat, responses, embeddings, models and usage (not for /auth or /admin)"),
        (name = "admin", description = "The owner's control: users, revocation, everyone's usage (admins only, with an access token)"),
        (name = "health", description = "Health checks"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        // Lets the docs page's "Authorize" button log in with email (as username) and password.
        components.add_security_scheme(
            "oauth2",
            SecurityScheme::OAuth2(OAuth2::new([Flow::Password(Password::new(
                "/api/v1/auth/login",
                Scopes::new(),
            ))])),
        );
    }
}

/// The Swagger UI page needs its own scripts and styles, so it gets its own CSP.
const DOCS_CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
     script-src 'self'; frame-ancestors 'none'";

/// `/docs` and `/openapi.json`.
pub fn router<S: Clone + Send + Sync + 'static>(doc: utoipa::openapi::OpenApi) -> Router<S> {
    Router::from(SwaggerUi::new("/docs").url("/openapi.json", doc)).layer(
        SetResponseHeaderLayer::overriding(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DOCS_CSP),
        ),
    )
}
