//! The upstream connections: kept and reused, replaced when the upstream closed them, and a
//! stream's events that arrive in one read relayed in one piece. The upstream here is a bare
//! HTTP/1.1 server on a TCP socket, so that the test sees every connection and every byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{self, Db};

/// A keep-alive upstream that closes a connection idle for `idle_close`, as real ones do.
struct RawUpstream {
    base: String,
    accepted: Arc<AtomicUsize>,
}

const EVENTS: usize = 24;

fn completion() -> String {
    json!({
        "id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "raw",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    })
    .to_string()
}

/// A whole chat stream: `EVENTS` events (the last `[DONE]`), each its own HTTP chunk, as
/// OpenAI sends them, all in one write.
fn stream_body() -> String {
    let mut events: Vec<String> = (0..EVENTS - 2)
        .map(|i| {
            let chunk = json!({"id": "chatcmpl-raw", "object": "chat.completion.chunk",
                "created": 1, "model": "raw",
                "choices": [{"index": 0, "delta": {"content": format!("w{i} ")}, "finish_reason": null}]});
            format!("data: {chunk}\n\n")
        })
        .collect();
    let usage = json!({"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1,
        "model": "raw", "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 22, "total_tokens": 25}});
    events.push(format!("data: {usage}\n\n"));
    events.push("data: [DONE]\n\n".to_owned());
    let mut body = String::new();
    for event in events {
        body.push_str(&format!("{:X}\r\n{event}\r\n", event.len()));
    }
    body.push_str("0\r\n\r\n");
    body
}

/// Reads one request (head and `Content-Length` body); `None` when the peer closed.
async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Value> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                let mut more = [0u8; 4096];
                let n = socket.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&more[..n]);
            }
            let body: Value = serde_json::from_slice(&buf[end + 4..end + 4 + length]).ok()?;
            buf.drain(..end + 4 + length);
            return Some(body);
        }
        let mut more = [0u8; 4096];
        let n = socket.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    }
}

async fn start_raw(idle_close: Duration) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Ok(Some(request)) =
                    tokio::time::timeout(idle_close, read_request(&mut socket, &mut buf)).await
                {
                    let answer = if request["stream"] == json!(true) {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                             transfer-encoding: chunked\r\n\r\n{}",
                            stream_body()
                        )
                    } else {
                        let body = completion();
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Idle for too long (or the peer left): close, as an upstream's keep-alive
                // timeout does.
            });
        }
    });
    RawUpstream {
        base: format!("http://{addr}/v1"),
        accepted,
    }
}

fn ask(stream: bool) -> Value {
    json!({"model": "raw", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn upstream_connections_are_reused_and_one_closed_while_idle_is_replaced() {
    let upstream = start_raw(Duration::from_secs(1)).await;
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &upstream.base)]).await;
    let (token, _) = app.user_tokens("pool@example.com").await;
    for stream in [false, true, false, true] {
        let resp = app.chat(&token, &ask(stream)).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(text.contains("chatcmpl-raw"), "{text}");
    }
    assert_eq!(
        upstream.accepted.load(Ordering::SeqCst),
        1,
        "four requests, one after the other (two of them whole streams), share one connection"
    );
    // The upstream closes the idle connection; the next request must not fail on it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for stream in [false, true] {
        let resp = app.chat(&token, &ask(stream)).await;
        assert_eq!(
            resp.status(),
            200,
            "a connection closed while idle is replaced"
        );
        assert!(resp.text().await.unwrap().contains("chatcmpl-raw"));
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn events_that_arrive_together_leave_together() {
    let upstream = start_raw(Duration::from_secs(5)).await;
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &upstream.base)]).await;
    let (token, _) = app.user_tokens("coalesce@example.com").await;
    // A raw HTTP/1.1 client, to see relay's chunks as they are framed on the wire.
    let body = ask(true).to_string();
    let request = format!(
        "POST /api/v1/chat/completions HTTP/1.1\r\nhost: relay\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, mut rest) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
    );
    let mut chunks = 0;
    let mut payload = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            break;
        }
        payload.push_str(&after[..size]);
        rest = &after[size + 2..];
        chunks += 1;
    }
    // The usage chunk the client did not ask for is left out; everything else is relayed.
    assert_eq!(payload.matches("data: ").count(), EVENTS - 1, "{payload}");
    assert!(payload.ends_with("data: [DONE]\n\n"));
    assert!(
        chunks <= 3,
        "{EVENTS} events that came in one upstream read were relayed in {chunks} chunks"
    );
}

/// An upstream that answers the n-th request it reads (counted over all its connections) with
/// `script(n)`: the raw bytes to write, and whether to close the connection after them.
async fn start_scripted(
    script: impl Fn(usize) -> (Vec<u8>, bool) + Send + Sync + 'static,
) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let script = Arc::new(script);
    let served = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let (script, served) = (script.clone(), served.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(_request) = read_request(&mut socket, &mut buf).await {
                    let (answer, close) = script(served.fetch_add(1, Ordering::SeqCst));
                    if socket.write_all(&answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    RawUpstream {
        base: format!("http://{addr}/v1"),
        accepted,
    }
}

/// `completion()` with `content` as its message.
fn completion_saying(content: &str) -> String {
    completion().replace("\"hi\"", &format!("\"{content}\""))
}

fn with_length(body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{extra_headers}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn answers_are_read_as_the_upstream_frames_them_and_connections_reused_only_when_clean() {
    let upstream = start_scripted(|n| {
        let body = completion_saying(&format!("answer {n}"));
        match n {
            // Chunked, in uneven chunks, with an extension and a trailer.
            0 => {
                let (a, b) = body.split_at(7);
                (
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         transfer-encoding: chunked\r\n\r\n{:x};x=y\r\n{a}\r\n{:x}\r\n{b}\r\n\
                         0\r\nx-trailer: 1\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                    .into_bytes(),
                    false,
                )
            }
            // An interim answer first.
            1 => {
                let mut answer = b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n".to_vec();
                answer.extend(with_length(&body, ""));
                (answer, false)
            }
            // The upstream says it closes: the connection is not used again.
            2 => (with_length(&body, "connection: close\r\n"), true),
            // No length: the body lasts until the upstream closes.
            3 => (
                format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{body}")
                    .into_bytes(),
                true,
            ),
            // More than the answer: what follows must never be read as the next answer.
            4 => {
                let mut answer = with_length(&body, "");
                answer.extend(with_length(&completion_saying("smuggled"), ""));
                (answer, false)
            }
            _ => (with_length(&body, ""), false),
        }
    })
    .await;
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &upstream.base)]).await;
    let (token, _) = app.user_tokens("framing@example.com").await;
    for n in 0..6 {
        let resp = app.chat(&token, &ask(false)).await;
        assert_eq!(resp.status(), 200, "request {n}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("answer {n}"),
            "request {n}"
        );
    }
    assert_eq!(
        upstream.accepted.load(Ordering::SeqCst),
        4,
        "requests 0-2 share a connection, which closes; 3 is read to the close; 4 left bytes \
         behind, so 5 needs a new connection"
    );
}

#[tokio::test]
async fn broken_answers_are_502s_and_their_connections_are_dropped() {
    let upstream = start_scripted(|n| match n {
        // A head without end, beyond any sane size.
        0 => {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            while head.len() < 100 * 1024 {
                head.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
            }
            (head, false)
        }
        // A chunk size that is not one.
        1 => (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
            false,
        ),
        // Shorter than it said, then closed.
        2 => (with_length(&completion(), "").split_last().unwrap().1.to_vec(), true),
        // Not HTTP.
        3 => (b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec(), false),
        _ => (with_length(&completion_saying("fine"), ""), false),
    })
    .await;
    let app = support::spawn_app_with(
        Db::Sqlite,
        &[
            ("OPENAI_BASE_URL", &upstream.base),
            ("UPSTREAM_TIMEOUT_SECONDS", "5"),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("broken@example.com").await;
    for n in 0..4 {
        let started = std::time::Instant::now();
        let resp = app.chat(&token, &ask(false)).await;
        assert_eq!(resp.status(), 502, "broken answer {n}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "answer {n} was not waited out"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error", "{body}");
    }
    let resp = app.chat(&token, &ask(false)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "fine");
    assert_eq!(
        upstream.accepted.load(Ordering::SeqCst),
        5,
        "no connection that carried a broken answer is used again"
    );
}

#[tokio::test]
async fn answers_that_are_not_completions_are_502s_and_only_top_level_usage_counts() {
    let answers = [
        // An error object with a 200.
        r#"{"error":{"message":"overloaded"}}"#.to_owned(),
        // Two objects.
        r#"{"choices":[]} {"choices":[]}"#.to_owned(),
        // Cut short.
        r#"{"choices":[{"message":{"content":"hi"}}"#.to_owned(),
        // `choices` that is not a list, or given twice.
        r#"{"choices":{}}"#.to_owned(),
        r#"{"choices":[],"choices":[]}"#.to_owned(),
        // A count that is not a whole number.
        r#"{"choices":[],"usage":{"prompt_tokens":"3","completion_tokens":1}}"#.to_owned(),
        // A completion whose text and extension members mention usage; only the top-level
        // member is the answer's.
        r#"{ "id" : "x", "choices" : [{"message":{"content":"\"usage\":{\"prompt_tokens\":999}"}}],
            "meta":{"usage":{"prompt_tokens":555,"completion_tokens":555}},
            "usage" : { "prompt_tokens" : 7 , "completion_tokens" : 2, "total_tokens": 9,
                        "completion_tokens_details": {"reasoning_tokens": 100} } }"#
            .to_owned(),
    ];
    let last = answers.len() - 1;
    let upstream = start_scripted(move |n| (with_length(&answers[n.min(last)], ""), false)).await;
    let app = support::spawn_app_with(Db::Sqlite, &[("OPENAI_BASE_URL", &upstream.base)]).await;
    let (token, _) = app.user_tokens("shapes@example.com").await;
    for n in 0..last {
        let resp = app.chat(&token, &ask(false)).await;
        assert_eq!(resp.status(), 502, "answer {n}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["error"]["message"], "the upstream's answer is not in the OpenAI format",
            "answer {n}"
        );
    }
    let resp = app.chat(&token, &ask(false)).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["meta"]["usage"]["prompt_tokens"], 555,
        "forwarded as it came"
    );
    // Every request reached the upstream and is recorded; only the completion has tokens.
    let start = std::time::Instant::now();
    loop {
        let usage: Value = app.get_authed("/usage", &token).await.json().await.unwrap();
        if usage["total"]["requests"] == u64::try_from(last + 1).unwrap() {
            assert_eq!(usage["total"]["prompt_tokens"], 7, "{usage}");
            assert_eq!(usage["total"]["completion_tokens"], 2, "{usage}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{usage}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
