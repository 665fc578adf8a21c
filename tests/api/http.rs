//! The HTTP surface every endpoint shares: headers, CORS, request ids, error envelopes, docs.

use relay::config::{Config, Mode};
use serde_json::Value;

use crate::support::{self, Db, spawn_app, spawn_app_with};

async fn envelope(resp: reqwest::Response) -> Value {
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    assert!(body["error"].get("param").is_some(), "{body}");
    body["error"].clone()
}

#[tokio::test]
async fn security_headers_on_every_response() {
    let app = spawn_app(Db::Sqlite).await;
    for (method, path) in [
        (reqwest::Method::GET, "/api/v1/health"),
        (reqwest::Method::GET, "/nowhere"),
        (reqwest::Method::POST, "/api/v1/auth/login"),
    ] {
        let resp = app
            .client
            .request(method, app.url(path))
            .send()
            .await
            .unwrap();
        let h = resp.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'")
        );
        assert!(h.contains_key("x-request-id"), "{path}");
    }
    let health = app.get("/health").await;
    assert!(
        health.headers().get("cache-control").is_none(),
        "no-store is for auth responses"
    );
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn request_ids_are_echoed_when_sane_and_replaced_otherwise() {
    let app = spawn_app(Db::Sqlite).await;
    let get = |id| app.get_with_header("/health", "x-request-id", id);
    let resp = get("client-id_1.2").await;
    assert_eq!(resp.headers()["x-request-id"], "client-id_1.2");
    for bad in ["has space", "semi;colon", "<script>"] {
        let resp = get(bad).await;
        let id = resp.headers()["x-request-id"].to_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{bad} -> {id}");
    }
    let long: &'static str = Box::leak("x".repeat(129).into_boxed_str());
    let resp = get(long).await;
    assert_ne!(resp.headers()["x-request-id"], long);
    let a = app.get("/health").await;
    let b = app.get("/health").await;
    assert_ne!(a.headers()["x-request-id"], b.headers()["x-request-id"]);
}

#[tokio::test]
async fn every_rejection_uses_the_envelope() {
    let app = spawn_app_with(Db::Sqlite, &[("MAX_REQUEST_BYTES", "1024")]).await;
    let err = envelope(app.client.get(app.url("/nowhere")).send().await.unwrap()).await;
    assert_eq!(err["type"], "not_found_error");

    let resp = app.get("/auth/register").await;
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    assert_eq!(envelope(resp).await["code"], "method_not_allowed");

    let big = format!(
        r#"{{"email": "a@example.com", "password": "{}"}}"#,
        "x".repeat(2000)
    );
    let resp = app
        .post_raw("/auth/register", "application/json", big)
        .await;
    assert_eq!(resp.status(), 413);
    assert_eq!(envelope(resp).await["code"], "request_too_large");

    let resp = app
        .post_raw("/auth/login", "application/json", "[1, 2")
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(envelope(resp).await["type"], "invalid_request_error");

    for bad in [
        &b"{\"email\": \"\xff\xfe\", \"password\": \"x\"}"[..],
        br#"{"email": "\ud800", "password": "x"}"#,
    ] {
        let resp = app
            .post_raw("/auth/login", "application/json", bad.to_vec())
            .await;
        assert_eq!(resp.status(), 400, "{}", String::from_utf8_lossy(bad));
        assert_eq!(envelope(resp).await["code"], "invalid_json");
    }

    let resp = app
        .post_raw("/auth/login", "application/xml", "<login/>")
        .await;
    assert_eq!(resp.status(), 415);
    envelope(resp).await;

    let resp = app
        .client
        .post(app.api("/auth/login"))
        .form(&[("username", "a@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(envelope(resp).await["param"], "password");
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let app = spawn_app(Db::Sqlite).await;
    let get_from = |origin| app.get_with_header("/health", "origin", origin);
    let resp = get_from("https://app.example.com").await;
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = resp.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for h in ["x-request-id", "retry-after", "x-ratelimit-remaining"] {
        assert!(exposed.contains(h), "{exposed}");
    }
    // What the answer depends on is said once, on every answer, CORS or not.
    const VARY: &str = "origin, access-control-request-method, access-control-request-headers";
    let vary = |resp: &reqwest::Response| {
        let values: Vec<_> = resp.headers().get_all("vary").iter().collect();
        assert_eq!(values, [VARY], "{:?}", resp.headers());
    };
    vary(&resp);
    let resp = get_from("https://evil.example.com").await;
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    vary(&resp);
    vary(&app.get("/nowhere").await);
    // A request without `Origin` is no browser's cross-origin request: no CORS header at all.
    let plain = app.get("/health").await;
    assert!(
        plain
            .headers()
            .keys()
            .all(|name| !name.as_str().starts_with("access-control-")),
        "{:?}",
        plain.headers()
    );
    vary(&plain);
    // Nor is an OPTIONS without `Origin` a preflight: the route answers it (405, as any method
    // it does not serve), not the CORS layer.
    let options = app
        .client
        .request(reqwest::Method::OPTIONS, app.api("/auth/login"))
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), 405);
    assert!(
        options
            .headers()
            .get("access-control-allow-methods")
            .is_none()
    );

    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.api("/auth/login"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", SDK_HEADERS)
            .send()
    };
    let resp = preflight("https://app.example.com").await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    vary(&resp);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    for m in ["GET", "POST", "PATCH", "DELETE", "OPTIONS"] {
        assert!(methods.contains(m), "{methods}");
    }
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in SDK_HEADERS.split(", ") {
        assert!(allowed.contains(name), "{name} not in {allowed}");
    }
    let resp = preflight("https://evil.example.com").await.unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    // Local development servers are allowed in --dev only.
    let resp = preflight("http://localhost:5173").await.unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

/// What the official `openai` npm SDK sends from a browser page (v5/v6), besides the body.
const SDK_HEADERS: &str = "authorization, content-type, x-request-id, x-stainless-arch, \
    x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-retry-count, \
    x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout, openai-organization, \
    openai-project, idempotency-key";

#[tokio::test]
async fn dev_mode_allows_any_local_development_origin() {
    let db = std::sync::Arc::new(crate::support::TestDb::new(Db::Sqlite).await);
    let app = crate::support::spawn_app_on(db, &[], relay::config::Mode::Dev).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.api("/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", SDK_HEADERS)
            .send()
    };
    for origin in [
        "http://localhost:5173",
        "http://127.0.0.1:3000",
        "https://app.example.com",
    ] {
        let resp = preflight(origin).await.unwrap();
        assert_eq!(resp.headers()["access-control-allow-origin"], origin);
    }
    for origin in [
        "http://localhost:5173.evil.example",
        "https://localhost:5173",
        "http://localhost",
        "http://evil.example.com",
    ] {
        let resp = preflight(origin).await.unwrap();
        assert!(
            resp.headers().get("access-control-allow-origin").is_none(),
            "{origin}"
        );
    }
}

#[tokio::test]
async fn unknown_paths_name_the_path_and_what_relay_serves() {
    let app = spawn_app(Db::Sqlite).await;
    for path in ["/api/v1/nothing/here", "/api/v1/completions", "/v1/models"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        let err = envelope(resp).await;
        assert_eq!(err["code"], "not_found", "{path}");
        let message = err["message"].as_str().unwrap();
        assert!(
            message.contains(path) && message.contains("chat/completions"),
            "{path}: {message}"
        );
    }
}

#[tokio::test]
async fn docs_only_in_debug() {
    let app = spawn_app(Db::Sqlite).await;
    for path in ["/docs", "/docs/", "/openapi.json"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    let app = spawn_app_with(Db::Sqlite, &[("DEBUG", "true")]).await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/api/v1/auth/register",
        "/api/v1/auth/login",
        "/api/v1/auth/me",
        "/api/v1/auth/refresh",
        "/api/v1/auth/logout",
        "/api/v1/health",
        "/api/v1/health/detailed",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("swagger"));
}

/// The playground page's CSP: its own script, style and API calls, nothing inline.
const PLAYGROUND_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

#[tokio::test]
async fn the_playground_page_is_served_in_dev_mode_or_when_asked_for() {
    // Off by default: `/` and the page's files are the API's JSON 404.
    let app = spawn_app(Db::Sqlite).await;
    for path in ["/", "/playground.js", "/playground.css"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(envelope(resp).await["code"], "not_found", "{path}");
    }

    let db = std::sync::Arc::new(crate::support::TestDb::new(Db::Sqlite).await);
    let dev = crate::support::spawn_app_on(db, &[], Mode::Dev).await;
    let asked = spawn_app_with(Db::Sqlite, &[("PLAYGROUND", "true")]).await;
    for app in [dev, asked] {
        let get = |path: &str| app.client.get(app.url(path)).send();
        let page = get("/").await.unwrap();
        assert_eq!(page.status(), 200);
        let h = page.headers();
        assert_eq!(h["content-type"], "text/html; charset=utf-8");
        assert_eq!(h["content-security-policy"], PLAYGROUND_CSP);
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let html = page.text().await.unwrap();
        assert!(html.contains(r#"<script type="module" src="/playground.js">"#));
        assert!(
            !html.contains("<style") && !html.contains(" style="),
            "inline style"
        );

        let script = get("/playground.js").await.unwrap();
        assert_eq!(script.status(), 200);
        assert_eq!(
            script.headers()["content-type"],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(script.headers()["content-security-policy"], PLAYGROUND_CSP);
        assert!(script.text().await.unwrap().contains("token_expired"));

        let style = get("/playground.css").await.unwrap();
        assert_eq!(style.headers()["content-type"], "text/css; charset=utf-8");

        // The API keeps its own CSP.
        let health = app.get("/health").await;
        assert_eq!(
            health.headers()["content-security-policy"],
            "default-src 'none'; frame-ancestors 'none'"
        );
    }
}

#[tokio::test]
async fn detailed_health_reports_each_check() {
    let app = spawn_app(Db::Sqlite).await;
    let (status, body) = app.health_detailed().await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["database"]["status"], "ok");
    assert!(body["checks"]["database"]["latency_ms"].is_number());
    assert!(body["uptime_seconds"].is_number());
    assert!(body["rate_limiter"].is_string());
    let text = body.to_string();
    assert!(!text.contains(support::SECRET) && !text.contains("sk-test-upstream-key"));
}

#[tokio::test]
async fn a_panicking_handler_becomes_a_500_envelope() {
    let config =
        Config::from_vars(&support::test_vars("sqlite://unused.db", &[]), Mode::Serve).unwrap();
    let routes = axum::Router::new().route(
        "/boom",
        axum::routing::get(|| async {
            let v: Vec<String> = Vec::new();
            v[1].clone()
        }),
    );
    let app = relay::http::with_layers(routes, &config, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let resp = reqwest::get(format!("http://{addr}/boom")).await.unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().contains_key("x-request-id"));
    let err = envelope(resp).await;
    assert_eq!(err["type"], "server_error");
    assert_eq!(err["message"], "internal server error");
}

#[tokio::test]
async fn oversized_request_heads_are_refused_and_the_server_keeps_serving() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app(Db::Sqlite).await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let big = "a".repeat(70 * 1024);
    let head = format!("GET /api/v1/health HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    // The server may stop reading (and close) before the whole head is written.
    let _ = tcp.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("the connection is answered and closed, not left open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "a 70 KiB head is refused: {answer:?}"
    );
    // Large but reasonable heads (big cookies, long tokens) still pass.
    let resp = app
        .client
        .get(app.url("/api/v1/health"))
        .header("x-big", "a".repeat(32 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn request_framing_is_never_guessed_at_and_pipelining_works() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app(Db::Sqlite).await;
    let exchange = |raw: String| async move {
        let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        tcp.write_all(raw.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tcp.read_to_end(&mut answer),
        )
        .await
        .expect("the connection is closed after its last answer");
        String::from_utf8_lossy(&answer).into_owned()
    };
    // A smuggling attempt: a length for one reader, chunked for another, and a second request
    // hidden in the body. Refused whole; the hidden request is never served.
    let hidden = "GET /api/v1/health/detailed HTTP/1.1\r\nhost: x\r\n\r\n";
    let answer = exchange(format!(
        "POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.contains("\"code\":\"bad_request\""), "{answer}");
    // Pipelined requests, one of them with a chunked body, answered in order on one connection.
    let body = r#"{"email":"chunked@example.com","password":"a long enough password"}"#;
    let answer = exchange(format!(
        "GET /api/v1/health HTTP/1.1\r\nhost: x\r\n\r\n\
         POST /api/v1/auth/register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\n\r\n{:x}\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n\
         GET /api/v1/nowhere HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        10,
        &body[..10],
        body.len() - 10,
        &body[10..]
    ))
    .await;
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answer[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "201", "404"], "{answer}");
    assert!(answer.contains("chunked@example.com"), "{answer}");
}
