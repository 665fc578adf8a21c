//! `relay health`: one plain-HTTP `GET` of a health endpoint with a deadline, on the standard
//! library alone (no runtime, no TLS), so that a container's health check needs no curl.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::{Duration, Instant};

use url::{Host, Url};

/// The most of an answer read: a health answer is a few dozen bytes.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What a probe found: the status code and the answer's body (as text, for a message).
#[derive(Debug)]
pub struct ProbeAnswer {
    /// The HTTP status code.
    pub status: u16,
    /// The body, lossily decoded (a chunked body keeps its chunk sizes: it is only shown).
    pub body: String,
}

/// Sends `GET url` (`http://` only: relay itself speaks plain HTTP) with `Connection: close`
/// and reads the answer; connecting, sending and reading together take at most `timeout`.
pub fn http_get(url: &str, timeout: Duration) -> anyhow::Result<ProbeAnswer> {
    let url = Url::parse(url)?;
    anyhow::ensure!(
        url.scheme() == "http",
        "only http:// URLs can be probed (relay speaks plain HTTP; TLS is the proxy's)"
    );
    let host = match url.host() {
        Some(Host::Ipv6(ip)) => ip.to_string(),
        Some(host) => host.to_string(),
        None => anyhow::bail!("the URL has no host"),
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let deadline = Instant::now() + timeout;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("no answer within {timeout:?}"))
    };

    let mut stream = None;
    let mut last_error = None;
    for addr in (host.as_str(), port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, remaining()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_error = Some(e),
        }
    }
    let mut stream = match (stream, last_error) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e.into()),
        (None, None) => anyhow::bail!("{host} has no address"),
    };
    let target = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let authority = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    stream.set_write_timeout(Some(remaining()?))?;
    stream.write_all(
        format!(
            "GET {target} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: relay-health\r\n\
             Accept: application/json\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;

    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(remaining()?))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                anyhow::bail!("no whole answer within {timeout:?}")
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 || answer.len() >= MAX_ANSWER_BYTES {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    parse_answer(&answer)
}

/// Reads the status code from `HTTP/1.x NNN …` and takes what follows the head as the body.
fn parse_answer(answer: &[u8]) -> anyhow::Result<ProbeAnswer> {
    let text = String::from_utf8_lossy(answer);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        anyhow::bail!("not an HTTP answer: {status_line:?}");
    };
    anyhow::ensure!(
        version.starts_with("HTTP/1."),
        "not an HTTP/1 answer: {status_line:?}"
    );
    let status = code
        .parse()
        .map_err(|_| anyhow::anyhow!("not an HTTP status: {status_line:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default();
    Ok(ProbeAnswer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_and_body_are_read_from_an_answer() {
        let a = parse_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}")
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "{\"status\":\"ok\"}"));
        let a = parse_answer(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").unwrap();
        assert_eq!(a.status, 503);
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_answer(b"").is_err());
    }

    #[test]
    fn only_plain_http_is_probed() {
        let err = http_get("https://127.0.0.1:1/", Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
    }
}
