//! The Redis backend: one Lua script call per decision (one or two buckets), run atomically by
//! Redis on its own clock.
//!
//! The script is called by its SHA (`EVALSHA`); when Redis answers `NOSCRIPT` (the first call,
//! or after a restart or `SCRIPT FLUSH`) the call is made again with the script itself
//! (`EVAL`, which also caches it).
//!
//! The decision is the one Redis command on the request path, so it is spoken here directly,
//! with no general RESP value in between: the `redis` crate's multiplexed `ConnectionManager`
//! cost about 14,000 instructions a decision (its combine parser, its command builder, its
//! sink and stream machinery). The `redis` crate still reads `REDIS_URL`.
//!
//! Every decision goes over one connection, pipelined: a driver task owns it, takes the calls
//! queued since it last looked, writes them together (one system call, unless the socket takes
//! less) and hands each answer, in order, to the call that asked. Decisions made at the same
//! moment (many requests arriving in one turn of the runtime) then share a write and a read,
//! where a connection a call made a write and a read each: the system calls, not the parsing,
//! were most of what a Redis decision cost relay (issue 14: about eight decisions a write at
//! 64 connections). When the driver wakes for a new call it yields once first, so that the
//! other requests ready in the same turn queue theirs: tokio runs a task woken by another right
//! after it, which would otherwise make every batch a single call.
//!
//! A call cut short (the decision's budget, a client gone) before the driver took it is never
//! sent (the request was decided in memory meanwhile: it must not be charged twice); one cut
//! short after leaves its answer to be read and dropped by the driver, so the connection never
//! loses its place. Bytes that arrive while no call waits end the connection: an answer is
//! never handed to a call that did not ask for it. Everything is bounded: calls queued
//! ([`MAX_QUEUED`]; beyond, a decision waits within its budget), calls written and not yet
//! answered ([`MAX_IN_FLIGHT`]), an answer ([`MAX_ANSWER`] bytes), dialling
//! ([`CONNECT_TIMEOUT`]). A broken connection is an error to every call waiting on it and to
//! every later one; the caller falls back to memory and lets its probe connect again. The
//! driver ends with the last handle to the limiter.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::{ConnectionAddr, ErrorKind, RedisError, RedisResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::Step;
use super::bucket::Decision;

/// The script (see `bucket.lua`); public so that tests can run it with their own clock.
pub const SCRIPT: &str = include_str!("bucket.lua");

/// Calls queued for the driver at most; a decision beyond them waits (within its budget).
pub const MAX_QUEUED: usize = 1024;
/// Calls written and not yet answered at most; the driver takes no more until answers come.
pub const MAX_IN_FLIGHT: usize = 1024;
/// The most bytes an answer may take (a decision's is under 100).
pub const MAX_ANSWER: usize = 64 * 1024;
/// How long dialling and the handshake (`AUTH`, `SELECT`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The Redis backend. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    /// The script's SHA-1, hex.
    sha: String,
    calls: mpsc::Sender<Call>,
    driver: tokio::task::JoinHandle<()>,
    /// Batches written so far.
    batches: Arc<AtomicU64>,
}

impl Drop for Shared {
    /// The last handle gone, nobody can wait for an answer: the driver ends, even if Redis
    /// hangs with answers owed.
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One command for the driver and where its answer goes.
struct Call {
    command: Vec<u8>,
    answer: oneshot::Sender<RedisResult<Answer>>,
}

enum Addr {
    Tcp(String, u16),
    Unix(PathBuf),
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
}

struct Conn {
    stream: Stream,
    buf: BytesMut,
}

/// One RESP2 answer, as far as relay reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// `+OK`, `+PONG`.
    Status,
    /// `-ERR …`: the message.
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$…`: a bulk string (or nil), with its value when it is a whole number (the script
    /// answers levels too large for a Lua number's integer part as text).
    Bulk(Option<i64>),
    /// `*…`: the integers of an array of integers (the script's answer); `None` for anything
    /// else in an array.
    Ints(Option<Vec<i64>>),
}

fn io_error(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::IoError, what))
}

fn protocol_error(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::ResponseError, what))
}

fn closed() -> RedisError {
    io_error("the connection to Redis is closed")
}

impl RedisLimiter {
    /// Connects (fails if Redis does not answer `PING` in time).
    pub async fn connect(client: redis::Client) -> RedisResult<Self> {
        let info = client.get_connection_info();
        let addr = match &info.addr {
            ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            ConnectionAddr::TcpTls { .. } => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "TLS to Redis is not supported",
                )));
            }
        };
        let mut handshake = Vec::new();
        let mut handshake_answers = 0;
        if let Some(password) = &info.redis.password {
            match &info.redis.username {
                Some(user) => encode(
                    &[b"AUTH", user.as_bytes(), password.as_bytes()],
                    &mut handshake,
                ),
                None => encode(&[b"AUTH", password.as_bytes()], &mut handshake),
            }
            handshake_answers += 1;
        }
        if info.redis.db != 0 {
            encode(
                &[b"SELECT", info.redis.db.to_string().as_bytes()],
                &mut handshake,
            );
            handshake_answers += 1;
        }
        let conn =
            match tokio::time::timeout(CONNECT_TIMEOUT, dial(&addr, &handshake, handshake_answers))
                .await
            {
                Ok(conn) => conn?,
                Err(_) => return Err(io_error("Redis did not answer in time")),
            };
        let (calls, queued) = mpsc::channel(MAX_QUEUED);
        let batches = Arc::new(AtomicU64::new(0));
        let limiter = RedisLimiter {
            shared: Arc::new(Shared {
                sha: redis::Script::new(SCRIPT).get_hash().to_owned(),
                calls,
                driver: tokio::spawn(drive(conn, queued, batches.clone())),
                batches,
            }),
        };
        limiter.ping().await?;
        Ok(limiter)
    }

    /// Applies `steps` in order, in one round trip (one script call), stopping after a `take`
    /// that is refused: the decisions of the steps applied.
    pub async fn run(&self, steps: &[Step<'_>]) -> RedisResult<Vec<Decision>> {
        let answer = match self
            .call(script_call(b"EVALSHA", &self.shared.sha, steps))
            .await?
        {
            Answer::Error(e) if e.starts_with("NOSCRIPT") => {
                self.call(script_call(b"EVAL", SCRIPT, steps)).await?
            }
            answer => answer,
        };
        let answer = match answer {
            Answer::Ints(Some(answer)) => answer,
            Answer::Error(e) => {
                return Err(RedisError::from((
                    ErrorKind::ResponseError,
                    "the limit script failed",
                    e,
                )));
            }
            _ => {
                return Err(protocol_error(
                    "the limit script answered an unexpected shape",
                ));
            }
        };
        if answer.is_empty()
            || !answer.len().is_multiple_of(2)
            || answer.len() / 2 > steps.len()
            || answer.iter().any(|n| *n < 0)
        {
            return Err(protocol_error(
                "the limit script answered an unexpected shape",
            ));
        }
        Ok(answer
            .chunks_exact(2)
            .zip(steps)
            .map(|(pair, step)| step.decision(pair[0] == 1, pair[1].unsigned_abs()))
            .collect())
    }

    /// `PING`, for health checks and the recovery probe.
    pub async fn ping(&self) -> RedisResult<()> {
        let mut ping = Vec::new();
        encode(&[b"PING"], &mut ping);
        match self.call(ping).await? {
            Answer::Status => Ok(()),
            Answer::Error(e) => Err(RedisError::from((
                ErrorKind::ResponseError,
                "PING failed",
                e,
            ))),
            _ => Err(protocol_error("unexpected answer to PING")),
        }
    }

    /// How many batches of calls have been written to Redis (each one write of the calls
    /// queued at that moment): for tests of the pipelining.
    #[doc(hidden)]
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Queues `command` for the driver and waits for its answer.
    async fn call(&self, command: Vec<u8>) -> RedisResult<Answer> {
        let (answer, answered) = oneshot::channel();
        self.shared
            .calls
            .send(Call { command, answer })
            .await
            .map_err(|_| closed())?;
        answered.await.map_err(|_| closed())?
    }
}

/// A new connection to `addr`, after the handshake (`AUTH`, `SELECT`) if there is one.
async fn dial(addr: &Addr, handshake: &[u8], handshake_answers: usize) -> RedisResult<Conn> {
    let stream = match addr {
        Addr::Tcp(host, port) => {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            tcp.set_nodelay(true)?;
            Stream::Tcp(tcp)
        }
        #[cfg(unix)]
        Addr::Unix(path) => Stream::Unix(tokio::net::UnixStream::connect(path).await?),
        #[cfg(not(unix))]
        Addr::Unix(_) => return Err(io_error("unix sockets are not supported here")),
    };
    let mut conn = Conn {
        stream,
        buf: BytesMut::with_capacity(READ_ROOM),
    };
    if !handshake.is_empty() {
        conn.stream.write_all(handshake).await?;
        for _ in 0..handshake_answers {
            if let Answer::Error(e) = conn.answer().await? {
                return Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "Redis refused the handshake (AUTH or SELECT)",
                    e,
                )));
            }
        }
        if !conn.buf.is_empty() {
            return Err(protocol_error("Redis answered what was not asked"));
        }
    }
    Ok(conn)
}

/// The room a read is given at least.
const READ_ROOM: usize = 4096;
/// The write buffer the driver keeps between batches, at most.
const KEPT_OUT: usize = 64 * 1024;

/// The driver: writes the calls queued, in batches, and hands the answers back in order (see
/// the module documentation). Ends when the connection fails (every call waiting gets the
/// error) or when no handle to the limiter is left.
async fn drive(mut conn: Conn, mut queued: mpsc::Receiver<Call>, batches: Arc<AtomicU64>) {
    let mut waiting: VecDeque<oneshot::Sender<RedisResult<Answer>>> = VecDeque::new();
    let mut batch: Vec<Call> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let failed = loop {
        let room = MAX_IN_FLIGHT - waiting.len();
        tokio::select! {
            biased;
            // Read even while no call waits: what comes then was not asked for, and ends the
            // connection (`deliver`) rather than being taken for the next call's answer.
            read = conn.fill() => {
                if let Err(e) = read {
                    break e;
                }
                match conn.deliver(&mut waiting) {
                    Ok(()) => {}
                    Err(e) => break e,
                }
            }
            taken = queued.recv_many(&mut batch, room), if room > 0 => {
                if taken == 0 {
                    return; // every handle is gone
                }
                // Let the other requests of this turn queue their calls (see the module
                // documentation), then take them all.
                tokio::task::yield_now().await;
                while batch.len() < room {
                    match queued.try_recv() {
                        Ok(call) => batch.push(call),
                        Err(_) => break,
                    }
                }
                out.clear();
                for call in batch.drain(..) {
                    // Cut short before it was sent: its request was decided without it.
                    if call.answer.is_closed() {
                        continue;
                    }
                    out.extend_from_slice(&call.command);
                    waiting.push_back(call.answer);
                }
                if out.is_empty() {
                    continue;
                }
                batches.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = conn.stream.write_all(&out).await {
                    break e.into();
                }
                // A batch of `EVAL`s (a script not yet loaded) can be megabytes: not kept.
                out.truncate(0);
                out.shrink_to(KEPT_OUT);
            }
        }
    };
    tracing::debug!(error = %failed, "the connection to Redis failed");
    for answer in waiting {
        let _ = answer.send(Err(closed()));
    }
}

/// `EVALSHA sha` (or `EVAL script`) with the steps as keys and arguments.
fn script_call(verb: &[u8], sha_or_script: &str, steps: &[Step<'_>]) -> Vec<u8> {
    let mut numbers = itoa::Buffer::new();
    let mut out = Vec::with_capacity(128 + sha_or_script.len() + steps.len() * 96);
    head(&mut out, 4 + steps.len() * 5);
    bulk(&mut out, verb);
    bulk(&mut out, sha_or_script.as_bytes());
    bulk(&mut out, numbers.format(steps.len()).as_bytes());
    for step in steps {
        bulk(&mut out, step.key.as_bytes());
    }
    // The first argument is empty (the script's clock is Redis's own; see `bucket.lua`).
    bulk(&mut out, b"");
    for step in steps {
        bulk(&mut out, numbers.format(step.shape.capacity).as_bytes());
        bulk(&mut out, numbers.format(step.shape.window_ms).as_bytes());
        bulk(&mut out, step.op.name().as_bytes());
        bulk(&mut out, numbers.format(step.op.amount()).as_bytes());
    }
    out
}

fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    head(out, args.len());
    for arg in args {
        bulk(out, arg);
    }
}

fn head(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(itoa::Buffer::new().format(arg.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

impl Conn {
    /// Reads one whole answer (the handshake's, before the driver takes the connection).
    async fn answer(&mut self) -> RedisResult<Answer> {
        loop {
            if let Some((answer, used)) = parse(&self.buf)? {
                self.buf.advance(used);
                return Ok(answer);
            }
            if self.buf.len() >= MAX_ANSWER {
                return Err(protocol_error("Redis's answer is too large"));
            }
            self.buf.reserve(256);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io_error("Redis closed the connection"));
            }
        }
    }

    /// Waits for bytes and reads what is there (cancel-safe: nothing is read until the read
    /// that returns).
    async fn fill(&mut self) -> RedisResult<()> {
        if self.buf.len() >= MAX_ANSWER {
            return Err(protocol_error("Redis's answer is too large"));
        }
        self.buf.reserve(READ_ROOM);
        loop {
            self.stream.readable().await?;
            match self.stream.read_some(&mut self.buf) {
                Ok(0) => return Err(io_error("Redis closed the connection")),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Hands every whole answer read so far to the call waiting for it, first come first
    /// served. An answer with no call waiting is an error: Redis sends nothing unasked.
    fn deliver(
        &mut self,
        waiting: &mut VecDeque<oneshot::Sender<RedisResult<Answer>>>,
    ) -> RedisResult<()> {
        while let Some((answer, used)) = parse(&self.buf)? {
            self.buf.advance(used);
            let Some(call) = waiting.pop_front() else {
                return Err(protocol_error("Redis answered what was not asked"));
            };
            // A call cut short no longer listens; its answer is dropped here.
            let _ = call.send(Ok(answer));
        }
        Ok(())
    }
}

impl Stream {
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.readable().await,
            #[cfg(unix)]
            Stream::Unix(s) => s.readable().await,
        }
    }

    /// One read into `buf`'s spare room without waiting. A read that does not fill the room
    /// has emptied the socket: the readiness seen before it is cleared then (tokio keeps it if
    /// an event came since), so that the next wait needs no read that finds nothing
    /// (`EAGAIN`) to learn it. `WouldBlock` when there was nothing after all.
    fn read_some(&self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let room = buf.capacity() - buf.len();
        let mut read = 0;
        let outcome = match self {
            Stream::Tcp(s) => s.try_io(tokio::io::Interest::READABLE, || {
                read = s.try_read_buf(buf)?;
                short(read, room)
            }),
            #[cfg(unix)]
            Stream::Unix(s) => s.try_io(tokio::io::Interest::READABLE, || {
                read = s.try_read_buf(buf)?;
                short(read, room)
            }),
        };
        match outcome {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && read > 0 => Ok(read),
            other => other,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            #[cfg(unix)]
            Stream::Unix(s) => s.write_all(bytes).await,
        }
    }

    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_buf(buf).await,
            #[cfg(unix)]
            Stream::Unix(s) => s.read_buf(buf).await,
        }
    }
}

/// `read` bytes out of `room`: a short read (the socket emptied) answers `WouldBlock`, which
/// makes `try_io` clear the readiness seen before the read.
fn short(read: usize, room: usize) -> std::io::Result<usize> {
    if read > 0 && read < room {
        Err(std::io::Error::from(std::io::ErrorKind::WouldBlock))
    } else {
        Ok(read)
    }
}

/// The line at the start of `buf` (without its CRLF) and the bytes it took; `None` when it
/// has not all arrived.
fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = memchr::memchr(b'\n', buf)?;
    let line = buf[..end].strip_suffix(b"\r")?;
    Some((line, end + 1))
}

fn number(digits: &[u8]) -> RedisResult<i64> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| protocol_error("Redis sent a malformed number"))
}

/// One answer at the start of `buf` and the bytes it took; `None` when it has not all arrived.
fn parse(buf: &[u8]) -> RedisResult<Option<(Answer, usize)>> {
    parse_nested(buf, 0)
}

/// Arrays nest this deep at most (relay's commands answer one level).
const MAX_DEPTH: usize = 2;

fn parse_nested(buf: &[u8], depth: usize) -> RedisResult<Option<(Answer, usize)>> {
    let Some((first, mut used)) = line(buf) else {
        return Ok(None);
    };
    let Some((&kind, rest)) = first.split_first() else {
        return Err(protocol_error("Redis sent an empty line"));
    };
    let answer = match kind {
        b'+' => Answer::Status,
        b'-' => Answer::Error(String::from_utf8_lossy(rest).into_owned()),
        b':' => Answer::Int(number(rest)?),
        b'$' => {
            let len = number(rest)?;
            if len < 0 {
                Answer::Bulk(None)
            } else {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len < MAX_ANSWER)
                    .ok_or_else(|| protocol_error("Redis's answer is too large"))?;
                if buf.len() < used + len + 2 {
                    return Ok(None);
                }
                let text = &buf[used..used + len];
                used += len + 2;
                Answer::Bulk(number(text).ok())
            }
        }
        b'*' if depth == MAX_DEPTH => return Err(protocol_error("Redis's answer nests too deep")),
        b'*' => {
            let len = number(rest)?;
            if len < 0 {
                Answer::Ints(None)
            } else {
                let mut ints = Some(Vec::new());
                for _ in 0..len {
                    let Some((element, took)) = parse_nested(&buf[used..], depth + 1)? else {
                        return Ok(None);
                    };
                    used += took;
                    match (element, &mut ints) {
                        (Answer::Int(n) | Answer::Bulk(Some(n)), Some(ints)) => ints.push(n),
                        _ => ints = None,
                    }
                }
                Answer::Ints(ints)
            }
        }
        _ => return Err(protocol_error("Redis sent an unknown answer type")),
    };
    Ok(Some((answer, used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_whole_or_not_at_all() {
        let whole: &[(&[u8], Answer)] = &[
            (b"+OK\r\n", Answer::Status),
            (
                b"-NOSCRIPT No matching script\r\n",
                Answer::Error("NOSCRIPT No matching script".into()),
            ),
            (b":-7\r\n", Answer::Int(-7)),
            (b"$3\r\nabc\r\n", Answer::Bulk(None)),
            (
                b"$12\r\n999999999000\r\n",
                Answer::Bulk(Some(999_999_999_000)),
            ),
            (b"$-1\r\n", Answer::Bulk(None)),
            (
                b"*4\r\n:1\r\n:19\r\n:0\r\n:3\r\n",
                Answer::Ints(Some(vec![1, 19, 0, 3])),
            ),
            (b"*0\r\n", Answer::Ints(Some(vec![]))),
            (b"*2\r\n:1\r\n$1\r\nx\r\n", Answer::Ints(None)),
            (b"*2\r\n:1\r\n$2\r\n19\r\n", Answer::Ints(Some(vec![1, 19]))),
            (b"*-1\r\n", Answer::Ints(None)),
        ];
        for (bytes, answer) in whole {
            let mut more = bytes.to_vec();
            more.extend_from_slice(b"+NEXT\r\n");
            assert_eq!(
                parse(&more).unwrap(),
                Some((answer.clone(), bytes.len())),
                "{}",
                String::from_utf8_lossy(bytes)
            );
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]).unwrap(), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn what_is_not_resp_is_an_error() {
        for bytes in [
            &b"\r\n"[..],
            b"hello\r\n",
            b":12x\r\n",
            b"$99999999999\r\n",
            b"*2\r\n?\r\n",
            b"*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bytes).is_err(), "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn commands_are_encoded_as_resp_arrays() {
        let mut out = Vec::new();
        encode(&[b"AUTH", b"pa ss"], &mut out);
        assert_eq!(out, b"*2\r\n$4\r\nAUTH\r\n$5\r\npa ss\r\n");
    }
}
