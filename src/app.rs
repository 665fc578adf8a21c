//! Building and running the server: one function builds everything (pools, keys, hasher,
//! router, listener), so that tests can start a complete app on port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::auth::status::UserStatus;
use crate::auth::{JwtKeys, Passwords};
use crate::config::Config;
use crate::ratelimit::RateLimiter;
use crate::relay::Upstream;
use crate::state::{AppState, Inner};
use crate::store::Store;

/// A built, bound, not yet running server.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    state: AppState,
}

impl App {
    /// Connects to the database, applies migrations, prepares keys and binds the listener.
    pub async fn build(mut config: Config) -> anyhow::Result<App> {
        if config.upstream.api_key.is_none() {
            // Only dev/debug mode gets here (config refuses it otherwise).
            let addr = crate::mock::spawn(crate::mock::MockOptions::default()).await?;
            config.upstream.base_url = url::Url::parse(&format!("http://{addr}/v1"))?;
            config.upstream.api_key = Some(secrecy::SecretString::from("mock-key"));
            tracing::warn!(
                model = crate::mock::MOCK_MODEL,
                "OPENAI_API_KEY is not set: answering with the built-in mock upstream"
            );
        }
        let upstream =
            Upstream::new(&config.upstream).context("cannot build the upstream client")?;
        let limiter = RateLimiter::new(config.rate_limits.clone())
            .await
            .context("cannot set up rate limiting")?;
        let store = Store::connect(&config.database)
            .await
            .context("cannot open the database")?;
        store
            .migrate()
            .await
            .context("cannot apply database migrations")?;
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        let passwords = Passwords::new(parallelism).await?;
        let jwt = JwtKeys::new(
            config.auth.secret_key_bytes(),
            config.auth.access_token_ttl,
            config.auth.refresh_token_ttl,
        );
        let server = &config.server;
        let listener = TcpListener::bind((server.host.as_str(), server.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", server.host, server.port))?;
        let users = UserStatus::new(store.clone());
        let state = AppState::new(Inner {
            config: Arc::new(config),
            store,
            jwt,
            upstream,
            limiter,
            passwords,
            users,
            started_at: Instant::now(),
        });
        spawn_token_purge(state.store.clone());
        let router = crate::http::router(state.clone());
        Ok(App {
            listener,
            router,
            state,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (tests reach the store through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then lets in-flight requests and streams finish for
    /// at most `SHUTDOWN_GRACE_SECONDS`.
    ///
    /// The accept loop is hyper's HTTP/1.1 server, configured here rather than through
    /// `axum::serve`: it bounds how long a client may take to send its request head (slow
    /// clients cannot hold connections open for free) and how large that head may be, and
    /// serves each connection without protocol sniffing. relay speaks HTTP/1.1; TLS and HTTP/2
    /// belong to the proxy or load balancer in front of it.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let grace = self.state.config.server.shutdown_grace;
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_header_size(MAX_HEAD_BYTES);
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (tcp, remote) = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) if is_connection_error(&err) => continue,
                    Err(err) => {
                        // Out of file descriptors (or memory): wait a moment rather than spin.
                        tracing::error!(error = %err, "cannot accept connections");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // Small writes (SSE chunks) must leave at once, not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let router = self.router.clone();
            let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                router.clone().oneshot(req)
            });
            let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "shutting down: draining requests"
        );
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(grace) => {
                tracing::warn!("grace period over: closing remaining connections");
            }
        }
        self.state.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How long a client may take to send a request's line and headers; hyper counts the idle time
/// of a keep-alive connection waiting for its next request in it too. Longer than the idle
/// timeouts of common proxies and load balancers (60 s), so that they close idle connections
/// first: a connection closed by relay just as a proxy reuses it would fail that request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);
/// The largest request head (line and headers) accepted; hyper answers 431 above it.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after an accept error that is not about one connection (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// An accept error that concerns only the connection being accepted.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Deletes expired refresh tokens now and every hour, so that the table stays bounded.
fn spawn_token_purge(store: Store) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            match store.purge_expired_tokens(chrono::Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "expired refresh tokens purged"),
                Err(e) => tracing::warn!(error = %e, "could not purge expired refresh tokens"),
            }
        }
    });
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
