//! `DATABASE_URL`, parsed once: which engine, and where. The store connects with the result.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr as _;

use sqlx::postgres::PgConnectOptions;

use super::parse::redact_url;

/// The database relay keeps users and tokens in.
#[derive(Clone)]
pub enum Database {
    /// An SQLite file at this path (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL server (the options hold the password: never print them).
    Postgres(Box<PgConnectOptions>),
}

impl Database {
    /// Reads a `DATABASE_URL`. `sqlite://./x.db` and the seed's `sqlite:///./x.db` both mean
    /// `./x.db`; `sqlite:///abs/x.db` means `/abs/x.db`. Errors never show a password.
    pub fn from_url(url: &str) -> Result<Database, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return PgConnectOptions::from_str(url)
                .map(|options| Database::Postgres(Box::new(options)))
                .map_err(|e| {
                    format!(
                        "is not a valid PostgreSQL URL ({})",
                        redact_url(&e.to_string())
                    )
                });
        }
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| {
                format!(
                    "{url:?} is neither sqlite://PATH nor postgres://…",
                    url = redact_url(url)
                )
            })?;
        let path = rest.split('?').next().unwrap_or_default();
        let path = if let Some(relative) = path.strip_prefix("/./") {
            format!("./{relative}")
        } else {
            path.to_owned()
        };
        if path.is_empty() || path == ":memory:" {
            return Err("an SQLite database needs a file path, e.g. sqlite://./app.db".into());
        }
        Ok(Database::Sqlite(PathBuf::from(path)))
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn engine(&self) -> &'static str {
        match self {
            Database::Sqlite(_) => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Database::Postgres(options) => f
                .debug_struct("Postgres")
                .field("host", &options.get_host())
                .field("port", &options.get_port())
                .field("database", &options.get_database())
                .finish_non_exhaustive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_url_forms() {
        for (url, path) in [
            ("sqlite://./app.db", "./app.db"),
            ("sqlite:///./app.db", "./app.db"),
            ("sqlite:///abs/x.db", "/abs/x.db"),
            ("sqlite://x.db?mode=rwc", "x.db"),
            ("sqlite:data/x.db", "data/x.db"),
        ] {
            match Database::from_url(url).unwrap() {
                Database::Sqlite(p) => assert_eq!(p, PathBuf::from(path), "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert_eq!(
            Database::from_url("postgres://u@h/db").unwrap().engine(),
            "postgres"
        );
        assert!(Database::from_url("mysql://h/db").is_err());
        assert!(Database::from_url("sqlite://").is_err());
    }

    #[test]
    fn postgres_passwords_are_never_shown() {
        let db = Database::from_url("postgres://u:hunter2@db:5433/relay").unwrap();
        let shown = format!("{db:?}");
        assert!(
            shown.contains("relay") && !shown.contains("hunter2"),
            "{shown}"
        );
        let err = Database::from_url("postgres://u:hunter2@db:notaport/relay").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
