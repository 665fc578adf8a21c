//! The upstream's HTTP/1.1 connections, each driven by the request that is using it.
//!
//! A request checks a connection out of the pool, writes itself on it and reads the answer's
//! head, in its own task; the answer's body ([`UpstreamBody`]) reads on as it is polled, and
//! whatever one read brings is handed over in the same poll, cut out of the bytes read without
//! a copy ([`super::h1`] speaks the protocol). The connection goes back to the pool when the
//! body has been read to its end. A body dropped before its end (a client gone mid-stream)
//! drops its connection, which closes it. Between reads a connection holds no buffer: a paced
//! stream costs its socket and little else.
//!
//! Idle connections are not polled; one that the upstream closed meanwhile is found out when it
//! is checked out (it reads as ended) and is thrown away. A request whose write failed on a
//! reused connection before the socket took any byte of it is sent once more on another one:
//! the upstream cannot have received it whole (its length is declared), so it cannot run it or
//! bill it. (Over TLS, a failed write may have delivered some whole records of a request; never
//! all of it.) Nothing else is ever retried, and a connection the upstream closes just as it is
//! reused fails its request (a 502), as with hyper's client.
//!
//! HTTP/1.1 only, also over TLS (ALPN offers `http/1.1` alone), as nginx speaks to its
//! upstreams: one connection per request in flight, and no connection-level flow control
//! between an event and the client. A request is written whole before its answer is read: an
//! upstream that answers (say, 413) without reading a body larger than the socket buffers
//! fails the request as a connection error instead.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tower::Service as _;

use super::h1::{self, Decoder, WireError};

/// A connection's socket: TCP itself, or TLS through hyper-rustls's stream (which speaks hyper's
/// I/O traits, adapted back to tokio's). Plain TCP skips both adapters on every read and write.
enum Io {
    Plain(TcpStream),
    Tls(Box<TokioIo<MaybeHttpsStream<TokioIo<TcpStream>>>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// How much room a read is given: an event or two of a stream, a small answer whole.
const READ_BYTES: usize = 8 * 1024;
/// Below this much room left in the buffer, a read gets a fresh [`READ_BYTES`].
const MIN_READ_ROOM: usize = 1024;

/// One connection.
struct Conn {
    io: Io,
    /// Bytes read and not handed over yet. Empty (no allocation) between reads once all was
    /// handed over.
    buf: BytesMut,
}

impl Conn {
    /// Reads what the socket has into `buf`; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_READ_ROOM {
            self.buf.reserve(READ_BYTES);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    /// Lets go of the buffer's memory when all it held was handed over (the handed-over bytes
    /// keep their own part alive).
    fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Whether an idle connection is still open: nothing to read, not even its end.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut byte);
        self.buf.is_empty()
            && Pin::new(&mut self.io)
                .poll_read(&mut cx, &mut probe)
                .is_pending()
    }

    /// Writes `head` and `body`. On failure, also whether any byte went out.
    async fn write(&mut self, head: &[u8], body: &[u8]) -> Result<(), (bool, std::io::Error)> {
        let total = head.len() + body.len();
        let mut written = 0;
        while written < total {
            let n = poll_fn(|cx| {
                let slices = if written < head.len() {
                    [IoSlice::new(&head[written..]), IoSlice::new(body)]
                } else {
                    [
                        IoSlice::new(&body[written - head.len()..]),
                        IoSlice::new(&[]),
                    ]
                };
                Pin::new(&mut self.io).poll_write_vectored(cx, &slices)
            })
            .await
            .map_err(|e| (written > 0, e))?;
            if n == 0 {
                return Err((written > 0, std::io::ErrorKind::WriteZero.into()));
            }
            written += n;
        }
        poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx))
            .await
            .map_err(|e| (true, e))
    }

    /// Reads the answer's head.
    async fn read_head(&mut self, method: &http::Method) -> Result<h1::Head, WireError> {
        let mut interim = 0;
        poll_fn(|cx| {
            loop {
                if let Some(head) = h1::parse_head(&mut self.buf, method, &mut interim)? {
                    self.release();
                    return Poll::Ready(Ok(head));
                }
                if ready!(self.poll_fill(cx))? == 0 {
                    return Poll::Ready(Err(WireError::Closed));
                }
            }
        })
        .await
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
    /// The exchange failed before the answer's headers arrived.
    Request(WireError),
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

    fn put_back(&self, conn: Box<Conn>) {
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
        let io = match io {
            MaybeHttpsStream::Http(tcp) => Io::Plain(tcp.into_inner()),
            tls => Io::Tls(Box::new(TokioIo::new(tls))),
        };
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::new(),
        }))
    }

    /// A connection for a request: an idle one that is still open, else a new one. `true`
    /// with a reused one.
    async fn ready_conn(&self) -> Result<(Box<Conn>, bool), SendError> {
        while let Some(mut conn) = self.checkout() {
            if conn.is_open() {
                return Ok((conn, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    /// Sends `request` (its URI in origin form, with a `Host` header) and reads the answer's
    /// head. The answer's body reads on from the same connection.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<Bytes>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut head = Vec::with_capacity(512);
        h1::encode_head(&request, &mut head);
        loop {
            let (mut conn, reused) = self.ready_conn().await?;
            // The other requests ready in this turn of the runtime write theirs first, so that
            // the upstream wakes once for them all (`crate::turn`).
            crate::turn::before_write().await;
            match conn.write(&head, request.body()).await {
                Ok(()) => {}
                // The socket took no byte on a connection that the upstream had closed: once
                // more, on another one (each try throws one such connection away, so this ends).
                Err((false, _)) if reused => continue,
                Err((_, err)) => return Err(SendError::Request(err.into())),
            }
            let head = conn
                .read_head(request.method())
                .await
                .map_err(SendError::Request)?;
            let (parts, ()) = head.response.into_parts();
            let mut body = UpstreamBody {
                conn: Some(conn),
                decoder: head.body,
                keep_alive: head.keep_alive,
                pool: Arc::downgrade(self),
            };
            if body.decoder.is_done() {
                body.finish();
            }
            return Ok(Response::from_parts(parts, body));
        }
    }
}

/// An answer's body from the upstream, read from its connection as it is polled; the
/// connection goes back to the pool at the body's end.
pub struct UpstreamBody {
    /// `None` once the body ended or failed.
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    /// Whether the connection may take another request after this answer.
    keep_alive: bool,
    pool: Weak<Pool>,
}

impl UpstreamBody {
    /// The body ended: its connection goes back to the pool if it may carry another request
    /// and nothing was read beyond the answer; else it is closed.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let Some(pool) = self
            .pool
            .upgrade()
            .filter(|_| self.keep_alive && conn.buf.is_empty())
        {
            pool.put_back(conn);
        }
    }

    /// The next piece of the body, reading for it.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, WireError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.decoder.decode(&mut conn.buf) {
                Ok(Some(bytes)) => {
                    // Past a chunk's end too, so that a stream's buffer empties (and is let go)
                    // with each event rather than holding the CRLF that follows it.
                    let _ = self.decoder.skip_framing(&mut conn.buf); // errors show next time
                    conn.release();
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(bytes)));
                }
                Ok(None) if self.decoder.is_done() => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(err) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(err)));
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    // The connection ended: so does a body that lasts until then.
                    self.conn = None;
                    return Poll::Ready(self.decoder.eof().err().map(Err));
                }
                Ok(_) => {}
                Err(err) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(err.into())));
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = WireError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        self.get_mut()
            .poll_next(cx)
            .map(|next| next.map(|piece| piece.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    /// A body left at its very end (a stream relay stops at its last event, before the
    /// upstream's end of body, which is usually in the same read) still returns its connection;
    /// one left anywhere else closes it.
    fn drop(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        while self.conn.is_some() {
            match self.poll_next(&mut cx) {
                // The end's framing is all that may be left.
                Poll::Ready(None) => return,
                _ => self.conn = None,
            }
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("decoder", &self.decoder)
            .finish_non_exhaustive()
    }
}
