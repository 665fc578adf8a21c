//! Building and running the server: one function builds everything (pools, keys, hasher,
//! router, listener), so that tests can start a complete app on port 0.
//!
//! (Over 400 lines: the accept loop, its connection cap and file-limit handling belong with
//! the server they bound; about a fifth of the file is their unit tests.)

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::ConnectInfo;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::auth::status::UserStatus;
use crate::auth::{JwtKeys, Passwords};
use crate::config::Config;
use crate::http::deadline::DeadlineBody;
use crate::ratelimit::RateLimiter;
use crate::relay::Upstream;
use crate::server::RequestBody;
use crate::state::{AppState, Inner};
use crate::store::Store;

/// A built, bound, not yet running server.
pub struct App {
    listener: TcpListener,
    router: axum::Router,
    state: AppState,
    usage_writer: crate::usage::UsageWriter,
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
        let keys =
            crate::auth::api_keys::ApiKeys::new(config.auth.secret_key_bytes(), store.clone());
        let (usage, usage_writer) = crate::usage::start(store.clone());
        let metrics = if config.metrics.enabled {
            Some(crate::measure::install().context("cannot set up metrics")?)
        } else {
            None
        };
        let state = AppState::new(Inner {
            config: Arc::new(config),
            store,
            jwt,
            upstream,
            limiter: Arc::new(limiter),
            passwords,
            users,
            keys,
            usage,
            metrics,
            started_at: Instant::now(),
        });
        spawn_purges(state.store.clone(), state.config.usage.retention_days);
        let router = crate::http::router(state.clone());
        Ok(App {
            listener,
            router,
            state,
            usage_writer,
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
    /// Each connection is served by relay's own HTTP/1.1 connection ([`crate::server`]),
    /// rather than through `axum::serve`: it bounds how long a client may take to send its
    /// request head (slow clients cannot hold connections open for free) and how large that
    /// head may be, and every request body gets a deadline (`REQUEST_BODY_TIMEOUT_SECONDS`,
    /// see `http::deadline`). relay speaks HTTP/1.1; TLS and HTTP/2 belong to the proxy or
    /// load balancer in front of it.
    ///
    /// At most `MAX_CONNECTIONS` connections are served at once (fewer if the file limit is
    /// lower, see [`connection_cap`]): each holds a permit, and while none is free the loop
    /// does not accept, so that new connections wait in the kernel's backlog instead of
    /// taking the file descriptors the database, Redis and the upstream need.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let server = &self.state.config.server;
        let grace = server.shutdown_grace;
        let body_timeout = server.request_body_timeout;
        let file_limit = file_limits().ok().map(|(soft, _)| soft);
        let max_connections = connection_cap(server.max_connections, file_limit);
        if max_connections < server.max_connections {
            tracing::warn!(
                configured = server.max_connections,
                max_connections,
                file_limit,
                "MAX_CONNECTIONS is above the file limit less {FD_RESERVE} kept for the \
                 database, Redis, the upstream and logs: serving at most {max_connections} \
                 connections at once"
            );
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
        let limits = crate::server::Limits {
            head_timeout: HEADER_READ_TIMEOUT,
            max_head_bytes: MAX_HEAD_BYTES,
        };
        // Turned true at shutdown: idle connections close, busy ones after their answer.
        let (stopping, stop_watch) = tokio::sync::watch::channel(false);
        // Every connection's task, so that those still open when the grace period ends can be
        // ended (and their requests' usage records queued) before the records are flushed.
        let mut connections = tokio::task::JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let mut warned_full: Option<Instant> = None;
        loop {
            // Finished connections leave the set here, so that it holds only open ones.
            while connections.try_join_next().is_some() {}
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
                        tracing::warn!(
                            max_connections,
                            "connection limit reached: new connections wait in the backlog"
                        );
                        warned_full = Some(Instant::now());
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        permit = slots.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break, // never closed
                        },
                    }
                }
            };
            let listener = &self.listener;
            let (tcp, remote) = tokio::select! {
                () = &mut shutdown => break,
                accepted = accept_with_backoff(|| listener.accept()) => accepted,
            };
            // Small writes (SSE chunks) must leave at once, not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let router = self.router.clone();
            let service = move |req: http::Request<RequestBody>| {
                // Counted from the moment the head has arrived, for the whole body.
                let deadline = tokio::time::Instant::now() + body_timeout;
                let mut req = req.map(|body| DeadlineBody::new(body, deadline));
                req.extensions_mut().insert(ConnectInfo(remote));
                router.clone().oneshot(req)
            };
            let connection = crate::server::serve(tcp, limits, stop_watch.clone(), service);
            // `map` rather than an `async` block: a block that awaits the connection it moved in
            // keeps room for it twice, in every connection's task.
            connections.spawn(futures_util::FutureExt::map(connection, move |()| {
                drop(permit);
            }));
        }
        drop(self.listener);
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "shutting down: draining requests"
        );
        let _ = stopping.send(true);
        let drained = async { while connections.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("grace period over: closing remaining connections");
        }
        // Close what is still open: dropping a connection's task drops its requests, whose
        // guards log them and queue their usage records.
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        // Every connection is closed: every request's usage record is queued. Write them.
        self.usage_writer
            .flush_and_stop(std::time::Duration::from_secs(10))
            .await;
        self.state.store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// How long a client may take to send a request's line and headers, counting the idle time of
/// a keep-alive connection waiting for its next request. Longer than the idle
/// timeouts of common proxies and load balancers (60 s), so that they close idle connections
/// first: a connection closed by relay just as a proxy reuses it would fail that request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(75);
/// The largest request head (line and headers) accepted; larger ones are answered 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after an accept error that is not about one connection (out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// While accepting keeps failing, one log line per this many failures (10 s of backoff).
const ACCEPT_ERRORS_PER_LOG_LINE: u64 = 100;
/// At most one "connection limit reached" warning per this long.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);
/// File descriptors kept free of client connections: the database pool, Redis, upstream
/// connections, log files, the runtime's own.
const FD_RESERVE: u64 = 64;

/// The number of connections served at once: `configured`, lowered to the soft file limit
/// less [`FD_RESERVE`] (at least 1) when that is smaller. Without a known limit, `configured`.
pub fn connection_cap(configured: usize, file_limit: Option<u64>) -> usize {
    match file_limit {
        Some(limit) => {
            let room = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
            configured.min(room.max(1))
        }
        None => configured,
    }
}

/// The process's file limit (`RLIMIT_NOFILE`): soft and hard.
#[cfg(unix)]
#[allow(clippy::useless_conversion)] // rlim_t is u64 on Linux, not on every Unix
pub fn file_limits() -> std::io::Result<(u64, u64)> {
    let limit = nofile()?;
    Ok((u64::from(limit.rlim_cur), u64::from(limit.rlim_max)))
}

#[cfg(unix)]
fn nofile() -> std::io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(limit)
}

/// Raises the soft file limit to the hard limit (a process may do so without privileges):
/// every client connection is a file descriptor, and many systems still start processes
/// with a soft limit of 1,024. Returns the soft limit before and after.
#[cfg(unix)]
pub fn raise_file_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = file_limits()?;
    let mut limit = nofile()?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own and pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, file_limits()?.0))
}

/// The process's file limit: unknown on this platform.
#[cfg(not(unix))]
pub fn file_limits() -> std::io::Result<(u64, u64)> {
    Err(std::io::Error::other("no file limit on this platform"))
}

/// Raising the file limit: nothing to raise on this platform.
#[cfg(not(unix))]
pub fn raise_file_limit() -> std::io::Result<(u64, u64)> {
    file_limits()
}

/// An accept error that concerns only the connection being accepted.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Accepts the next connection with `accept`. An error about that one connection is skipped.
/// Any other — out of file descriptors (`EMFILE`, `ENFILE`) or memory — pauses for
/// [`ACCEPT_BACKOFF`] before the next try: the pending connection stays in the backlog and the
/// listener stays ready, so retrying at once would spin a core and flood the log. Logged when
/// it starts, every [`ACCEPT_ERRORS_PER_LOG_LINE`] failures, and when accepting works again.
async fn accept_with_backoff<T, F>(mut accept: impl FnMut() -> F) -> T
where
    F: Future<Output = std::io::Result<T>>,
{
    let mut failures: u64 = 0;
    loop {
        match accept().await {
            Ok(accepted) => {
                if failures > 0 {
                    tracing::warn!(failures, "accepting connections again");
                }
                return accepted;
            }
            Err(err) if is_connection_error(&err) => {}
            Err(err) => {
                failures += 1;
                if failures % ACCEPT_ERRORS_PER_LOG_LINE == 1 {
                    tracing::error!(
                        error = %err,
                        failures,
                        "cannot accept connections; retrying every 100 ms"
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Deletes expired refresh tokens, and usage records older than `retention_days` (unless 0),
/// now and every hour, so that the tables stay bounded.
/// Days a stored response's owner is remembered: OpenAI keeps stored responses for 30 days, so
/// an older id names nothing any more (and is refused to everyone once forgotten).
pub const RESPONSE_OWNER_DAYS: i64 = 30;

fn spawn_purges(store: Store, retention_days: u32) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            let now = chrono::Utc::now();
            match store.purge_expired_tokens(now).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "expired refresh tokens purged"),
                Err(e) => tracing::warn!(error = %e, "could not purge expired refresh tokens"),
            }
            if let Some(before) =
                now.checked_sub_signed(chrono::Duration::days(RESPONSE_OWNER_DAYS))
            {
                match store.purge_response_owners(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "old stored-response owners purged"),
                    Err(e) => tracing::warn!(error = %e, "could not purge old response owners"),
                }
            }
            if retention_days > 0
                && let Some(before) =
                    now.checked_sub_signed(chrono::Duration::days(i64::from(retention_days)))
            {
                match store.purge_usage(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "old usage records purged"),
                    Err(e) => tracing::warn!(error = %e, "could not purge old usage records"),
                }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn connections_stay_below_the_file_limit() {
        assert_eq!(connection_cap(10_000, Some(1_048_576)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1024)), 960);
        assert_eq!(connection_cap(200, Some(256)), 192);
        assert_eq!(connection_cap(100, Some(256)), 100);
        assert_eq!(connection_cap(10_000, Some(10)), 1);
        assert_eq!(connection_cap(10_000, Some(u64::MAX)), 10_000);
        assert_eq!(connection_cap(10_000, None), 10_000);
    }

    fn emfile() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_files_the_accept_loop_backs_off_instead_of_spinning() {
        // Five EMFILEs, then a connection: five pauses.
        let calls = AtomicUsize::new(0);
        let start = tokio::time::Instant::now();
        let accepted = accept_with_backoff(|| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move { if n < 5 { Err(emfile()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(accepted, 5);
        assert_eq!(start.elapsed(), 5 * ACCEPT_BACKOFF);

        // Out of files for good: about ten tries a second, not a spinning loop.
        let calls = AtomicUsize::new(0);
        let stuck = tokio::time::timeout(
            Duration::from_secs(1),
            accept_with_backoff(|| {
                calls.fetch_add(1, Ordering::Relaxed);
                async { Err::<(), _>(std::io::Error::from_raw_os_error(libc::ENFILE)) }
            }),
        )
        .await;
        assert!(stuck.is_err());
        assert!(calls.load(Ordering::Relaxed) <= 11, "{calls:?}");

        // An error about one connection is skipped at once.
        let calls = AtomicUsize::new(0);
        let start = tokio::time::Instant::now();
        accept_with_backoff(|| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move {
                if n < 3 {
                    Err(std::io::ErrorKind::ConnectionAborted.into())
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
