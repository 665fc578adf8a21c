//! `GET /metrics`: the series move with traffic, labels stay bounded and never name a user,
//! and `METRICS_TOKEN` guards it.
//!
//! Every app of this test binary shares one process-wide recorder, so the checks use a model
//! name of their own and compare values before and after.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Db, TestApp, spawn_app, spawn_app_with};

/// The values of every series `name{labels…}` (labels as Prometheus prints them, in any
/// order given, among any others).
fn series<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            if series_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
}

/// The value of the first series `name{labels}`, or 0 when absent.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(text, name, labels).next().unwrap_or(0.0)
}

/// The sum of every series `name{labels}`.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(text, name, labels).sum()
}

async fn scrape(app: &TestApp) -> String {
    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    resp.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_move_with_traffic_and_name_no_user() {
    let app = spawn_app(Db::Sqlite).await;
    let email = "metered@example.com";
    let (token, _) = app.user_tokens(email).await;
    let user_id = app.stored_user(email).await.id.to_string();
    let model = format!("metrics-{}", uuid::Uuid::new_v4().simple());
    let before = scrape(&app).await;
    let route = [
        ("route", "/api/v1/chat/completions"),
        ("method", "POST"),
        ("status", "200"),
    ];
    let requests_before = value(&before, "relay_http_requests_total", &route);

    let mut prompt = 0;
    let mut completion = 0;
    for stream in [false, true, false] {
        let body = json!({"model": model, "stream": stream,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "count these four words"}]});
        let resp = app.chat(&token, &body).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let usage = if stream {
            let last = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str::<Value>(d).unwrap())
                .find(|chunk| chunk["usage"].is_object())
                .unwrap();
            last["usage"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
        };
        prompt += usage["prompt_tokens"].as_u64().unwrap();
        completion += usage["completion_tokens"].as_u64().unwrap();
    }
    // An unknown path is counted under `unmatched`, never under its own name.
    let secret_path = format!("/nothing-{}", uuid::Uuid::new_v4().simple());
    assert_eq!(
        app.client
            .get(app.url(&secret_path))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Tokens come from the usage writer, within its 100 ms batching.
    let start = Instant::now();
    let after = loop {
        let text = scrape(&app).await;
        if value(
            &text,
            "relay_tokens_total",
            &[("model", &model), ("kind", "completion")],
        ) > 0.0
        {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "tokens never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(value(&after, "relay_http_requests_total", &route) >= requests_before + 3.0);
    assert_eq!(
        value(
            &after,
            "relay_upstream_requests_total",
            &[("endpoint", "chat"), ("model", &model), ("outcome", "ok")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "relay_tokens_total",
            &[("model", &model), ("kind", "prompt")]
        ),
        prompt as f64
    );
    assert_eq!(
        value(
            &after,
            "relay_tokens_total",
            &[("model", &model), ("kind", "completion")]
        ),
        completion as f64
    );
    assert_eq!(
        value(
            &after,
            "relay_upstream_first_byte_seconds_count",
            &[("model", &model)]
        ),
        3.0
    );
    // A histogram with buckets from half a millisecond to minutes.
    assert!(after.contains("relay_http_request_duration_seconds_bucket{route=\"/api/v1/chat/completions\",le=\"0.0005\"}"));
    assert!(after.contains("le=\"300\""));
    assert!(
        value(
            &after,
            "relay_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ) >= 1.0
    );
    // Summed over backends: the recorder is the process's, and a test beside this one may
    // have made decisions from Redis, whose series can come first.
    assert!(
        sum(
            &after,
            "relay_ratelimit_decisions_total",
            &[("endpoint", "chat"), ("outcome", "allowed")]
        ) >= 3.0,
        "{after}"
    );
    assert!(after.contains("relay_ratelimit_backend "), "{after}");
    assert_eq!(
        value(
            &after,
            "relay_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(after.contains("relay_active_streams"));
    // Nothing that names a user or a raw path.
    for secret in [user_id.as_str(), email, &secret_path[1..], token.as_str()] {
        assert!(!after.contains(secret), "{secret} in /metrics");
    }
}

#[tokio::test]
async fn metrics_token_guards_the_endpoint() {
    let token = "a-metrics-token-for-prometheus";
    let app = spawn_app_with(Db::Sqlite, &[("METRICS_TOKEN", token)]).await;
    let get = |auth: Option<&str>| {
        let mut request = app.client.get(app.url("/metrics"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(Some("Bearer wrong-token-of-the-same-size")).await, 401);
    assert_eq!(get(Some(&format!("Bearer {token}x"))).await, 401);
    assert_eq!(get(Some(&format!("Bearer {token}"))).await, 200);
    // Not under /api/v1, and off entirely when disabled.
    let off = spawn_app_with(Db::Sqlite, &[("METRICS_ENABLED", "false")]).await;
    assert_eq!(
        off.client
            .get(off.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(app.get("/metrics").await.status(), 404);
}

#[test]
fn the_dashboard_queries_only_series_relay_exports() {
    let dashboard: Value =
        serde_json::from_str(include_str!("../../deploy/grafana-dashboard.json")).unwrap();
    let exported = [
        relay::measure::HTTP_REQUESTS_TOTAL,
        relay::measure::HTTP_REQUEST_DURATION,
        relay::measure::UPSTREAM_REQUESTS_TOTAL,
        relay::measure::UPSTREAM_FIRST_BYTE,
        relay::measure::TOKENS_TOTAL,
        relay::measure::RATELIMIT_DECISIONS_TOTAL,
        relay::measure::RATELIMIT_BACKEND,
        relay::measure::ACTIVE_STREAMS,
    ];
    let mut used = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("relay_") {
                    let base = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    assert!(
                        exported.contains(&base),
                        "{name}: not a series relay exports"
                    );
                    used += 1;
                }
            }
        }
    }
    assert!(used >= exported.len());
}
