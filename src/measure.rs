//! Metric series, named in one place, with bounded labels, and the Prometheus exporter.
//!
//! Series are recorded through the `metrics` facade; the handles of the series a request
//! touches are kept per thread (see [`Handles`]). [`install`] puts the Prometheus recorder of `metrics-exporter-prometheus` behind it (its
//! recorder and text renderer only: relay serves `GET /metrics` itself). Without a recorder
//! installed (`METRICS_ENABLED=false`), recording costs a check and nothing else.
//!
//! Labels are bounded: routes are route templates (never raw paths), methods the standard
//! ones, statuses numbers, models the first [`MAX_MODELS`] seen (then `other`), cut to
//! [`MAX_MODEL_LABEL`] bytes. No label ever holds a user id, an email or a key.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by `route`, `method` and `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "relay_http_requests_total";
/// Time from a request's arrival to the end of its answer (a stream's last byte), by `route`.
pub const HTTP_REQUEST_DURATION: &str = "relay_http_request_duration_seconds";
/// Requests that reached the upstream, by `endpoint`, `model` and `outcome`.
pub const UPSTREAM_REQUESTS_TOTAL: &str = "relay_upstream_requests_total";
/// Time from a request's arrival to the upstream's first byte, by `model`.
pub const UPSTREAM_FIRST_BYTE: &str = "relay_upstream_first_byte_seconds";
/// Tokens used, by `model` and `kind` (`prompt` | `completion`); fed by the usage writer, the
/// one place where each request's usage (reported or estimated) is final.
pub const TOKENS_TOTAL: &str = "relay_tokens_total";
/// Rate-limit decisions, by `endpoint` (`tokens` for token limits), `outcome` (`allowed` |
/// `refused`) and `backend` (`redis` | `memory`).
pub const RATELIMIT_DECISIONS_TOTAL: &str = "relay_ratelimit_decisions_total";
/// 1 while rate limits are decided in Redis, 0 in memory.
pub const RATELIMIT_BACKEND: &str = "relay_ratelimit_backend";
/// Streams being relayed now.
pub const ACTIVE_STREAMS: &str = "relay_active_streams";
/// Always 1, labelled with the `version`.
pub const BUILD_INFO: &str = "relay_build_info";
/// Usage records dropped (the queue was full, or the database refused them for too long).
pub const USAGE_RECORDS_DROPPED_TOTAL: &str = "relay_usage_records_dropped_total";

/// Histogram buckets, in seconds: from half a millisecond (relay's own overhead) to five
/// minutes (a long stream).
pub const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Installs the Prometheus recorder (once per process; later calls get the same handle) and
/// starts its upkeep (which drains histogram samples) every 5 seconds on the current runtime.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    // Held while installing: two apps built at once in one process (tests) must not both try.
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut installed = HANDLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = &*installed {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install_recorder()?;
    GLOBAL_RECORDER.store(
        metrics::with_recorder(recorder_address),
        std::sync::atomic::Ordering::Relaxed,
    );
    *installed = Some(handle.clone());
    drop(installed);
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Where the installed (global) recorder lives; 0 before [`install`]. It is never dropped, so
/// its address names it for the life of the process.
static GLOBAL_RECORDER: AtomicUsize = AtomicUsize::new(0);

fn recorder_address(recorder: &dyn metrics::Recorder) -> usize {
    std::ptr::from_ref(recorder).cast::<()>() as usize
}

/// The handles of the series a call site records to, kept per thread for the installed
/// recorder: the `metrics` macros look every series up in the recorder's registry (hashing its
/// name and labels, allocating the labels' values), which cost about 5 % of a request. Keyed
/// by the labels that are `'static` (and a number), then by the one that is not (a route or a
/// model). Bounded: at most [`MAX_KEYS`] keys and [`MAX_NAMES`] names a key; beyond, series
/// are looked up as without the cache. Under a local recorder (tests), never used.
struct Handles<V> {
    /// foldhash: the keys are `'static` labels, not a client's.
    by_key: HashMap<SeriesKey, Vec<(Box<str>, V)>, foldhash::fast::RandomState>,
}

/// The `'static` labels of a series, and a number (a status).
type SeriesKey = (&'static str, &'static str, u16);

const MAX_KEYS: usize = 256;
const MAX_NAMES: usize = 128;

impl<V> Default for Handles<V> {
    fn default() -> Self {
        Handles {
            by_key: HashMap::default(),
        }
    }
}

impl<V: Clone> Handles<V> {
    fn find(&self, key: SeriesKey, name: &str) -> Option<V> {
        let names = self.by_key.get(&key)?;
        names
            .iter()
            .find(|(n, _)| **n == *name)
            .map(|(_, v)| v.clone())
    }

    fn keep(&mut self, key: SeriesKey, name: &str, handles: V) {
        if self.by_key.len() >= MAX_KEYS && !self.by_key.contains_key(&key) {
            self.by_key.clear();
        }
        let names = self.by_key.entry(key).or_default();
        if names.len() < MAX_NAMES {
            names.push((name.into(), handles));
        }
    }
}

/// The cached handles for `key` and `name` in `cache`, made by `make` the first time (and
/// every time when the recorder in use is not the installed one, or the thread is ending).
/// `name` must be short: it is kept.
fn cached<V: Clone>(
    cache: &'static std::thread::LocalKey<RefCell<Handles<V>>>,
    key: SeriesKey,
    name: &str,
    make: impl FnOnce() -> V,
) -> V {
    let global = GLOBAL_RECORDER.load(std::sync::atomic::Ordering::Relaxed);
    if global == 0 || metrics::with_recorder(recorder_address) != global {
        return make();
    }
    if let Ok(Some(handles)) = cache.try_with(|cache| cache.borrow().find(key, name)) {
        return handles;
    }
    let handles = make();
    let _ = cache.try_with(|cache| cache.borrow_mut().keep(key, name, handles.clone()));
    handles
}

thread_local! {
    static REQUEST_SERIES: RefCell<Handles<(metrics::Counter, metrics::Histogram)>> =
        RefCell::default();
    static UPSTREAM_SERIES: RefCell<Handles<metrics::Counter>> = RefCell::default();
    static FIRST_BYTE_SERIES: RefCell<Handles<metrics::Histogram>> = RefCell::default();
    static TOKEN_SERIES: RefCell<Handles<(metrics::Counter, metrics::Counter)>> =
        RefCell::default();
    static DECISION_SERIES: RefCell<Handles<metrics::Counter>> = RefCell::default();
    static STREAM_GAUGE: RefCell<Handles<metrics::Gauge>> = RefCell::default();
}

/// The label of a request's method: the standard ones, else `other`.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Counts one answered request (`route` is its template, `None` when no route matched).
pub fn count_request(route: Option<&str>, method: &http::Method, status: u16, took: Duration) {
    let route = route.unwrap_or("unmatched");
    let method = method_label(method);
    let (requests, duration) = cached(&REQUEST_SERIES, (method, "", status), route, || {
        let route = route.to_owned();
        (
            metrics::counter!(
                HTTP_REQUESTS_TOTAL,
                "route" => route.clone(),
                "method" => method,
                "status" => status.to_string(),
            ),
            metrics::histogram!(HTTP_REQUEST_DURATION, "route" => route),
        )
    });
    requests.increment(1);
    duration.record(took.as_secs_f64());
}

/// Counts one request that reached the upstream, and its time to first byte if it had one.
pub fn count_upstream(
    endpoint: &'static str,
    model: &str,
    outcome: &'static str,
    first_byte: Option<Duration>,
) {
    let model = cut_model(model);
    if let Some(first_byte) = first_byte {
        cached(
            &FIRST_BYTE_SERIES,
            ("", "", 0),
            model,
            || metrics::histogram!(UPSTREAM_FIRST_BYTE, "model" => model_label(model)),
        )
        .record(first_byte.as_secs_f64());
    }
    cached(&UPSTREAM_SERIES, (endpoint, outcome, 0), model, || {
        metrics::counter!(
            UPSTREAM_REQUESTS_TOTAL,
            "endpoint" => endpoint,
            "model" => model_label(model),
            "outcome" => outcome,
        )
    })
    .increment(1);
}

/// Counts one rate-limit decision.
pub fn count_decision(endpoint: &'static str, allowed: bool, backend: &'static str) {
    let outcome = if allowed { "allowed" } else { "refused" };
    cached(
        &DECISION_SERIES,
        (endpoint, backend, u16::from(allowed)),
        "",
        || {
            metrics::counter!(
                RATELIMIT_DECISIONS_TOTAL,
                "endpoint" => endpoint,
                "outcome" => outcome,
                "backend" => backend,
            )
        },
    )
    .increment(1);
}

/// Sets [`RATELIMIT_BACKEND`] (at each scrape).
pub fn set_backend(redis: bool) {
    metrics::gauge!(RATELIMIT_BACKEND).set(if redis { 1.0 } else { 0.0 });
}

/// A stream being relayed: counted in [`ACTIVE_STREAMS`] from its making to its drop.
#[derive(Debug)]
pub struct ActiveStream(());

impl ActiveStream {
    /// Counts a stream in.
    pub fn start() -> Self {
        active_streams().increment(1.0);
        ActiveStream(())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        active_streams().decrement(1.0);
    }
}

fn active_streams() -> metrics::Gauge {
    cached(&STREAM_GAUGE, ("", "", 0), "", || {
        metrics::gauge!(ACTIVE_STREAMS)
    })
}

/// Distinct model labels kept; later models are counted as `other`.
pub const MAX_MODELS: usize = 100;

/// The longest model label, in bytes: without `ALLOWED_MODELS` clients name any model they
/// like, up to the request's size, and labels (and the cached handles named by them) are kept
/// for the life of the process.
pub const MAX_MODEL_LABEL: usize = 256;

/// `model`, cut to [`MAX_MODEL_LABEL`] bytes (on a character boundary).
fn cut_model(model: &str) -> &str {
    let mut end = model.len().min(MAX_MODEL_LABEL);
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    &model[..end]
}

/// The models given labels so far (at most [`MAX_MODELS`]).
#[derive(Default)]
pub struct ModelLabels(Mutex<HashSet<String>>);

impl ModelLabels {
    /// The label for `model`: itself while fewer than [`MAX_MODELS`] distinct models have been
    /// labelled (or when it is one of them), else `other`.
    pub fn label(&self, model: &str) -> String {
        let model = cut_model(model);
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < MAX_MODELS {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }
}

/// The process's model labels.
pub fn model_label(model: &str) -> String {
    static MODELS: OnceLock<ModelLabels> = OnceLock::new();
    MODELS.get_or_init(ModelLabels::default).label(model)
}

/// Counts one request's tokens in [`TOKENS_TOTAL`].
pub fn count_tokens(model: &str, prompt: u64, completion: u64) {
    if prompt == 0 && completion == 0 {
        return;
    }
    let model = cut_model(model);
    let (prompt_tokens, completion_tokens) = cached(&TOKEN_SERIES, ("", "", 0), model, || {
        let model = model_label(model);
        (
            metrics::counter!(TOKENS_TOTAL, "model" => model.clone(), "kind" => "prompt"),
            metrics::counter!(TOKENS_TOTAL, "model" => model, "kind" => "completion"),
        )
    });
    prompt_tokens.increment(prompt);
    completion_tokens.increment(completion);
}

/// Counts `n` usage records dropped in [`USAGE_RECORDS_DROPPED_TOTAL`].
pub fn count_dropped_records(n: u64) {
    metrics::counter!(USAGE_RECORDS_DROPPED_TOTAL).increment(n);
}

#[cfg(test)]
mod tests {
    use metrics_util::CompositeKey;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    use super::*;

    /// A counter: its name, its labels and its value.
    type Counter = (String, Vec<(String, String)>, u64);
    type Snapshot = Vec<(
        CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        DebugValue,
    )>;

    fn counters(snapshot: Snapshot) -> Vec<Counter> {
        let mut out: Vec<_> = snapshot
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(n) => {
                    let (_, key) = key.into_parts();
                    let labels = key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect();
                    Some((key.name().to_owned(), labels, n))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn tokens_are_counted_by_model_and_kind() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            count_tokens("gpt-test-a", 12, 30);
            count_tokens("gpt-test-a", 1, 2);
            count_tokens("gpt-test-b", 0, 0);
        });
        let label = |model: &str, kind: &str| {
            vec![
                ("model".to_owned(), model.to_owned()),
                ("kind".to_owned(), kind.to_owned()),
            ]
        };
        assert_eq!(
            counters(snapshotter.snapshot().into_vec()),
            vec![
                (
                    TOKENS_TOTAL.to_owned(),
                    label("gpt-test-a", "completion"),
                    32
                ),
                (TOKENS_TOTAL.to_owned(), label("gpt-test-a", "prompt"), 13),
            ]
        );
    }

    #[test]
    fn model_labels_are_short() {
        let models = ModelLabels::default();
        let long = format!(
            "{}é{}",
            "m".repeat(MAX_MODEL_LABEL - 1),
            "x".repeat(1 << 20)
        );
        let label = models.label(&long);
        assert_eq!(
            label,
            "m".repeat(MAX_MODEL_LABEL - 1),
            "cut before the 2-byte é"
        );
        assert_eq!(models.label("gpt-4o"), "gpt-4o");
    }

    #[test]
    fn model_labels_are_bounded() {
        let models = ModelLabels::default();
        let labels: HashSet<String> = (0..MAX_MODELS * 3)
            .map(|i| models.label(&format!("flood-{i}")))
            .collect();
        assert_eq!(
            models.label("flood-0"),
            "flood-0",
            "a model seen first keeps its label"
        );
        assert!(labels.len() <= MAX_MODELS + 1, "{}", labels.len());
        assert!(labels.contains("other"));
    }

    #[tokio::test]
    async fn cached_series_count_as_uncached_ones_and_a_local_recorder_gets_its_own() {
        let handle = install().unwrap();
        let route = |i: usize| format!("/cache-test/{i}");
        let get = http::Method::GET;
        // More routes than a key keeps handles for: the last ones are looked up every time.
        for i in 0..MAX_NAMES + 10 {
            count_request(Some(&route(i)), &get, 200, Duration::ZERO);
        }
        for i in [0, 0, 0, MAX_NAMES + 5] {
            count_request(Some(&route(i)), &get, 200, Duration::ZERO);
        }
        let count_of = |text: &str, i: usize| {
            let series = format!(
                "{HTTP_REQUESTS_TOTAL}{{route=\"{}\",method=\"GET\",status=\"200\"}} ",
                route(i)
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .map(|n| n.trim().to_owned())
        };
        let text = handle.render();
        assert_eq!(count_of(&text, 0).as_deref(), Some("4"), "{text}");
        assert_eq!(count_of(&text, MAX_NAMES + 5).as_deref(), Some("2"));
        assert_eq!(count_of(&text, 1).as_deref(), Some("1"));

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            count_request(Some(&route(0)), &get, 200, Duration::ZERO);
        });
        let local = counters(snapshotter.snapshot().into_vec());
        assert_eq!(local.len(), 1, "{local:?}");
        assert_eq!(local[0].2, 1);
        assert_eq!(count_of(&handle.render(), 0).as_deref(), Some("4"));
    }
}
