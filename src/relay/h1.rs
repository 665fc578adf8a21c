//! HTTP/1.1 on the wire to the upstream: a request's head, an answer's head, and the framing of
//! an answer's body (`Content-Length`, chunked, or until the connection closes).
//!
//! relay's upstream connections speak it themselves ([`super::pool`]) rather than through
//! hyper's client connection, which costs each connection an 8 KiB read buffer, an 8 KiB write
//! buffer and a 9 KiB request channel for as long as it lives (27 of the 51 KiB a relayed stream
//! held), and passes every body frame through a channel between the connection and the body.
//! Here an answer's body is cut straight out of the bytes read, without a copy, and a connection
//! holds no buffer between reads. Heads are parsed by `httparse` (hyper's parser), and only the
//! headers relay reads are kept.
//!
//! Only what relay sends and what an OpenAI-compatible server answers is spoken: no request
//! bodies of unknown length, no `Expect: 100-continue`, no upgrades. The framing rules are RFC
//! 9112's, section 6.

use bytes::{Buf as _, Bytes, BytesMut};
use http::header;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};

/// Largest answer head (status line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers accepted in an answer.
const MAX_HEADERS: usize = 128;
/// Largest chunk-size line (with its extensions).
const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Largest trailer section after a chunked body (its fields are read and dropped).
const MAX_TRAILER_BYTES: usize = 64 * 1024;

/// The answer's headers that relay reads: its framing, `content-type` and `retry-after`. The
/// others (the upstream's organisation, rate-limit counters, cookies…) are never passed on to
/// clients, so they are not kept: making each a `HeaderName` was most of the cost of a head.
static KEPT: [HeaderName; 5] = [
    header::CONTENT_TYPE,
    header::RETRY_AFTER,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONNECTION,
];

/// The one of [`KEPT`] that `name` is, in any letter case. Looked up by length first: an
/// answer has a dozen headers and keeps two or three, and comparing each with all five names
/// cost about 300 instructions a request (issue 14).
fn kept(name: &str) -> Option<&'static HeaderName> {
    let at = match name.len() {
        12 => 0,
        11 => 1,
        14 => 2,
        17 => 3,
        10 => 4,
        _ => return None,
    };
    KEPT.get(at)
        .filter(|kept| kept.as_str().eq_ignore_ascii_case(name))
}

/// Why an exchange with the upstream failed.
#[derive(Debug)]
pub enum WireError {
    /// The connection failed.
    Io(std::io::Error),
    /// The upstream closed the connection before the end of its answer.
    Closed,
    /// The answer is not HTTP/1.1 as relay reads it.
    Invalid(&'static str),
}

impl WireError {
    /// Whether the system timed the connection out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
    }
}

impl From<std::io::Error> for WireError {
    fn from(err: std::io::Error) -> Self {
        WireError::Io(err)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(err) => write!(f, "upstream connection error: {err}"),
            WireError::Closed => f.write_str("the upstream closed the connection mid-answer"),
            WireError::Invalid(what) => write!(f, "invalid answer from the upstream: {what}"),
        }
    }
}

impl std::error::Error for WireError {}

/// Appends `request`'s head to `out`: its request line (its URI in origin form), its headers,
/// and the length of its body, which follows the head as it is.
pub fn encode_head(request: &Request<Bytes>, out: &mut Vec<u8>) {
    out.extend_from_slice(request.method().as_str().as_bytes());
    out.push(b' ');
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in request.headers() {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue; // the body's length is ours to say
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let body = request.body().len();
    if body > 0 || !matches!(*request.method(), Method::GET | Method::HEAD) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An answer's head: the answer without its body, how its body is framed, and whether the
/// connection may carry another request after it.
#[derive(Debug)]
pub struct Head {
    /// Status, version and headers.
    pub response: Response<()>,
    /// How the body ends.
    pub body: Decoder,
    /// Whether the connection stays open after this answer.
    pub keep_alive: bool,
}

/// Most interim (`1xx`) answers accepted before an answer: an upstream that sent them without
/// end would keep a request busy until its timeout.
const MAX_INTERIM_ANSWERS: usize = 8;

/// Takes an answer's head from the front of `buf` (skipping interim `1xx` answers, counted in
/// `interim` across calls for the same request); `Ok(None)` while `buf` does not hold all of it
/// yet. `method` is the request's (a `HEAD` answer has no body).
pub fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
    interim: &mut usize,
) -> Result<Option<Head>, WireError> {
    loop {
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD_BYTES {
                    return Err(WireError::Invalid("the answer's head is too large"));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Invalid("too many headers"));
            }
            Err(_) => return Err(WireError::Invalid("malformed status line or header")),
        };
        let code = parsed.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| WireError::Invalid("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(WireError::Invalid("unexpected protocol switch"));
            }
            *interim += 1;
            if *interim > MAX_INTERIM_ANSWERS {
                return Err(WireError::Invalid("too many interim answers"));
            }
            buf.advance(len); // an interim answer (e.g. 103 Early Hints): the real one follows
            continue;
        }
        let version = match parsed.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let mut headers = HeaderMap::new();
        for header in parsed.headers.iter() {
            let Some(name) = kept(header.name) else {
                continue;
            };
            let value = HeaderValue::from_bytes(header.value)
                .map_err(|_| WireError::Invalid("invalid header value"))?;
            headers.append(name.clone(), value);
        }
        buf.advance(len);
        let (body, framed) = framing(status, method, &headers)?;
        // HTTP/1.0 closes unless it says otherwise; relay does not ask it to.
        let keep_alive =
            framed && version == Version::HTTP_11 && !has_token(&headers, "connection", "close");
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            body,
            keep_alive,
        }));
    }
}

/// How the body of an answer ends (RFC 9112, 6.3), and whether it ends before the connection
/// does.
fn framing(
    status: StatusCode,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(Decoder, bool), WireError> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Decoder::length(0), true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // The last coding decides; a length beside it is ignored, and the connection is not
        // trusted with another request after such an answer.
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|c| !c.is_empty());
        let clean = !headers.contains_key(header::CONTENT_LENGTH);
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => {
                (Decoder::new(State::ChunkSize), clean)
            }
            _ => (Decoder::new(State::UntilClose), false),
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| WireError::Invalid("invalid content-length"))?;
        for part in text.split(',').map(str::trim) {
            let n = if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                part.parse::<u64>().ok()
            } else {
                None
            };
            match (n, length) {
                (None, _) => return Err(WireError::Invalid("invalid content-length")),
                (Some(n), Some(seen)) if n != seen => {
                    return Err(WireError::Invalid("conflicting content-lengths"));
                }
                (Some(n), _) => length = Some(n),
            }
        }
    }
    Ok(match length {
        Some(n) => (Decoder::length(n), true),
        None => (Decoder::new(State::UntilClose), false),
    })
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Cuts an answer's body out of the bytes read from its connection.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes are left (`Content-Length`).
    Length(u64),
    /// A chunk-size line comes next.
    ChunkSize,
    /// This many bytes are left of the current chunk.
    ChunkData(u64),
    /// The CRLF after a chunk's data comes next.
    ChunkEnd,
    /// The trailer section comes next; this many bytes of it were read.
    Trailers(usize),
    /// Everything until the connection closes.
    UntilClose,
    /// The body ended.
    Done,
}

impl Decoder {
    fn new(state: State) -> Self {
        Decoder { state }
    }

    /// A body of `n` bytes (`Content-Length`).
    pub fn length(n: u64) -> Self {
        Decoder::new(if n == 0 {
            State::Done
        } else {
            State::Length(n)
        })
    }

    /// A chunked body (`Transfer-Encoding: chunked`).
    pub fn chunked() -> Self {
        Decoder::new(State::ChunkSize)
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The bytes left, when the body's length is known.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body from the front of `buf` (never empty), or `None` when `buf`
    /// holds no more of it: then the body has ended ([`Decoder::is_done`]) or more must be read.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Length(n) | State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), left) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        (_, left) => State::ChunkData(left),
                    };
                    return Ok(Some(buf.split_to(take).freeze()));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers(_) => {
                    if !self.step_framing(buf)? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Reads past the framing at the front of `buf` (a chunk's end, chunk-size lines, the
    /// trailer section) up to the next bytes of the body, handing none over: so that a
    /// buffer holding only framing can be emptied, and the end of a body seen, at once.
    pub fn skip_framing(&mut self, buf: &mut BytesMut) -> Result<(), WireError> {
        while matches!(
            self.state,
            State::ChunkSize | State::ChunkEnd | State::Trailers(_)
        ) && self.step_framing(buf)?
        {}
        Ok(())
    }

    /// One step through chunked framing; whether it was taken (`false`: more bytes needed).
    fn step_framing(&mut self, buf: &mut BytesMut) -> Result<bool, WireError> {
        match self.state {
            State::ChunkSize => {
                let Some((len, taken)) =
                    line_at(buf, MAX_CHUNK_LINE_BYTES, "a chunk-size line is too long")?
                else {
                    return Ok(false);
                };
                let size = chunk_size(&buf[..len])?;
                buf.advance(taken);
                self.state = if size == 0 {
                    State::Trailers(0)
                } else {
                    State::ChunkData(size)
                };
            }
            State::ChunkEnd => {
                let Some((len, taken)) = line_at(buf, 2, "a chunk is longer than its size")? else {
                    return Ok(false);
                };
                if len != 0 {
                    return Err(WireError::Invalid("a chunk is longer than its size"));
                }
                buf.advance(taken);
                self.state = State::ChunkSize;
            }
            State::Trailers(seen) => {
                let room = MAX_TRAILER_BYTES.saturating_sub(seen);
                let Some((len, taken)) = line_at(buf, room, "the trailer section is too large")?
                else {
                    return Ok(false);
                };
                buf.advance(taken);
                self.state = if len == 0 {
                    State::Done
                } else {
                    State::Trailers(seen + taken)
                };
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The connection closed: fine if that ends the body.
    pub fn eof(&mut self) -> Result<(), WireError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(WireError::Closed),
        }
    }
}

/// The line at the front of `buf` (ended by LF, with or without CR): its length without its
/// end, and its length with it; `None` while it is incomplete. A line longer than `max` bytes
/// is the error `too_long`. The bytes stay in `buf`.
fn line_at(
    buf: &[u8],
    max: usize,
    too_long: &'static str,
) -> Result<Option<(usize, usize)>, WireError> {
    let window = &buf[..buf.len().min(max.saturating_add(1))];
    // Chunk-size lines and chunk ends are a few bytes: a plain loop finds their end sooner
    // than `memchr` is set up.
    let lf = match window.iter().take(16).position(|&b| b == b'\n') {
        Some(at) => Some(at),
        None if window.len() > 16 => memchr::memchr(b'\n', &window[16..]).map(|at| at + 16),
        None => None,
    };
    let Some(at) = lf else {
        if buf.len() > max {
            return Err(WireError::Invalid(too_long));
        }
        return Ok(None);
    };
    let len = if at > 0 && buf[at - 1] == b'\r' {
        at - 1
    } else {
        at
    };
    Ok(Some((len, at + 1)))
}

/// A chunk-size line's size (hexadecimal, before any `;` extension).
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 16 || !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(WireError::Invalid("invalid chunk size"));
    }
    // At most 16 hex digits: fits in a u64. Summed by hand (a str and `from_str_radix` cost
    // more than the few digits of a stream event's chunk).
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10, // only hex digits get here
        };
        (n << 4) | u64::from(v)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_headers_are_found_in_any_case_and_only_they() {
        for name in &KEPT {
            assert_eq!(kept(name.as_str()), Some(name));
            assert_eq!(kept(&name.as_str().to_ascii_uppercase()), Some(name));
            // Another name of the same length, and the name with a byte more or less.
            let other: String = name.as_str().chars().rev().collect();
            assert_eq!(kept(&other), None, "{other}");
            assert_eq!(kept(&format!("{name}s")), None);
            assert_eq!(kept(&name.as_str()[1..]), None);
        }
        for name in [
            "x-request-id",
            "set-cookie",
            "openai-organization",
            "",
            "content",
        ] {
            assert_eq!(kept(name), None, "{name}");
        }
    }

    fn head(raw: &str, method: &Method) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(raw), method, &mut 0)
    }

    /// Feeds `wire` to a decoder `step` bytes at a time; the body, or the first error.
    fn decode_in_steps(mut decoder: Decoder, wire: &[u8], step: usize) -> Result<Vec<u8>, String> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in wire.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(bytes) = decoder.decode(&mut buf).map_err(|e| e.to_string())? {
                assert!(!bytes.is_empty(), "an empty piece of body");
                body.extend_from_slice(&bytes);
            }
        }
        if !decoder.is_done() {
            decoder.eof().map_err(|e| e.to_string())?;
        }
        if !buf.is_empty() {
            return Err(format!("{} bytes left over", buf.len()));
        }
        Ok(body)
    }

    #[test]
    fn a_request_head_says_its_length_and_nothing_of_the_client() {
        let request = Request::post("/v1/chat/completions?x=1")
            .header("host", "api.example:8443")
            .header("authorization", "Bearer sk-relay")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .body(Bytes::from_static(b"{\"a\":1}"))
            .unwrap();
        let mut out = Vec::new();
        encode_head(&request, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: api.example:8443\r\n\
             authorization: Bearer sk-relay\r\ncontent-length: 7\r\n\r\n"
        );
        let get = Request::get("/v1/models").body(Bytes::new()).unwrap();
        let mut out = Vec::new();
        encode_head(&get, &mut out);
        assert_eq!(out, b"GET /v1/models HTTP/1.1\r\n\r\n");
        let delete = Request::delete("/v1/responses/r1")
            .body(Bytes::new())
            .unwrap();
        let mut out = Vec::new();
        encode_head(&delete, &mut out);
        assert_eq!(
            out,
            b"DELETE /v1/responses/r1 HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn heads_are_read_whole_or_not_at_all() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\
                   X-Two: a\r\nx-two: b\r\nRetry-After: 1\r\nretry-after: 2\r\n\r\n{}";
        for cut in 0..raw.len() - 2 {
            assert!(
                head(&raw[..cut], &Method::POST).unwrap().is_none(),
                "at {cut}"
            );
        }
        let mut buf = BytesMut::from(raw);
        let h = parse_head(&mut buf, &Method::POST, &mut 0)
            .unwrap()
            .unwrap();
        assert_eq!(h.response.status(), StatusCode::OK);
        assert_eq!(h.response.headers()["content-type"], "application/json");
        assert!(
            !h.response.headers().contains_key("x-two"),
            "only the headers relay reads are kept"
        );
        assert_eq!(
            h.response.headers().get_all("retry-after").iter().count(),
            2
        );
        assert_eq!(h.body.remaining(), Some(2));
        assert!(h.keep_alive);
        assert_eq!(&buf[..], b"{}", "the body stays in the buffer");
    }

    #[test]
    fn interim_answers_are_skipped() {
        let raw = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n\
                   HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        let h = head(raw, &Method::POST).unwrap().unwrap();
        assert_eq!(h.response.status(), StatusCode::NOT_FOUND);
        assert!(h.body.is_done());
        assert!(head("HTTP/1.1 101 Switching\r\n\r\n", &Method::GET).is_err());
        // Without end, across reads: refused once there are too many.
        let mut interim = 0;
        let mut buf = BytesMut::new();
        let mut refused = false;
        for _ in 0..=MAX_INTERIM_ANSWERS {
            buf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            match parse_head(&mut buf, &Method::POST, &mut interim) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("an interim answer is not the answer"),
                Err(_) => refused = true,
            }
        }
        assert!(refused);
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing_of = |raw: &str, method: &Method| {
            let h = head(raw, method).unwrap().unwrap();
            (h.body.state, h.keep_alive)
        };
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                &Method::POST
            ),
            (State::ChunkSize, true)
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                &Method::POST
            ),
            (State::ChunkSize, false),
            "a length beside chunked is ignored, and the connection is not reused"
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                &Method::POST
            ),
            (State::UntilClose, false)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\n\r\n", &Method::POST),
            (State::UntilClose, false)
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
                &Method::POST
            ),
            (State::Length(5), true)
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive, Close\r\n\r\n",
                &Method::POST
            ),
            (State::Length(5), false)
        );
        assert_eq!(
            framing_of(
                "HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n",
                &Method::POST
            ),
            (State::Length(5), false),
            "HTTP/1.0 closes"
        );
        assert_eq!(
            framing_of(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                &Method::HEAD
            ),
            (State::Done, true)
        );
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\n\r\n", &Method::DELETE),
            (State::Done, true)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 20 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(head(bad, &Method::POST).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn heads_are_bounded() {
        let mut big = String::from("HTTP/1.1 200 OK\r\n");
        while big.len() < MAX_HEAD_BYTES {
            big.push_str("x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(
            head(&big, &Method::POST),
            Err(WireError::Invalid(_))
        ));
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-h{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert!(matches!(
            head(&many, &Method::POST),
            Err(WireError::Invalid("too many headers"))
        ));
    }

    #[test]
    fn chunk_sizes_are_hexadecimal_up_to_sixteen_digits() {
        assert_eq!(chunk_size(b"0").unwrap(), 0);
        assert_eq!(chunk_size(b"1A;name=value").unwrap(), 26);
        assert_eq!(chunk_size(b"fF ").unwrap(), 255);
        assert_eq!(chunk_size(b"ffffffffffffffff").unwrap(), u64::MAX);
        for bad in [&b""[..], b"g", b"-1", b"10000000000000000", b"12 x", b";x"] {
            assert!(
                chunk_size(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn framing_after_a_piece_is_skipped_so_the_buffer_empties() {
        let mut decoder = Decoder::chunked();
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n"[..]);
        assert_eq!(&decoder.decode(&mut buf).unwrap().unwrap()[..], b"hello");
        assert_eq!(&buf[..], b"\r\n", "decode stops after the data");
        decoder.skip_framing(&mut buf).unwrap();
        assert!(buf.is_empty() && !decoder.is_done());
        // The last chunk and an empty trailer section: the body ends without another read.
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"[..]);
        assert_eq!(&decoder.decode(&mut buf).unwrap().unwrap()[..], b"abc");
        decoder.skip_framing(&mut buf).unwrap();
        assert!(buf.is_empty() && decoder.is_done());
        // Framing that is not all there yet stays for the next read; bad framing is an error
        // (here, or at the next decode).
        let mut decoder = Decoder::chunked();
        let mut buf = BytesMut::from(&b"1\r\nx\r"[..]);
        decoder.decode(&mut buf).unwrap();
        decoder.skip_framing(&mut buf).unwrap();
        assert_eq!(&buf[..], b"\r");
        let mut buf = BytesMut::from(&b"1\r\nxyz\r\n"[..]);
        let mut decoder = Decoder::chunked();
        decoder.decode(&mut buf).unwrap();
        assert!(decoder.skip_framing(&mut buf).is_err());
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5;ext=1\r\nhello\r\n1\r\n \r\nC\r\nworld, again\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..=wire.len() {
            assert_eq!(
                decode_in_steps(Decoder::new(State::ChunkSize), wire, step).unwrap(),
                b"hello world, again",
                "reads of {step} bytes"
            );
        }
        // Bare LFs, as some servers send.
        assert_eq!(
            decode_in_steps(Decoder::new(State::ChunkSize), b"3\nabc\n0\n\n", 1).unwrap(),
            b"abc"
        );
    }

    #[test]
    fn broken_chunked_bodies_fail() {
        let cases: [&[u8]; 6] = [
            b"5\r\nhello!!\r\n0\r\n\r\n", // longer than its size
            b"zz\r\nhello\r\n0\r\n\r\n",  // not a size
            b"\r\nhello\r\n0\r\n\r\n",    // no size
            b"11111111111111111\r\n",     // over 64 bits
            b"5 x\r\nhello\r\n0\r\n\r\n", // junk after the size
            b"5\r\nhel",                  // cut off
        ];
        for wire in cases {
            assert!(
                decode_in_steps(Decoder::new(State::ChunkSize), wire, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut endless = b"1;".to_vec();
        endless.resize(MAX_CHUNK_LINE_BYTES + 10, b'x');
        assert!(decode_in_steps(Decoder::new(State::ChunkSize), &endless, 100).is_err());
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILER_BYTES + 100 {
            trailers.extend_from_slice(b"x-t: 1\r\n");
        }
        assert!(decode_in_steps(Decoder::new(State::ChunkSize), &trailers, 1000).is_err());
    }

    #[test]
    fn length_and_close_delimited_bodies() {
        for step in 1..12 {
            assert_eq!(
                decode_in_steps(Decoder::length(11), b"hello world", step).unwrap(),
                b"hello world"
            );
            assert_eq!(
                decode_in_steps(Decoder::new(State::UntilClose), b"until the end", step).unwrap(),
                b"until the end"
            );
        }
        assert_eq!(
            decode_in_steps(Decoder::length(20), b"short", 2).unwrap_err(),
            WireError::Closed.to_string()
        );
        // What follows the body is not the body's.
        let mut buf = BytesMut::from(&b"abcHTTP/1.1"[..]);
        let mut decoder = Decoder::length(3);
        assert_eq!(&decoder.decode(&mut buf).unwrap().unwrap()[..], b"abc");
        assert!(decoder.is_done());
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        assert_eq!(&buf[..], b"HTTP/1.1");
    }
}
