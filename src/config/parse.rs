//! Reading variables: one [`Parser`] collects every problem instead of stopping at the first,
//! plus the small parsers the sections share (lists, origins, URLs, limits).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore as _;
use secrecy::SecretString;
use url::Url;

use super::{Limit, MAX_LIMIT_UNITS};

/// Reads variables from one map and collects the problems found.
pub(super) struct Parser<'a> {
    vars: &'a HashMap<String, String>,
    /// `NAME: what is wrong`, in the order found.
    pub(super) problems: Vec<String>,
}

impl<'a> Parser<'a> {
    pub(super) fn new(vars: &'a HashMap<String, String>) -> Self {
        Parser {
            vars,
            problems: Vec::new(),
        }
    }

    /// A set, non-blank value.
    pub(super) fn get(&self, name: &str) -> Option<&'a str> {
        self.vars
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Whether `name` is present but blank (`REDIS_URL=` means "no Redis").
    pub(super) fn set_but_empty(&self, name: &str) -> bool {
        self.vars.get(name).is_some_and(|v| v.trim().is_empty())
    }

    /// A secret from `name`, or read from the file named by `name_FILE` (Docker and systemd
    /// secrets), with one trailing newline removed: what `echo key > file` leaves. Returns the
    /// value and the variable it came from, for messages. Setting both is a problem (which one
    /// wins would be a guess), and so is a file that cannot be read or is empty; no message
    /// quotes the file's content.
    pub(super) fn secret(&mut self, name: &str) -> Option<(String, String)> {
        let file_var = format!("{name}_FILE");
        let direct = self.get(name);
        let Some(path) = self.get(&file_var) else {
            return direct.map(|v| (v.to_owned(), name.to_owned()));
        };
        if direct.is_some() {
            self.problem(
                &file_var,
                format!("{name} and {file_var} are both set; set only one of them"),
            );
            return None;
        }
        match std::fs::read_to_string(path) {
            Ok(mut content) => {
                if content.ends_with('\n') {
                    content.pop();
                    if content.ends_with('\r') {
                        content.pop();
                    }
                }
                if content.is_empty() {
                    self.problem(&file_var, format!("the file {path:?} is empty"));
                    return None;
                }
                Some((content, file_var))
            }
            Err(e) => {
                // The error says why (missing, permission denied, not UTF-8), never what.
                self.problem(&file_var, format!("cannot read the file {path:?}: {e}"));
                None
            }
        }
    }

    pub(super) fn problem(&mut self, name: &str, why: impl fmt::Display) {
        self.problems.push(format!("{name}: {why}"));
    }

    pub(super) fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or(default).to_owned()
    }

    pub(super) fn parse<T: std::str::FromStr>(&mut self, name: &str, default: T, why: &str) -> T {
        match self.get(name) {
            None => default,
            Some(raw) => match raw.parse() {
                Ok(v) => v,
                Err(_) => {
                    self.problem(name, format!("{raw:?} {why}"));
                    default
                }
            },
        }
    }

    pub(super) fn boolean(&mut self, name: &str, default: bool) -> bool {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(other) => {
                self.problem(name, format!("{other:?} is not a boolean (true or false)"));
                default
            }
        }
    }

    /// An http(s) URL without a trailing slash.
    pub(super) fn url(&mut self, name: &str, default: &str) -> Url {
        let raw = self.get(name).unwrap_or(default).trim_end_matches('/');
        match Url::parse(raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => url,
            Ok(url) => {
                self.problem(
                    name,
                    format!(
                        "{raw:?} has scheme {:?}; expected http or https",
                        url.scheme()
                    ),
                );
                Url::parse(default).unwrap_or(url)
            }
            Err(e) => {
                self.problem(name, format!("{raw:?} is not a URL with a scheme ({e})"));
                #[allow(clippy::expect_used)]
                Url::parse("http://invalid.invalid").expect("static URL parses")
            }
        }
    }

    /// A bucket shape from `req_name` and `win_name`, each defaulting to `fallback`'s.
    pub(super) fn limit(
        &mut self,
        req_name: &str,
        win_name: &str,
        fallback: Option<Limit>,
    ) -> Limit {
        let fallback = fallback.unwrap_or(Limit {
            requests: 100,
            window: Duration::from_secs(3600),
        });
        let requests = self.parse(
            req_name,
            fallback.requests,
            "is not a whole number of requests",
        );
        let window = self.parse(
            win_name,
            fallback.window.as_secs(),
            "is not a whole number of seconds",
        );
        if requests == 0 {
            self.problem(req_name, "must be at least 1");
        }
        if window == 0 {
            self.problem(win_name, "must be at least 1 second");
        }
        if u128::from(requests) * u128::from(window) * 1000 > u128::from(MAX_LIMIT_UNITS) {
            self.problem(
                req_name,
                format!("× {win_name} is too large (requests × window in ms must stay under 2^53)"),
            );
        }
        Limit {
            requests,
            window: Duration::from_secs(window.max(1)),
        }
    }
}

/// Describes a `.env` error without quoting the file: its lines may hold secrets.
pub(super) fn dotenv_problem(path: &Path, err: &dotenvy::Error) -> String {
    match err {
        dotenvy::Error::LineParse(_, _) => format!(
            "{}: cannot be parsed (a malformed line, e.g. an unclosed quote; its content is not \
             shown because it may hold a secret)",
            path.display()
        ),
        dotenvy::Error::Io(e) => format!("{}: cannot be read: {e}", path.display()),
        _ => format!("{}: cannot be read", path.display()),
    }
}

/// A key for this process only (dev/debug without `SECRET_KEY`).
pub(super) fn random_secret() -> SecretString {
    let mut bytes = [0u8; 48];
    rand::rng().fill_bytes(&mut bytes);
    SecretString::from(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Parses a JSON list (`["a","b"]`) or a comma list (`a, b`); blanks are dropped.
pub fn parse_list(raw: &str) -> Result<Vec<String>, String> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        let list: Vec<String> = serde_json::from_str(trimmed)
            .map_err(|e| format!("is not a JSON list of strings ({e})"))?;
        Ok(list
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect())
    } else {
        Ok(trimmed
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect())
    }
}

/// Checks that `origin` is `scheme://host[:port]` and nothing more.
pub(super) fn check_origin(origin: &str) -> Result<(), &'static str> {
    let url = Url::parse(origin).map_err(|_| "is not an origin like https://app.example.com")?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("is not an http(s) origin");
    }
    if url.path() != "/" || origin.ends_with('/') || url.query().is_some() {
        return Err("must be scheme://host[:port] with no path or trailing slash");
    }
    Ok(())
}

/// Replaces a URL's password with `***` so that it can be logged.
pub fn redact_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_owned(),
    }
}
