//! relay's side of a client's HTTP/1.1 connection: reading request heads, framing request and
//! response bodies, keep-alive, and noticing a client that has gone.
//!
//! relay serves its clients itself rather than through hyper's server connection, which gives
//! every connection an 8 KiB read buffer and an 8 KiB write buffer for as long as it lives
//! (16.5 of the 25 KiB a relayed stream held) and copies every response chunk into its write
//! buffer. Here a connection holds no buffer between requests (a read buffer is taken when
//! bytes arrive and let go once they are handed over), a request's headers are cut out of the
//! bytes read without a copy, and a response is written straight from its body's chunks with
//! one `writev` per chunk (a small answer and its head go out in one).
//!
//! The request body is read by the handler, when and if it wants it, from the connection's
//! socket (through [`RequestBody`]); a body left unread ends the connection after the answer.
//! While a handler works and while a stream waits for its next chunk, the socket is watched:
//! a client that closes its connection drops the handler, its upstream request and its
//! stream (as hyper does). Heads are parsed by `httparse` (hyper's parser); the framing rules
//! are RFC 9112's, section 6, with a request that gives both `Content-Length` and
//! `Transfer-Encoding` refused rather than guessed at (request smuggling). No HTTP/2, no
//! upgrades: TLS and HTTP/2 belong to the proxy in front of relay.
//!
//! (Over 400 lines: a connection's reading, framing and writing share its socket and read
//! buffer, and are kept together; about a third of the file is their tests.)

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::IoSlice;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::{ErrorEnvelope, error_code_for, error_type_for};
use crate::relay::h1::Decoder;

/// What a connection is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a request's head may take to arrive, counted from the end of the previous
    /// answer (so it is also how long a keep-alive connection may stay idle).
    pub head_timeout: Duration,
    /// The largest request head (line and headers); larger ones are answered `431`.
    pub max_head_bytes: usize,
}

/// Most headers accepted in a request; more are answered `431`.
const MAX_HEADERS: usize = 100;
/// How much room a read is given (a request head with its small body, usually).
const READ_BYTES: usize = 4 * 1024;
/// Most room a read of a request body is given at once.
const MAX_BODY_READ_BYTES: usize = 64 * 1024;
/// Closing a connection whose request body was not read, relay keeps reading (and dropping)
/// what the client still sends for at most this long and this much, so that the client
/// reads the answer before a reset (which unread bytes would cause) could destroy it.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1024 * 1024;
/// What `Expect: 100-continue` is answered with, once the handler reads the body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The connection, shared by the connection's task (which writes) and the current request's
/// body (which reads).
#[derive(Debug)]
struct Shared {
    tcp: TcpStream,
    read: Mutex<ReadSide>,
}

#[derive(Debug)]
struct ReadSide {
    /// Bytes read and not handed over yet. No allocation while there are none.
    buf: BytesMut,
    /// The current request's body; done between requests.
    body: Decoder,
    /// Bytes of the `100 Continue` answer still to be sent before the body is read.
    continue_owed: usize,
}

impl ReadSide {
    /// Lets go of the read buffer's memory when all it held was handed over (the handed-over
    /// bytes keep their own part alive), so that a connection waiting on its answer, or on
    /// its stream's next chunk, holds no buffer.
    fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// After a piece of the body: reads past the framing that follows it (a chunk's end, the
    /// last chunk), so that the buffer can be let go as soon as the body has ended.
    fn skip_framing(&mut self) {
        let _ = self.body.skip_framing(&mut self.buf); // an error shows at the next read
        if self.body.is_done() {
            self.release();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ReadSide> {
        self.read.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ready when the client has closed the connection (or it failed). Only watched while
    /// no request body is being read (the body's own reads see its end); bytes of the next
    /// request that arrive meanwhile are kept, up to a head's worth.
    fn poll_gone(&self, cx: &mut Context<'_>, max_head_bytes: usize) -> Poll<()> {
        let mut side = self.lock();
        if !side.body.is_done() {
            return Poll::Pending;
        }
        loop {
            if side.buf.len() >= max_head_bytes {
                return Poll::Pending;
            }
            if ready!(self.tcp.poll_read_ready(cx)).is_err() {
                return Poll::Ready(());
            }
            if side.buf.capacity() - side.buf.len() < 512 {
                side.buf.reserve(1024);
            }
            match self.tcp.try_read_buf(&mut side.buf) {
                Ok(0) => return Poll::Ready(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(()),
            }
        }
    }

    /// Drops what is left of a request body the handler did not read, if it is here already
    /// (a small body arrives with its head) or arrives without waiting, up to
    /// `MAX_BODY_READ_BYTES`. Whether the body is over: if not, the connection cannot carry
    /// another request.
    fn drain_unread(&self) -> bool {
        let mut guard = self.lock();
        let side = &mut *guard;
        let mut dropped = 0;
        while !side.body.is_done() && dropped <= MAX_BODY_READ_BYTES {
            match side.body.decode(&mut side.buf) {
                Ok(Some(piece)) => dropped += piece.len(),
                Ok(None) if side.body.is_done() => {}
                Ok(None) => {
                    if side.buf.capacity() - side.buf.len() < 1024 {
                        side.buf.reserve(READ_BYTES);
                    }
                    match self.tcp.try_read_buf(&mut side.buf) {
                        Ok(n) if n > 0 => {}
                        _ => return false,
                    }
                }
                Err(_) => return false,
            }
        }
        side.release();
        side.body.is_done()
    }

    /// Writes all of `bufs`.
    async fn write_all(&self, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.tcp.try_write_vectored(bufs) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.tcp.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A request's body, read from the connection as the handler polls it.
#[derive(Debug)]
pub struct RequestBody {
    shared: Arc<Shared>,
}

impl RequestBody {
    fn poll_continue(
        &self,
        cx: &mut Context<'_>,
        side: &mut ReadSide,
    ) -> Poll<std::io::Result<()>> {
        while side.continue_owed > 0 {
            ready!(self.shared.tcp.poll_write_ready(cx))?;
            let from = CONTINUE.len() - side.continue_owed;
            match self.shared.tcp.try_write(&CONTINUE[from..]) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => side.continue_owed -= n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let side = &mut *guard;
        if side.body.is_done() {
            return Poll::Ready(None);
        }
        loop {
            match side.body.decode(&mut side.buf) {
                Ok(Some(bytes)) => {
                    side.skip_framing();
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Ok(None) if side.body.is_done() => {
                    side.release();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(invalid(e.to_string())))),
            }
            if side.continue_owed > 0 {
                ready!(this.poll_continue(cx, side))?;
            }
            if side.buf.capacity() - side.buf.len() < 1024 {
                let want = side.body.remaining().map_or(READ_BYTES, |n| {
                    usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .clamp(READ_BYTES, MAX_BODY_READ_BYTES)
                });
                side.buf.reserve(want);
            }
            ready!(this.shared.tcp.poll_read_ready(cx))?;
            match this.shared.tcp.try_read_buf(&mut side.buf) {
                Ok(0) => {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the client closed the connection before the end of the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.shared.lock().body.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.shared.lock().body.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// Why a request was refused before it reached the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// 400, with what is wrong.
    Bad(&'static str),
    /// 431: the head is too large or has too many headers.
    HeadTooLarge,
    /// 501: a transfer coding relay does not decode.
    Coding,
}

/// A request's head, parsed, and how its body is framed.
struct Parsed {
    request: Request<()>,
    body: Decoder,
    keep_alive: bool,
    expect_continue: bool,
}

/// Serves `tcp` until the client closes it, an answer ends it, it stays idle for longer than
/// `limits.head_timeout`, or `shutdown` turns true (at once if idle, else after the answer in
/// progress). `service` answers each request.
pub async fn serve<S, F, B, E>(
    tcp: TcpStream,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    mut service: S,
) where
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
    E: std::fmt::Display,
{
    let shared = Arc::new(Shared {
        tcp,
        read: Mutex::new(ReadSide {
            buf: BytesMut::new(),
            body: Decoder::length(0),
            continue_owed: 0,
        }),
    });
    let mut out = Vec::new();
    let unread = loop {
        let parsed = match read_head(&shared, limits, &mut shutdown).await {
            Ok(Some(parsed)) => parsed,
            Ok(None) => break false,
            Err(refusal) => {
                refuse(&shared, refusal, &mut out).await;
                break true;
            }
        };
        let Parsed {
            request,
            body,
            mut keep_alive,
            expect_continue,
        } = parsed;
        {
            let mut side = shared.lock();
            side.continue_owed = if expect_continue && !body.is_done() {
                CONTINUE.len()
            } else {
                0
            };
            side.body = body;
        }
        let _serving = crate::turn::Serving::start();
        let is_head = request.method() == Method::HEAD;
        let version = request.version();
        let request = request.map(|()| RequestBody {
            shared: shared.clone(),
        });
        let answered = {
            let mut answer = pin!(service(request));
            poll_fn(|cx| {
                if let Poll::Ready(answer) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Some(answer));
                }
                ready!(shared.poll_gone(cx, limits.max_head_bytes));
                Poll::Ready(None)
            })
            .await
        };
        let response = match answered {
            Some(Ok(response)) => response,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "the service failed: closing the connection");
                break true;
            }
            None => break false, // the client left
        };
        if shutdown.has_changed().unwrap_or(true) {
            keep_alive = false;
        }
        if !shared.drain_unread() {
            keep_alive = false; // the body was not read: the connection is not in step
        }
        let written = write_response(
            &shared,
            response,
            is_head,
            version,
            &mut keep_alive,
            &mut out,
            limits,
        )
        .await;
        if written.is_err() || !keep_alive {
            break !shared.lock().body.is_done();
        }
        // Between requests the connection holds no buffer.
        if out.capacity() > 1024 {
            out = Vec::new();
        }
        let mut side = shared.lock();
        if side.buf.is_empty() {
            side.buf = BytesMut::new();
        }
    };
    close(shared, unread).await;
}

/// Reads the next request's head. `Ok(None)` when the connection is over: closed by the
/// client, idle past the timeout, or shutting down while idle.
async fn read_head(
    shared: &Shared,
    limits: Limits,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Parsed>, Refusal> {
    let timer = tokio::time::sleep(limits.head_timeout);
    let mut timer = pin!(timer);
    let mut stopping = pin!(shutdown.changed());
    poll_fn(|cx| {
        let mut guard = shared.lock();
        let side = &mut *guard;
        loop {
            if !side.buf.is_empty()
                && let Some(parsed) = parse(&mut side.buf, limits.max_head_bytes)?
            {
                return Poll::Ready(Ok(Some(parsed)));
            }
            if side.buf.capacity() - side.buf.len() < 512 {
                side.buf.reserve(READ_BYTES);
            }
            match read_some(&shared.tcp, &mut side.buf) {
                // Closed (between requests, or in the middle of a head: nobody to answer).
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Poll::Ready(Ok(None)),
            }
            // Idle between requests: a shutdown ends the connection now.
            if side.buf.is_empty() && stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(None));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(None));
            }
            match shared.tcp.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(None)),
                Poll::Ready(Ok(())) => {}
            }
        }
    })
    .await
}

/// Reads what `tcp` holds into `buf`. A read that does not fill the room it had has taken
/// all there was, and tokio is told so: the next wait for the client (for it to leave while
/// the handler works, or for its next request, or the rest of its body) then goes to epoll
/// without first a read that finds nothing (`EAGAIN`), one system call a request.
///
/// The readiness cleared is the one seen *before* the read (tokio clears it only if no event
/// came since): bytes that arrive during or just after the read raise it again and are read.
/// Clearing what is seen after the read would wipe out their event, and a body that follows
/// its head by a few microseconds would wait for the body timeout. A close still shows: tokio
/// keeps a socket's closed state when its readiness is cleared.
fn read_some(tcp: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    let would_block = || std::io::Error::from(std::io::ErrorKind::WouldBlock);
    let room = buf.capacity() - buf.len();
    let mut read = 0;
    let outcome = tcp.try_io(tokio::io::Interest::READABLE, || {
        read = tcp.try_read_buf(buf)?;
        if read > 0 && read < room {
            Err(would_block()) // clears the readiness seen before the read
        } else {
            Ok(read)
        }
    });
    match outcome {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && read > 0 => Ok(read),
        other => other,
    }
}

/// Takes a request head from the front of `buf`: `Ok(None)` while it is incomplete.
fn parse(buf: &mut BytesMut, max_head_bytes: usize) -> Result<Option<Parsed>, Refusal> {
    let (len, method, target, version, fields) = {
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= max_head_bytes => len,
            Ok(httparse::Status::Complete(_)) => return Err(Refusal::HeadTooLarge),
            Ok(httparse::Status::Partial) if buf.len() >= max_head_bytes => {
                return Err(Refusal::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadTooLarge),
            Err(httparse::Error::Version) => {
                return Err(Refusal::Bad("only HTTP/1.0 and HTTP/1.1 are spoken here"));
            }
            Err(_) => return Err(Refusal::Bad("malformed request line or header")),
        };
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| s.as_ptr() as usize - base;
        let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
            .map_err(|_| Refusal::Bad("invalid method"))?;
        let path = parsed.path.unwrap_or_default().as_bytes();
        let target = (offset(path), path.len());
        // Each header's name, and where its value lies in `buf`, so that the value can be cut
        // out of the head's copy. (Sized to the headers there are: an array for the most
        // allowed was zeroed, 3 KiB, for every request.)
        let mut fields = Vec::with_capacity(parsed.headers.len());
        for header in parsed.headers.iter() {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|_| Refusal::Bad("invalid header name"))?;
            let at = offset(header.value);
            fields.push((name, at, at + header.value.len()));
        }
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        (len, method, target, version, fields)
    };
    // Copied out at its size, so that a header value kept by a handler (for a stream's whole
    // life) holds a few hundred bytes rather than the read buffer; an emptied read buffer
    // is let go, so that a connection waiting on its answer holds none.
    let head = Bytes::copy_from_slice(&buf[..len]);
    if len == buf.len() {
        *buf = BytesMut::new();
    } else {
        bytes::Buf::advance(buf, len);
    }
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.0 + target.1))
        .map_err(|_| Refusal::Bad("invalid request target"))?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, from, to) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(from..to))
            .map_err(|_| Refusal::Bad("invalid header value"))?;
        headers.append(name, value);
    }
    let body = framing(&headers, version)?;
    let close = has_token(&headers, &header::CONNECTION, "close");
    let keep_alive = match version {
        Version::HTTP_10 => !close && has_token(&headers, &header::CONNECTION, "keep-alive"),
        _ => !close,
    };
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Parsed {
        request,
        body,
        keep_alive,
        expect_continue,
    }))
}

/// How a request's body is framed (RFC 9112, 6.3): chunked, a length, or none.
fn framing(headers: &HeaderMap, version: Version) -> Result<Decoder, Refusal> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(Refusal::Bad(
                "a request cannot have both Content-Length and Transfer-Encoding",
            ));
        }
        if version == Version::HTTP_10 {
            return Err(Refusal::Bad("HTTP/1.0 has no Transfer-Encoding"));
        }
        let codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty());
        let (count, last) = codings.fold((0, None), |(n, _), c| (n + 1, Some(c)));
        return match last {
            // Chunked must come last, or the body's end is unknown (RFC 9112, 6.3).
            Some(c) if c.eq_ignore_ascii_case(b"chunked") && count == 1 => Ok(Decoder::chunked()),
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => Err(Refusal::Coding),
            _ => Err(Refusal::Bad(
                "the request body's length cannot be determined",
            )),
        };
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value
            .as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
        {
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or(Refusal::Bad("invalid Content-Length"))?;
            if length.is_some_and(|seen| seen != n) {
                return Err(Refusal::Bad("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(Decoder::length(length.unwrap_or(0)))
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How a response's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`HEAD`, `204`, `304`).
    None,
    /// This many bytes are left (`Content-Length`).
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    Close,
}

/// What happened while a response waited for its body.
enum Next<F> {
    /// The body's next frame, or its end.
    Frame(F),
    /// Nothing yet, and the head is still to be sent.
    Flush,
    /// The client left.
    Gone,
}

/// Writes `response`: its head, then its body as it comes, watching for the client to leave.
/// Clears `keep_alive` when the connection cannot carry another request after it.
async fn write_response<B>(
    shared: &Shared,
    response: Response<B>,
    is_head: bool,
    version: Version,
    keep_alive: &mut bool,
    out: &mut Vec<u8>,
    limits: Limits,
) -> Result<(), ()>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // The answers ready in this turn of the runtime go out back to back, so that the client
    // wakes once for them all (`crate::turn`).
    crate::turn::before_write().await;
    let (parts, body) = response.into_parts();
    let status = parts.status;
    if has_token(&parts.headers, &header::CONNECTION, "close") {
        *keep_alive = false;
    }
    let bodiless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let mut framing = match exact {
        _ if bodiless => Framing::None,
        Some(n) => Framing::Length(n),
        None if version == Version::HTTP_11 => Framing::Chunked,
        None => {
            *keep_alive = false;
            Framing::Close
        }
    };
    // One allocation for the head, of its size: grown by doubling from nothing, a 700-byte
    // head took eight (and ended over the 1 KiB that a connection keeps between requests).
    out.clear();
    out.reserve(
        parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
            + HEAD_SLACK,
    );
    start_head(out, status);
    for (name, value) in &parts.headers {
        // Framing is said below, from the body itself; an answer to HEAD keeps the length
        // its GET would have had.
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && !is_head)
        {
            continue;
        }
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        Framing::Length(n) => {
            push_header(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            );
        }
        Framing::Chunked => push_header(out, b"transfer-encoding", b"chunked"),
        Framing::None | Framing::Close => {}
    }
    if !*keep_alive {
        push_header(out, b"connection", b"close");
    } else if version == Version::HTTP_10 {
        push_header(out, b"connection", b"keep-alive");
    }
    push_date(out);
    out.extend_from_slice(b"\r\n");
    drop(parts);
    if framing == Framing::None {
        return shared
            .write_all(&mut [IoSlice::new(out)])
            .await
            .map_err(drop);
    }
    let mut body = pin!(body);
    loop {
        // A frame that is there already goes out with what is pending (the head); otherwise
        // the pending bytes leave first, then the frame is waited for, the client watched.
        let next = poll_fn(|cx| {
            if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                return Poll::Ready(Next::Frame(frame));
            }
            if !out.is_empty() {
                return Poll::Ready(Next::Flush);
            }
            ready!(shared.poll_gone(cx, limits.max_head_bytes));
            Poll::Ready(Next::Gone)
        })
        .await;
        let frame = match next {
            Next::Frame(frame) => frame,
            Next::Flush => {
                shared
                    .write_all(&mut [IoSlice::new(out)])
                    .await
                    .map_err(drop)?;
                out.clear();
                continue;
            }
            Next::Gone => return Err(()),
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // trailers: not sent
                };
                // A body that says it has ended is not polled again: its end goes out with
                // its last bytes (the last chunk with a stream's last event).
                let last = body.is_end_stream();
                let mut tail: &[u8] = b"";
                match &mut framing {
                    Framing::Length(left) => {
                        let room = usize::try_from(*left).unwrap_or(usize::MAX);
                        if data.len() > room {
                            // A body longer than it said: what fits, and the connection ends.
                            data.truncate(room);
                            *keep_alive = false;
                        }
                        *left -= data.len() as u64;
                    }
                    Framing::Chunked if !data.is_empty() => {
                        push_chunk_size(out, data.len());
                        tail = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
                    }
                    Framing::Chunked if last => tail = b"0\r\n\r\n",
                    Framing::Chunked | Framing::Close | Framing::None => {}
                }
                shared
                    .write_all(&mut [IoSlice::new(out), IoSlice::new(&data), IoSlice::new(tail)])
                    .await
                    .map_err(drop)?;
                out.clear();
                if last {
                    // Shorter than it said: the client must not wait for the rest.
                    return match framing {
                        Framing::Length(left) if left > 0 => Err(()),
                        _ => Ok(()),
                    };
                }
            }
            Some(Err(err)) => {
                // The answer cannot be finished: the connection ends without its end, so
                // that the client sees a broken answer rather than a short one.
                tracing::debug!(error = %err, "a response body failed: closing the connection");
                if !out.is_empty() {
                    let _ = shared.write_all(&mut [IoSlice::new(out)]).await;
                }
                return Err(());
            }
            None => {
                let mut short = false;
                match framing {
                    Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    Framing::Length(left) if left > 0 => short = true,
                    _ => {}
                }
                if !out.is_empty() {
                    shared
                        .write_all(&mut [IoSlice::new(out)])
                        .await
                        .map_err(drop)?;
                }
                // Shorter than it said: the client must not wait for the rest.
                return if short { Err(()) } else { Ok(()) };
            }
        }
    }
}

/// Appends `n` in hexadecimal and a CRLF: a chunk-size line.
fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// Room in an answer's head beyond its headers: the status line, framing, `Connection`, `Date`
/// and the blank line, with room for a stream's first chunk size.
const HEAD_SLACK: usize = 160;

/// Empties `out` and starts an answer's head in it: the status line.
fn start_head(out: &mut Vec<u8>, status: StatusCode) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// The `Date` header's value, remade once a second per thread.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [b' '; 29])) };
}

fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == date.1.len() {
                date.1.copy_from_slice(text.as_bytes());
                date.0 = secs;
            }
        }
        push_header(out, b"date", &date.1);
    });
}

/// Answers a request refused before routing, in the OpenAI envelope, and ends the connection.
async fn refuse(shared: &Shared, refusal: Refusal, out: &mut Vec<u8>) {
    let (status, message) = match refusal {
        Refusal::Bad(message) => (StatusCode::BAD_REQUEST, message),
        Refusal::HeadTooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head (line and headers) is too large",
        ),
        Refusal::Coding => (
            StatusCode::NOT_IMPLEMENTED,
            "only the chunked transfer coding is accepted",
        ),
    };
    let code = match status.as_u16() {
        431 => "request_header_too_large",
        501 => "unsupported_transfer_coding",
        _ => error_code_for(status),
    };
    let body =
        ErrorEnvelope::new(error_type_for(status), message, Some(code.to_owned()), None).to_bytes();
    start_head(out, status);
    push_header(out, b"content-type", b"application/json");
    push_header(out, b"x-content-type-options", b"nosniff");
    push_header(
        out,
        b"content-length",
        itoa::Buffer::new().format(body.len()).as_bytes(),
    );
    push_header(out, b"connection", b"close");
    push_date(out);
    out.extend_from_slice(b"\r\n");
    let _ = shared
        .write_all(&mut [IoSlice::new(out), IoSlice::new(&body)])
        .await;
}

/// Ends the connection. With `unread` bytes from the client possibly still coming, its
/// sending side is closed first and what arrives is read and dropped for a short while, so
/// that the answer is not lost to a reset.
async fn close(shared: Arc<Shared>, unread: bool) {
    let Ok(shared) = Arc::try_unwrap(shared) else {
        return; // a body still holds the socket: it closes when that goes
    };
    let mut tcp = shared.tcp;
    if !unread {
        return;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tcp).await;
    let mut drained = 0;
    // The scratch buffer lives on the stack of each poll, not in every connection's task.
    let _ = tokio::time::timeout(
        LINGER,
        poll_fn(|cx| {
            let mut sink = [0u8; 4096];
            while drained < LINGER_BYTES {
                if ready!(tcp.poll_read_ready(cx)).is_err() {
                    return Poll::Ready(());
                }
                match tcp.try_read(&mut sink) {
                    Ok(0) => return Poll::Ready(()),
                    Ok(n) => drained += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Poll::Ready(()),
                }
            }
            Poll::Ready(())
        }),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::{BodyExt as _, Full, StreamBody};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

    const LIMITS: Limits = Limits {
        head_timeout: Duration::from_millis(500),
        max_head_bytes: 4096,
    };

    /// Serves connections on a fresh port: `POST /echo` answers with the body it read, `GET
    /// /stream` with three chunks 50 ms apart, `/wait` after 10 s, `/ignore` without reading
    /// the body. `dropped` counts handlers dropped before their end.
    async fn spawn() -> (std::net::SocketAddr, watch::Sender<bool>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopping) = watch::channel(false);
        let dropped = Arc::new(AtomicUsize::new(0));
        let counter = dropped.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let counter = counter.clone();
                tokio::spawn(serve(tcp, LIMITS, stopping.clone(), move |req| {
                    handle(req, counter.clone())
                }));
            }
        });
        (addr, stop, dropped)
    }

    struct CountDrop(Arc<AtomicUsize>, bool);
    impl Drop for CountDrop {
        fn drop(&mut self) {
            if !self.1 {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn handle(
        req: Request<RequestBody>,
        dropped: Arc<AtomicUsize>,
    ) -> Result<Response<Boxed>, std::convert::Infallible> {
        let mut guard = CountDrop(dropped.clone(), false);
        let path = req.uri().path().to_owned();
        let answer = match path.as_str() {
            "/echo" => match req.into_body().collect().await {
                Ok(body) => Full::new(body.to_bytes())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
                Err(e) => Full::new(Bytes::from(format!("error: {e}")))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            },
            "/stream" => {
                let chunks = futures_util::stream::unfold(0, move |n| {
                    let dropped = dropped.clone();
                    async move {
                        if n == 3 {
                            return None;
                        }
                        let guard = CountDrop(dropped, false);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        std::mem::forget(guard);
                        Some((Ok(Frame::data(Bytes::from(format!("event {n}\n")))), n + 1))
                    }
                });
                StreamBody::new(chunks).boxed_unsync()
            }
            "/wait" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Full::new(Bytes::from_static(b"late"))
                    .map_err(|never| match never {})
                    .boxed_unsync()
            }
            _ => Full::new(Bytes::from_static(b"ignored"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        };
        guard.1 = true;
        Ok(Response::new(answer))
    }

    /// Sends `raw`, then reads until the connection closes (at most 3 s).
    async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        read_to_end(&mut tcp).await
    }

    /// Reads until the connection ends (closed or reset); fails after 3 s.
    async fn read_to_end(tcp: &mut TcpStream) -> String {
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut seen))
            .await
            .expect("relay closes the connection");
        String::from_utf8_lossy(&seen).into_owned()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (addr, _stop, _) = spawn().await;
        let answer = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloPOST /echo HTTP/1.1\r\n\
              host: x\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\
              x-trailer: t\r\n\r\nGET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let answers: Vec<&str> = answer.split("HTTP/1.1 200 OK\r\n").skip(1).collect();
        assert_eq!(answers.len(), 3, "{answer}");
        assert!(
            answers[0].contains("content-length: 5\r\n") && answers[0].ends_with("\r\n\r\nhello")
        );
        assert!(answers[1].ends_with("\r\n\r\nabcde"), "{}", answers[1]);
        assert!(
            answers[2].contains("content-length: 0\r\n"),
            "{}",
            answers[2]
        );
        assert!(
            answers[2].contains("connection: close\r\n"),
            "{}",
            answers[2]
        );
        assert!(answers[0].contains("\r\ndate: ") || answers[0].starts_with("date: "));
    }

    #[tokio::test]
    async fn ambiguous_or_broken_framing_is_refused_with_the_envelope() {
        let (addr, _stop, _) = spawn().await;
        for (raw, status, code) in [
            (
                "POST /echo HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                "400",
                "bad_request",
            ),
            (
                "POST /echo HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
                "400",
                "bad_request",
            ),
            (
                "POST /echo HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
                "400",
                "bad_request",
            ),
            (
                "POST /echo HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
                "400",
                "bad_request",
            ),
            (
                "POST /echo HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                "501",
                "unsupported_transfer_coding",
            ),
            (
                "POST /echo HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                "400",
                "bad_request",
            ),
            (
                "GET /echo HTTP/1.1\r\nbad header\r\n\r\n",
                "400",
                "bad_request",
            ),
            ("GET /echo HTTP/2.0\r\n\r\n", "400", "bad_request"),
        ] {
            let answer = exchange(addr, raw.as_bytes()).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{raw:?}: {answer}"
            );
            assert!(answer.contains("connection: close\r\n"), "{answer}");
            let body = answer.split_once("\r\n\r\n").unwrap().1;
            let body: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["error"]["code"], code, "{raw:?}");
        }
    }

    #[tokio::test]
    async fn heads_beyond_the_limits_are_answered_431() {
        let (addr, _stop, _) = spawn().await;
        let long = format!("GET /echo HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(5000));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
        let many = format!("GET /echo HTTP/1.1\r\n{many}\r\n");
        // Never ending: the limit is on what is buffered, not on a complete head.
        let endless = format!("GET /echo HTTP/1.1\r\nx-big: {}", "a".repeat(5000));
        for raw in [long, many, endless] {
            let answer = exchange(addr, raw.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        }
    }

    #[tokio::test]
    async fn head_http_1_0_and_continue_are_spoken_as_rfc_9112_says() {
        let (addr, _stop, _) = spawn().await;
        // HEAD: the headers of the answer, no body, the connection kept.
        let answer = exchange(
            addr,
            b"HEAD /other HTTP/1.1\r\n\r\nGET /other HTTP/1.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        assert!(answer.ends_with("\r\n\r\nignored"), "{answer}");
        assert_eq!(answer.matches("ignored").count(), 1, "{answer}");
        // HTTP/1.0: a stream of unknown length ends with the connection, not chunked.
        let answer = exchange(addr, b"GET /stream HTTP/1.0\r\n\r\n").await;
        assert!(!answer.contains("transfer-encoding"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(
            answer.ends_with("\r\n\r\nevent 0\nevent 1\nevent 2\n"),
            "{answer}"
        );
        // HTTP/1.1: the same stream chunked.
        let answer = exchange(addr, b"GET /stream HTTP/1.1\r\nconnection: close\r\n\r\n").await;
        assert!(
            answer.contains("transfer-encoding: chunked\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with(
                "\r\n\r\n8\r\nevent 0\n\r\n8\r\nevent 1\n\r\n8\r\nevent 2\n\r\n0\r\n\r\n"
            ),
            "{answer}"
        );
        // Expect: 100-continue is answered when the body is read, then the answer follows.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"POST /echo HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut interim = [0u8; CONTINUE.len()];
        tcp.read_exact(&mut interim).await.unwrap();
        assert_eq!(&interim[..], CONTINUE);
        tcp.write_all(b"ok").await.unwrap();
        let answer = read_to_end(&mut tcp).await;
        assert!(
            answer.starts_with("HTTP/1.1 200 OK") && answer.ends_with("\r\n\r\nok"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn an_unread_body_ends_the_connection_after_the_answer_unless_it_was_all_there() {
        let (addr, _stop, _) = spawn().await;
        // All of it came with the head: dropped, and the connection serves the next request.
        let answer = exchange(
            addr,
            b"POST /ignore HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET /ignore HTTP/1.1\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        // Most of it still to come: answered, then closed (not read as a next request).
        let answer = exchange(
            addr,
            b"POST /ignore HTTP/1.1\r\ncontent-length: 100000\r\n\r\nabc",
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_its_handler_and_its_stream() {
        let (addr, _stop, dropped) = spawn().await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /wait HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(tcp);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the waiting handler was dropped"
        );
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /stream HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 64];
        let _ = tcp.read(&mut first).await.unwrap();
        drop(tcp);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "the stream was dropped mid-way"
        );
    }

    /// A body sent just after its head (two writes, as HTTP clients do) may arrive while the
    /// connection tells the runtime it has read all there was: it must still be read. The
    /// clients are threads of their own, so that the bodies follow their heads by a few
    /// microseconds, a spread of delays around the time the server takes to read a head.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_that_follows_its_head_closely_is_never_missed() {
        use std::io::{Read as _, Write as _};
        let (addr, _stop, _) = spawn().await;
        let clients: Vec<_> = (0..4)
            .map(|client| {
                std::thread::spawn(move || {
                    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
                    tcp.set_nodelay(true).unwrap();
                    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut answer = vec![0u8; 512];
                    for i in 0..400u64 {
                        tcp.write_all(b"POST /echo HTTP/1.1\r\ncontent-length: 5\r\n\r\n")
                            .unwrap();
                        std::thread::sleep(Duration::from_micros((i * 7 + client * 3) % 120));
                        tcp.write_all(b"hello").unwrap();
                        let mut seen = 0;
                        while !answer[..seen].ends_with(b"\r\n\r\nhello") {
                            let n = tcp
                                .read(&mut answer[seen..])
                                .expect("the body was read and answered within 2 s");
                            assert!(n > 0, "closed");
                            seen += n;
                        }
                    }
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            for client in clients {
                client.join().unwrap();
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_head_timeout_and_at_shutdown() {
        let (addr, stop, _) = spawn().await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(read_to_end(&mut idle).await, "");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // A slow head is cut at the same time: the timeout is for the head, not each read.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let start = std::time::Instant::now();
        for _ in 0..10 {
            if slow.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(read_to_end(&mut slow).await, "");
        assert!(start.elapsed() < Duration::from_millis(1500));
        // Shutdown: an idle keep-alive connection closes at once.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /other HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 1024];
        let n = kept.read(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).ends_with("ignored"));
        let start = std::time::Instant::now();
        stop.send(true).unwrap();
        assert_eq!(read_to_end(&mut kept).await, "");
        assert!(start.elapsed() < Duration::from_millis(300));
    }
}
