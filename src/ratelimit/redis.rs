//! The Redis backend: one Lua script call per decision (one or two buckets), run atomically by
//! Redis on its own clock.
//!
//! The script is called by its SHA (`EVALSHA`); when Redis answers `NOSCRIPT` (the first call,
//! or after a restart or `SCRIPT FLUSH`) the call is made again with the script itself
//! (`EVAL`, which also caches it).
//!
//! The decision is the one Redis command on the request path, so it is spoken here directly,
//! over a small pool of connections: the request's own task writes the command and reads the
//! answer, with no driver task, no channel and no general RESP value in between. The `redis`
//! crate's multiplexed `ConnectionManager` cost about 14,000 instructions a decision (its
//! channel hop, its combine parser, its command builder); this costs a few thousand (callgrind,
//! issue 14). The `redis` crate still reads `REDIS_URL`.
//!
//! A connection is taken from the pool for one call and given back only when the call ended
//! with a whole answer: a call cut short (the decision's budget, a client gone) drops its
//! connection with it, so no connection ever holds half an answer. The pool is bounded
//! ([`MAX_OPEN`] connections, idle or not: there are as many as decisions were in flight at
//! once, and a busy replica keeps them rather than dialling again), and so is every answer
//! ([`MAX_ANSWER`] bytes); dialling is bounded by [`CONNECT_TIMEOUT`]. A broken connection is
//! an error to the caller, which falls back to memory and lets its probe build a new pool.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use redis::{ConnectionAddr, ErrorKind, RedisError, RedisResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Step;
use super::bucket::Decision;

/// The script (see `bucket.lua`); public so that tests can run it with their own clock.
pub const SCRIPT: &str = include_str!("bucket.lua");

/// Connections open at most; a decision beyond them waits for one (within its budget).
pub const MAX_OPEN: usize = 256;
/// The most bytes an answer may take (a decision's is under 100).
pub const MAX_ANSWER: usize = 64 * 1024;
/// How long dialling and the handshake (`AUTH`, `SELECT`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The Redis backend. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct RedisLimiter {
    shared: Arc<Shared>,
}

struct Shared {
    addr: Addr,
    /// `AUTH` and `SELECT`, sent on every new connection (empty when neither is needed).
    handshake: Vec<u8>,
    /// How many answers the handshake gets.
    handshake_answers: usize,
    /// The script's SHA-1, hex.
    sha: String,
    idle: Mutex<Vec<Conn>>,
    open: Arc<Semaphore>,
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
    _permit: OwnedSemaphorePermit,
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
        let limiter = RedisLimiter {
            shared: Arc::new(Shared {
                addr,
                handshake,
                handshake_answers,
                sha: redis::Script::new(SCRIPT).get_hash().to_owned(),
                idle: Mutex::new(Vec::new()),
                open: Arc::new(Semaphore::new(MAX_OPEN)),
            }),
        };
        limiter.ping().await?;
        Ok(limiter)
    }

    /// Applies `steps` in order, in one round trip (one script call), stopping after a `take`
    /// that is refused: the decisions of the steps applied.
    pub async fn run(&self, steps: &[Step<'_>]) -> RedisResult<Vec<Decision>> {
        let mut conn = self.checkout().await?;
        let answer = match conn
            .call(&script_call(b"EVALSHA", &self.shared.sha, steps))
            .await?
        {
            Answer::Error(e) if e.starts_with("NOSCRIPT") => {
                conn.call(&script_call(b"EVAL", SCRIPT, steps)).await?
            }
            answer => answer,
        };
        self.give_back(conn);
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
        let mut conn = self.checkout().await?;
        let mut ping = Vec::new();
        encode(&[b"PING"], &mut ping);
        match conn.call(&ping).await? {
            Answer::Status => {
                self.give_back(conn);
                Ok(())
            }
            Answer::Error(e) => Err(RedisError::from((
                ErrorKind::ResponseError,
                "PING failed",
                e,
            ))),
            _ => Err(protocol_error("unexpected answer to PING")),
        }
    }

    /// An idle connection, or a new one.
    async fn checkout(&self) -> RedisResult<Conn> {
        let idle = self
            .shared
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        let permit = self
            .shared
            .open
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io_error("the connection pool is closed"))?;
        match tokio::time::timeout(CONNECT_TIMEOUT, self.dial(permit)).await {
            Ok(conn) => conn,
            Err(_) => Err(io_error("Redis did not answer in time")),
        }
    }

    async fn dial(&self, permit: OwnedSemaphorePermit) -> RedisResult<Conn> {
        let stream = match &self.shared.addr {
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
            buf: BytesMut::with_capacity(256),
            _permit: permit,
        };
        if !self.shared.handshake.is_empty() {
            conn.stream.write_all(&self.shared.handshake).await?;
            for _ in 0..self.shared.handshake_answers {
                if let Answer::Error(e) = conn.answer().await? {
                    return Err(RedisError::from((
                        ErrorKind::AuthenticationFailed,
                        "Redis refused the handshake (AUTH or SELECT)",
                        e,
                    )));
                }
            }
        }
        Ok(conn)
    }

    /// Keeps `conn` for the next call (its permit bounds how many there are).
    fn give_back(&self, conn: Conn) {
        self.shared
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(conn);
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
    /// Sends `command` and reads its answer.
    async fn call(&mut self, command: &[u8]) -> RedisResult<Answer> {
        self.stream.write_all(command).await?;
        self.answer().await
    }

    /// Reads one whole answer.
    async fn answer(&mut self) -> RedisResult<Answer> {
        loop {
            if let Some((answer, used)) = parse(&self.buf)? {
                self.buf.advance(used);
                if self.buf.is_empty() {
                    self.stream.drained();
                }
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
}

impl Stream {
    /// Tells the runtime that nothing more is there to read: an answer was read whole, and
    /// Redis sends nothing unasked. The next answer is then awaited without first a read that
    /// finds nothing (`EAGAIN`), one system call a decision. A close still shows: tokio keeps
    /// a socket's closed state when its readiness is cleared.
    fn drained(&self) {
        let nothing = || Err::<(), _>(std::io::Error::from(std::io::ErrorKind::WouldBlock));
        let _ = match self {
            Stream::Tcp(s) => s.try_io(tokio::io::Interest::READABLE, nothing),
            #[cfg(unix)]
            Stream::Unix(s) => s.try_io(tokio::io::Interest::READABLE, nothing),
        };
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
