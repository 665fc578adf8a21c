//! Holding connections: request bodies that never finish, more connections than relay has file
//! descriptors, running out of them. Raw TCP where HTTP clients would not misbehave enough;
//! every attack is on 127.0.0.1, bounded in count and time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use relay::mock::MockOptions;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{self, Db, RelayProcess, spawn_app_with};

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// relay closed it (FIN).
    Eof,
    /// relay reset it.
    Reset,
    /// Still open when we stopped waiting.
    Open,
}

/// Reads until the connection ends or `limit` passes; returns what was read and how it ended.
async fn read_to_close(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> (String, Ending) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let ending = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => break Ending::Open,
            Ok(Ok(0)) => break Ending::Eof,
            Ok(Err(_)) => break Ending::Reset,
            Ok(Ok(n)) => seen.extend_from_slice(&chunk[..n]),
        }
    };
    (String::from_utf8_lossy(&seen).into_owned(), ending)
}

/// A request head announcing a 100-byte JSON body, for `path` with `token` if any.
fn head(path: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST /api/v1{path} HTTP/1.1\r\nHost: relay\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n"
    )
}

/// Connects and sends a head announcing 100 bytes of body, then 5 of them, and no more.
async fn stalled_request(addr: SocketAddr, path: &str, token: Option<&str>) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("{}{{\"ema", head(path, token));
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// Checks that `answer` is a 408 with the OpenAI envelope and `Connection: close`.
fn assert_request_timeout(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    let (headers, body) = answer.split_once("\r\n\r\n").unwrap();
    let headers = headers.to_ascii_lowercase();
    assert!(headers.contains("\r\nconnection: close\r\n"), "{headers}");
    assert!(
        headers.contains("\r\ncontent-type: application/json\r\n"),
        "{headers}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_408_and_the_connection_closed() {
    let app = spawn_app_with(Db::Sqlite, &[("REQUEST_BODY_TIMEOUT_SECONDS", "1")]).await;
    let (token, _) = app.user_tokens("stall@example.com").await;
    let start = Instant::now();
    // An anonymous endpoint and an authenticated one, stalled at the same time.
    let mut register = stalled_request(app.addr, "/auth/register", None).await;
    let mut chat = stalled_request(app.addr, "/chat/completions", Some(&token)).await;
    for stream in [&mut register, &mut chat] {
        let (answer, ending) = read_to_close(stream, Duration::from_secs(3)).await;
        let took = start.elapsed();
        assert_request_timeout(&answer);
        assert_eq!(ending, Ending::Eof, "relay closed the connection");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
        eprintln!("stalled body: 408 and EOF {took:?} after the head");
    }
    // relay is fine: the next request is served.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_at_the_deadline_not_later() {
    let app = spawn_app_with(Db::Sqlite, &[("REQUEST_BODY_TIMEOUT_SECONDS", "1")]).await;
    let stream = TcpStream::connect(app.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(head("/auth/register", None).as_bytes())
        .await
        .unwrap();
    let start = Instant::now();
    // One byte every 300 ms: each read waits far less than the timeout, the whole body
    // (100 bytes) would take 30 s. Stopped after 6 s at most.
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if write.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let (answer, ending) = read_to_close(&mut read, Duration::from_secs(4)).await;
    let took = start.elapsed();
    trickle.abort();
    assert_request_timeout(&answer);
    assert_ne!(ending, Ending::Open, "relay closed the connection");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "cut at the deadline, not later: {took:?}"
    );
    eprintln!("trickled body: 408 {took:?} after the head ({ending:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_keep_alive_connections_outlast_the_body_timeout() {
    // A stream of 15 chunks, 100 ms apart: half again as long as the body timeout.
    let upstream = support::spawn_mock(MockOptions {
        latency: Duration::ZERO,
        chunks: Some(15),
        chunk_delay: Duration::from_millis(100),
    })
    .await;
    let app = spawn_app_with(
        Db::Sqlite,
        &[
            ("REQUEST_BODY_TIMEOUT_SECONDS", "1"),
            ("OPENAI_BASE_URL", &upstream),
        ],
    )
    .await;
    let (token, _) = app.user_tokens("long-stream@example.com").await;
    let start = Instant::now();
    let request = json!({
        "model": "mock-echo", "stream": true,
        "messages": [{"role": "user", "content": "hello there"}]
    });
    let resp = app.chat(&token, &request).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(1400));
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // The same keep-alive connection, idle for longer than the body timeout, takes the next
    // request with a body: each request's deadline is its own.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let resp = app
        .chat(
            &token,
            &json!({"model": "mock-echo", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
}

/// The soft and hard `Max open files` of process `pid`.
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Settings for a `relay serve` child on SQLite in `dir`, without Redis or an upstream.
fn child_vars(dir: &std::path::Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let db = format!("sqlite://{}/relay.db", dir.display());
    let mut settings = vec![
        ("REDIS_URL", ""),
        ("LOG_LEVEL", "info"),
        ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
    ];
    settings.extend_from_slice(extra);
    support::test_vars(&db, &settings).into_iter().collect()
}

fn as_strs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn address(server: &RelayProcess) -> SocketAddr {
    server.base.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_beyond_the_file_limit_cannot_take_relay_down() {
    let dir = tempfile::tempdir().unwrap();
    let vars = child_vars(dir.path(), &[("REQUEST_BODY_TIMEOUT_SECONDS", "2")]);
    // Started with a soft limit of 100 files and a hard one of 256.
    let mut server = RelayProcess::spawn(support::relay_command_with_file_limit(
        "100:256",
        dir.path(),
        &["serve"],
        &as_strs(&vars),
    ));
    let pid = server.child.id();
    assert_eq!(
        open_files_limit(pid),
        ("256".to_owned(), "256".to_owned()),
        "relay raised its soft file limit to the hard one"
    );
    // MAX_CONNECTIONS (10,000 by default) was lowered to fit: 256 less 64.
    let clamped = server
        .wait_for_log(
            "MAX_CONNECTIONS is above the file limit",
            Duration::from_secs(5),
        )
        .expect("the lowered connection limit is logged");
    assert!(clamped.contains("\"max_connections\":192"), "{clamped}");

    // 300 connections that send a head and 5 of 100 body bytes, and then nothing; kept open.
    let addr = address(&server);
    let mut attackers = Vec::new();
    for _ in 0..300 {
        attackers.push(stalled_request(addr, "/auth/register", None).await);
    }
    let attacked = Instant::now();
    assert!(server.child.try_wait().unwrap().is_none(), "relay is alive");

    // The first 192 are cut after 2 s, which frees room for the rest and for this request.
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::get(format!("{}/api/v1/health", server.base)),
    )
    .await;
    let took = attacked.elapsed();
    let health = health.unwrap_or_else(|_| panic!("/health did not answer within 5 s"));
    assert_eq!(health.unwrap().status(), 200);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(server.child.try_wait().unwrap().is_none(), "relay is alive");

    // The first attacker got its 408 and relay closed its side.
    let (answer, ending) = read_to_close(&mut attackers[0], Duration::from_secs(1)).await;
    assert_request_timeout(&answer);
    assert_eq!(ending, Ending::Eof);
    // The cap kept relay below its file limit: accepting never failed.
    let full = server.wait_for_log("connection limit reached", Duration::from_secs(2));
    assert!(full.is_some(), "the full connection limit is logged");
    assert_eq!(server.logged("cannot accept connections"), None);
    eprintln!(
        "health answered {took:?} after the attack; relay holds {} files",
        open_fds(pid)
    );
    drop(attackers);
}

/// CPU time (user + system) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn set_soft_file_limit(pid: u32, soft: &str) {
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .unwrap();
    assert!(status.success(), "prlimit --pid {pid} --nofile={soft}:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_relay_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let vars = child_vars(dir.path(), &[]);
    let server = RelayProcess::start(dir.path(), &["serve"], &as_strs(&vars));
    let pid = server.child.id();
    let (soft, _) = open_files_limit(pid);
    // Room for two more files only (the connection cap was set from the limit at start, so
    // it does not hold relay back here: accept itself fails with EMFILE).
    set_soft_file_limit(pid, &(open_fds(pid) + 2).to_string());

    let addr = address(&server);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: relay\r\n\r\n")
            .await
            .unwrap();
        clients.push(stream);
    }
    let failing = server
        .wait_for_log("cannot accept connections", Duration::from_secs(5))
        .expect("accept failed for want of file descriptors");
    assert!(failing.contains("Too many open files"), "{failing}");

    // Two seconds out of files: a loop retrying at once would burn a core (~200% of these
    // ticks); with the backoff relay stays idle.
    // SAFETY: sysconf reads a system setting and touches no memory of ours.
    let ticks_per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    eprintln!("out of files for 2 s: relay used {used} of {ticks_per_second} ticks a second");
    assert!(
        used * 4 < 2 * ticks_per_second,
        "relay used {used} ticks of CPU in 2 s while out of file descriptors"
    );

    // Files again: every waiting connection is accepted and answered.
    set_soft_file_limit(pid, &soft);
    for stream in &mut clients {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 1024];
        let answered = tokio::time::timeout(Duration::from_secs(3), async {
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed without an answer");
                seen.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        assert!(answered.is_ok(), "no answer after the limit was raised");
        assert!(
            seen.starts_with(b"HTTP/1.1 200 "),
            "{:?}",
            String::from_utf8_lossy(&seen)
        );
    }
    let recovered = server.wait_for_log("accepting connections again", Duration::from_secs(2));
    assert!(recovered.is_some(), "the recovery is logged");
}
