//! The upstream's HTTP/1.1 connections, each driven by the request that is using it.
//!
//! hyper's pooled client runs every connection in a task of its own and hands the response
//! over through channels, one body frame per turn of that task. For a stream, that meant one
//! write to the client per event even when one read from the upstream brought all of them, and
//! two task switches per event. Here a request checks a connection out of the pool and polls it
//! itself, in its own task, while it waits for the answer and while it reads the body
//! ([`UpstreamBody`]): whatever one read brings is handed over in the same poll, and the
//! connection goes back to the pool when the body has been read to its end. A body dropped
//! before its end (a client gone mid-stream) drops its connection, which closes it.
//!
//! Idle connections are not polled; one that the upstream closed meanwhile is found out when it
//! is checked out (its connection ends on the first poll) and is thrown away. A request that
//! could not even be written on a reused connection is sent once more on another one, as
//! hyper's client does: the upstream never saw it, so it cannot be billed twice. Nothing else is
//! ever retried.
//!
//! HTTP/1.1 only, also over TLS (ALPN offers `http/1.1` alone), as nginx speaks to its
//! upstreams: one connection per request in flight, and no connection-level flow control
//! between an event and the client.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower::Service as _;

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// One connection: where requests go in, and the state machine that must be polled for them
/// to make progress.
struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
    /// `None` once it has ended.
    conn: Option<http1::Connection<Io, Full<Bytes>>>,
}

impl Conn {
    /// Drives the connection; `true` once it has ended (closed, or failed). An ended
    /// connection is dropped at once: that is what gives a request still queued on it back to
    /// its sender, and fails one waiting for its answer, rather than leave either waiting.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return true;
        };
        if Pin::new(conn).poll(cx).is_ready() {
            self.conn = None;
            return true;
        }
        false
    }

    /// Whether it can take a request now: open, and done with the last one.
    fn is_idle(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !self.drive(&mut cx) && self.send.is_ready()
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed before the answer's headers arrived.
    Request(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(err) => write!(f, "cannot connect: {err}"),
            SendError::Request(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(err) => Some(&**err),
            SendError::Request(err) => Some(err),
        }
    }
}

/// The pool of connections to one upstream origin.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// The origin (`scheme://authority`) every connection goes to.
    origin: Uri,
    /// Most recently returned last.
    idle: Mutex<VecDeque<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool for `origin`, keeping at most `max_idle` idle connections, each for at most
    /// `idle_timeout`. Expired connections are closed every quarter of `idle_timeout` by a task
    /// that ends with the pool.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            connector,
            origin,
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&pool);
            handle.spawn(async move {
                let mut every = tokio::time::interval(idle_timeout / 4);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    match weak.upgrade() {
                        Some(pool) => pool.expire(),
                        None => return,
                    }
                }
            });
        }
        pool
    }

    /// How many connections are idle in the pool.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Closes the connections idle for too long. (Closing happens after the lock is let go:
    /// a socket's close and deregistration are not done while other requests wait for it.)
    fn expire(&self) {
        let mut expired = Vec::new();
        if let Ok(mut idle) = self.idle.lock() {
            while idle
                .front()
                .is_some_and(|i| i.since.elapsed() >= self.idle_timeout)
            {
                expired.extend(idle.pop_front());
            }
        }
        drop(expired);
    }

    fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().ok()?;
        let newest = idle.pop_back()?;
        if newest.since.elapsed() >= self.idle_timeout {
            // The newest is too old: so are all the others.
            let all = std::mem::take(&mut *idle);
            drop(idle);
            drop(all);
            return None;
        }
        Some(newest.conn)
    }

    fn put_back(&self, mut conn: Box<Conn>) {
        // One that is closing (`Connection: close`, or a read that found more than its answer)
        // is not kept.
        if !conn.is_idle() {
            return;
        }
        let evicted = match self.idle.lock() {
            Ok(mut idle) => {
                let evicted = if idle.len() >= self.max_idle {
                    idle.pop_front()
                } else {
                    None
                };
                idle.push_back(Idle {
                    conn,
                    since: Instant::now(),
                });
                evicted
            }
            Err(_) => None,
        };
        drop(evicted);
    }

    async fn connect(&self) -> Result<Box<Conn>, SendError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(SendError::Connect)?;
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Request)?;
        Ok(Box::new(Conn {
            send,
            conn: Some(conn),
        }))
    }

    /// A connection ready for a request: an idle one that is still open, else a new one.
    /// `true` with a reused one.
    async fn ready_conn(&self) -> Result<(Box<Conn>, bool), SendError> {
        while let Some(mut conn) = self.checkout() {
            let ready = poll_fn(|cx| {
                if conn.drive(cx) {
                    return Poll::Ready(false);
                }
                // An idle connection is ready at once; one that is not was left mid-answer.
                Poll::Ready(matches!(conn.send.poll_ready(cx), Poll::Ready(Ok(()))))
            })
            .await;
            if ready {
                return Ok((conn, true));
            }
        }
        let mut conn = self.connect().await?;
        let ready = poll_fn(|cx| {
            if conn.drive(cx) {
                return Poll::Ready(Err(SendError::Connect(
                    "the upstream closed the connection before the request".into(),
                )));
            }
            conn.send.poll_ready(cx).map_err(SendError::Request)
        })
        .await;
        ready.map(|()| (conn, false))
    }

    /// Sends `request` (its URI in origin form, with a `Host` header) and waits for the
    /// answer's headers, driving the connection meanwhile. The answer's body drives it on.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let (mut conn, reused) = self.ready_conn().await?;
            let mut answer = std::pin::pin!(conn.send.try_send_request(request));
            let result = poll_fn(|cx| {
                // Once the connection ended (and was dropped), the answer resolves: the request
                // comes back if it was never written, or fails.
                conn.drive(cx);
                answer.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let body = UpstreamBody {
                        body,
                        conn: conn.conn.is_some().then_some(conn),
                        pool: Arc::downgrade(self),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut err) => match err.take_message() {
                    // Never written: the upstream did not see it. Once more, on another
                    // connection, when this one was an idle one that the upstream had closed
                    // (each try throws one such connection away, so this ends).
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
    }
}

/// An answer's body from the upstream, which drives its connection while it is read and
/// returns it to the pool at its end.
pub struct UpstreamBody {
    body: Incoming,
    conn: Option<Box<Conn>>,
    pool: Weak<Pool>,
}

impl UpstreamBody {
    /// The next frame, driving the connection for it.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut drove = false;
        loop {
            if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
                if frame.is_none() {
                    // Read to its end: the connection may take the next request.
                    if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.upgrade()) {
                        pool.put_back(conn);
                    }
                }
                return Poll::Ready(frame);
            }
            // The connection ended (the body has its end or its error already), or it read
            // what it could and handed over nothing more.
            let Some(conn) = self.conn.as_mut().filter(|_| !drove) else {
                return Poll::Pending;
            };
            drove = true;
            if conn.drive(cx) {
                self.conn = None;
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.get_mut().poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    /// A body left at its very end (a stream relay stops at its last event, before the
    /// upstream's end of body, which is usually in the same read) still returns its connection;
    /// one left anywhere else closes it.
    fn drop(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // A trailing empty frame may come before the end.
        for _ in 0..2 {
            match self.poll_next(&mut cx) {
                Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
                _ => return,
            }
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}
