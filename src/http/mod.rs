//! The HTTP surface: routes and the layers around them. The layer on top: it may import from
//! every module below it (`relay`, `auth`, `ratelimit`, `store`, `config`, `error`,
//! `context`); none of them imports from here.
//!
//! Layer order, outermost first (a request passes them top to bottom, a response bottom to top):
//!
//! 1. `middleware::ObserveLayer` — request id, security headers, error envelope for non-JSON errors, the
//!    request's one log line. Outermost, so that even a panic's 500 gets all four.
//! 2. `CorsLayer` — answers preflights; adds `Access-Control-Allow-Origin` for allowed origins
//!    (to every response below it, so that a browser can read errors too). Only requests with
//!    an `Origin` pass through it (`CorsWhenOrigin`): the others are no browser's.
//! 3. `CatchPanicLayer` — a panicking handler becomes a 500 envelope, not a dropped connection.
//! 4. `DefaultBodyLimit` — bodies over `MAX_REQUEST_BYTES` are refused (413) while being read.
//! 5. Per-group layers: `Cache-Control: no-store` on `/auth/*`; the rate limit
//!    (`ratelimit::limit`, a `route_layer`, so unknown paths are not limited) on chat (with
//!    embeddings and responses), models
//!    and the account (`me`, `logout`) (per user), register and refresh (per IP). Login checks
//!    its limits (IP, then email) in its handler.
//!
//! Before all of them, the accept loop (`app.rs`) gives every request body its deadline
//! (`deadline::DeadlineBody`), which the body extractors turn into a 408.
//!
//! Routes are public only when listed here without an `AuthUser` argument: health, docs, the
//! playground page, register, login, refresh. Everything else takes `AuthUser`.
//!
//! Request and response extensions, the way layers and handlers talk to each other:
//!
//! | extension | inserted by | read by |
//! |---|---|---|
//! | `ConnectInfo<SocketAddr>` (request) | the accept loop (`app.rs`) | `ratelimit::client_ip` |
//! | `Arc<RequestContext>` (request) | `middleware::ObserveLayer` | `extract::authenticate` (sets the user), `extract::Ctx` → `relay` (sets the usage), `observe` again for the log line |
//! | `MatchedPath` (request) | axum's router | `observe` (the route on the log line) |
//! | `AuthUser` (request) | `ratelimit::limit` on per-user groups, after verifying the token | the `AuthUser` extractor (so the token is verified once) |
//! | `ratelimit::Deferred` (request) | `ratelimit::limit` on metered routes (chat, responses, embeddings) for a user a token limit applies to | the `Admission` extractor → `ratelimit::admit`, which makes the request check with the token reservation; `limit` again when the handler answered without it |
//! | `ErrorDetail` (response) | `ApiError::into_response` for 500 and 503 | `observe`, which logs it with the request id and removes it |

pub mod admin;
pub mod api_keys;
pub mod auth;
pub mod chat;
pub mod deadline;
pub mod docs;
pub mod embeddings;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod middleware;
pub mod models;
pub mod playground;
pub mod ratelimit;
pub mod responses;
pub mod usage;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderName};
use http::{HeaderValue, Method};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{Config, Endpoint, Origins};
use crate::error::ApiError;
use crate::state::AppState;
use ratelimit::{KeyBy, LimitState};

/// Headers a browser may read from our responses.
const EXPOSED_HEADERS: [&str; 8] = [
    "x-request-id",
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// The API routes with their OpenAPI description, before state is attached (without the
/// rate-limit layers, which need the state; the document is the same).
pub fn api_routes() -> OpenApiRouter<AppState> {
    routes(None)
}

/// The OpenAPI document (also what `/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().split_for_parts().1
}

/// The API routes; with `state`, each limited group gets its rate-limit `route_layer`.
fn routes(state: Option<&AppState>) -> OpenApiRouter<AppState> {
    let limited = |group: OpenApiRouter<AppState>, endpoint: Endpoint, by: KeyBy, metered: bool| {
        match state {
            Some(app) => group.route_layer(axum::middleware::from_fn_with_state(
                LimitState {
                    app: app.clone(),
                    endpoint,
                    by,
                    metered,
                },
                ratelimit::limit,
            )),
            None => group,
        }
    };
    let register = OpenApiRouter::new().routes(routes!(auth::register_user));
    let refresh = OpenApiRouter::new().routes(routes!(auth::refresh_token));
    let account = OpenApiRouter::new()
        .routes(routes!(auth::get_me))
        .routes(routes!(auth::logout_user))
        .routes(routes!(api_keys::create_api_key, api_keys::list_api_keys))
        .routes(routes!(api_keys::delete_api_key));
    let admin = OpenApiRouter::new()
        .routes(routes!(admin::list_users))
        .routes(routes!(
            admin::get_user,
            admin::patch_user,
            admin::delete_user
        ))
        .routes(routes!(admin::revoke_user))
        .routes(routes!(admin::get_admin_usage));
    let usage = OpenApiRouter::new().routes(routes!(usage::get_usage));
    let auth = OpenApiRouter::new()
        .routes(routes!(auth::login_user))
        .merge(limited(account, Endpoint::Account, KeyBy::User, false))
        .merge(limited(register, Endpoint::Register, KeyBy::Ip, false))
        .merge(limited(refresh, Endpoint::Refresh, KeyBy::Ip, false))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    // Chat, responses and embeddings share the chat limit; those that reach the upstream are
    // metered by token limits too.
    let metered = OpenApiRouter::new()
        .routes(routes!(chat::create_chat_completion))
        .routes(routes!(chat::stream_chat_completion))
        .routes(routes!(embeddings::create_embedding))
        .routes(routes!(responses::create_response));
    let stored = OpenApiRouter::new()
        .routes(routes!(responses::get_response, responses::delete_response))
        .routes(routes!(responses::cancel_response))
        .routes(routes!(responses::list_input_items));
    let models = OpenApiRouter::new()
        .routes(routes!(models::list_chat_models))
        .routes(routes!(models::list_models))
        .routes(routes!(models::get_model));
    let health = OpenApiRouter::new()
        .routes(routes!(health::get_health))
        .routes(routes!(health::get_health_detailed));
    // Every path is written out whole (`/api/v1/…` in each handler's `utoipa::path`) rather
    // than nested under `/api/v1`: axum gives each nested route a layer that strips the prefix,
    // rebuilding the request's URI on every request (about 2,500 instructions, issue 14).
    OpenApiRouter::with_openapi(docs::ApiDoc::openapi()).merge(
        auth.merge(limited(metered, Endpoint::Chat, KeyBy::User, true))
            .merge(limited(stored, Endpoint::Chat, KeyBy::User, false))
            .merge(limited(usage, Endpoint::Account, KeyBy::User, false))
            .merge(limited(admin, Endpoint::Account, KeyBy::User, false).layer(
                SetResponseHeaderLayer::overriding(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("no-store"),
                ),
            ))
            .merge(limited(models, Endpoint::Models, KeyBy::User, false))
            .merge(health),
    )
}

/// Whether `origin` is a local development server: `http://localhost:<port>` or
/// `http://127.0.0.1:<port>` (Vite's 5173, Next's 3000, …), allowed in `--dev`.
fn is_local_dev_origin(origin: &[u8]) -> bool {
    let port = origin
        .strip_prefix(b"http://localhost:")
        .or_else(|| origin.strip_prefix(b"http://127.0.0.1:"));
    port.is_some_and(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit))
}

fn cors(origins: &Origins, dev: bool) -> CorsLayer {
    let allow_origin = match origins {
        Origins::Any => AllowOrigin::any(),
        Origins::List(list) => {
            let list: Vec<HeaderValue> = list
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect();
            // A predicate rather than `AllowOrigin::list`: the layer is cloned for every
            // request (axum clones a route's stack), and a predicate's list is behind an `Arc`.
            AllowOrigin::predicate(move |origin, _| {
                list.contains(origin) || (dev && is_local_dev_origin(origin.as_bytes()))
            })
        }
    };
    // The request headers are mirrored: the official SDKs send `X-Stainless-*` (their
    // version, OS, retry count, …), `OpenAI-*` and `Idempotency-Key` from a browser, and more
    // in each release; relay ignores them. Only allowed origins get any CORS header at all, and
    // no credentials (cookies) are involved: the token travels in `Authorization`.
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
        .expose_headers(EXPOSED_HEADERS.map(HeaderName::from_static))
        .max_age(std::time::Duration::from_secs(600))
        // `Vary` is `middleware::ObserveLayer`'s, one static value: tower-http's default joined
        // the same three names anew for every answer, and cloned their list for every request.
        .vary([] as [HeaderName; 0])
}

/// tower-http's CORS layer, for the requests that carry an `Origin`. A request without one is
/// no browser's cross-origin request (browsers send `Origin` with every such request and
/// every preflight), and no CORS header on its answer would mean anything; the layer still
/// built a header map for it (four `extend`s and an allocation) and looked at its answer:
/// about 1,350 instructions a request (issue 14).
#[derive(Clone)]
struct CorsWhenOrigin(CorsLayer);

impl<S: Clone> tower::Layer<S> for CorsWhenOrigin {
    type Service = CorsWhenOriginService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CorsWhenOriginService {
            cors: tower::Layer::layer(&self.0, inner.clone()),
            plain: inner,
        }
    }
}

/// See [`CorsWhenOrigin`].
#[derive(Clone)]
struct CorsWhenOriginService<S> {
    cors: tower_http::cors::Cors<S>,
    plain: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CorsWhenOriginService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future =
        futures_util::future::Either<tower_http::cors::ResponseFuture<S::Future>, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        std::task::ready!(self.cors.poll_ready(cx))?;
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if req.headers().contains_key(header::ORIGIN) {
            futures_util::future::Either::Left(self.cors.call(req))
        } else {
            futures_util::future::Either::Right(self.plain.call(req))
        }
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal(anyhow::anyhow!("handler panicked")).into_response()
}

/// Any path no route serves: a 404 naming it, and what relay serves instead.
async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NoRoute(middleware::shorten(uri.path(), 200).to_owned())
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let (api, doc) = routes(Some(&state)).split_for_parts();
    let mut app = api;
    if config.docs_enabled() {
        app = app.merge(docs::router(doc));
    }
    if config.playground_enabled() {
        app = app.merge(playground::router());
    }
    if config.metrics.enabled {
        app = app.route("/metrics", axum::routing::get(metrics::metrics));
    }
    let usage = Some(state.usage.clone());
    with_layers(app, &config, usage).with_state(state)
}

/// Adds the fallback and the common layers (see the module documentation) to `routes`.
pub fn with_layers<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    config: &Config,
    usage: Option<crate::usage::UsageSink>,
) -> Router<S> {
    // One stack, added as one layer: axum boxes each route's service once per `layer` call,
    // and every request clones each box (and, in `from_fn`, what is below it again).
    let common = tower::ServiceBuilder::new()
        .layer(middleware::ObserveLayer(middleware::Observe {
            trust_proxy: config.server.trust_proxy_headers,
            usage,
        }))
        .layer(CorsWhenOrigin(cors(
            &config.server.allowed_origins,
            config.dev,
        )))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(DefaultBodyLimit::max(config.server.max_request_bytes));
    routes.fallback(not_found).layer(common)
}
