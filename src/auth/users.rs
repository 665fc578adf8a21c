//! Creating users: the validation and hashing shared by `POST /auth/register` and
//! `relay user create`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::Passwords;
use super::password::normalized;
use crate::error::ApiError;
use crate::store::{NewUser, Store, StoreError, UserRecord};

/// Shortest password accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password accepted, in characters.
pub const MAX_PASSWORD_CHARS: usize = 128;
/// Largest password accepted as typed, in bytes (before normalisation; 128 characters of up
/// to four bytes, each possibly decomposed).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest display name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 200;

/// A user as the API shows it (never the hash).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    /// The user's id.
    pub id: Uuid,
    /// Lower-cased email.
    pub email: String,
    /// Display name.
    pub full_name: Option<String>,
    /// Inactive users cannot log in.
    pub is_active: bool,
    /// Admin flag.
    pub is_admin: bool,
    /// Registration time (RFC 3339).
    pub created_at: DateTime<Utc>,
}

/// A user as admins see it: with the user's own token limit.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AdminViewUser {
    /// What the user sees of themself.
    #[serde(flatten)]
    pub user: User,
    /// The user's own token limit (tokens per window); `null`: `TOKEN_LIMIT`.
    pub token_limit: Option<i64>,
    /// Its window in seconds; `null`: `TOKEN_LIMIT_WINDOW`.
    pub token_limit_window: Option<i64>,
}

impl From<UserRecord> for AdminViewUser {
    fn from(r: UserRecord) -> Self {
        AdminViewUser {
            token_limit: r.token_limit,
            token_limit_window: r.token_limit_window,
            user: User::from(r),
        }
    }
}

impl From<UserRecord> for User {
    fn from(r: UserRecord) -> Self {
        User {
            id: r.id,
            email: r.email,
            full_name: r.full_name,
            is_active: r.is_active,
            is_admin: r.is_admin,
            created_at: r.created_at,
        }
    }
}

/// Trims and lower-cases an email, and checks that it is an address.
pub fn normalize_email(raw: &str) -> Result<String, ApiError> {
    let email = raw.trim().to_lowercase();
    // A plain `local@domain.tld`: no display name (`Ann <a@b.c>`), no quoted local part, no
    // IP-literal domain, no control characters or spaces.
    let plain = !email.chars().any(|c| {
        c.is_control()
            || c.is_whitespace()
            || matches!(
                c,
                '"' | '<' | '>' | '[' | ']' | '(' | ')' | ',' | ';' | '\\'
            )
    });
    let valid = plain
        && email.len() <= 254
        && email_address::EmailAddress::parse_with_options(
            &email,
            email_address::Options::default().without_display_text(),
        )
        .is_ok_and(|parsed| parsed.as_str() == email)
        && email
            .rsplit('@')
            .next()
            .is_some_and(|domain| domain.contains('.'));
    if !valid {
        return Err(ApiError::validation(
            "email",
            "email is not a valid address",
        ));
    }
    Ok(email)
}

/// Checks a new password's length (8–128 characters).
pub fn check_password(password: &str) -> Result<(), ApiError> {
    // Counted as hashed (NFKC): `e` + a combining accent is one character, `é`. A bound on the
    // raw size first, so that normalising costs little whatever is sent.
    let chars = if password.len() > MAX_PASSWORD_BYTES {
        usize::MAX
    } else {
        normalized(password).chars().count()
    };
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        return Err(ApiError::validation(
            "password",
            format!(
                "password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters long"
            ),
        ));
    }
    Ok(())
}

/// What a new user is made of, before validation.
pub struct Registration {
    /// As typed; normalized here.
    pub email: String,
    /// Plain text; hashed here.
    pub password: String,
    /// Optional display name.
    pub full_name: Option<String>,
    /// Admin flag.
    pub is_admin: bool,
}

/// Validates, hashes and stores a new user. An existing email (in any letter case) is a 409.
pub async fn create_user(
    store: &Store,
    passwords: &Passwords,
    reg: Registration,
) -> Result<User, ApiError> {
    let email = normalize_email(&reg.email)?;
    check_password(&reg.password)?;
    let full_name = reg
        .full_name
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    if full_name
        .as_ref()
        .is_some_and(|n| n.chars().count() > MAX_NAME_CHARS || n.chars().any(char::is_control))
    {
        return Err(ApiError::validation(
            "full_name",
            format!(
                "full_name must be at most {MAX_NAME_CHARS} characters, without control characters"
            ),
        ));
    }
    let password_hash = passwords
        .hash(reg.password)
        .await
        .map_err(ApiError::internal)?;
    let record = store
        .create_user(NewUser {
            email,
            password_hash,
            full_name,
            is_admin: reg.is_admin,
        })
        .await
        .map_err(|e| match e {
            StoreError::Conflict => {
                ApiError::Conflict("a user with this email already exists".into())
            }
            other => other.into(),
        })?;
    Ok(record.into())
}

/// Checks a user's own token limit (tokens per window, window in seconds; `None`: the
/// defaults): positive, and tokens × window in ms under 2^53, so that Redis's Lua doubles stay
/// exact. `default_window` is `TOKEN_LIMIT_WINDOW`'s seconds, for a limit without its own.
pub fn check_token_limit(
    limit: Option<i64>,
    window: Option<i64>,
    default_window: u64,
) -> Result<(), (&'static str, String)> {
    if limit.is_some_and(|n| n < 1) {
        return Err((
            "token_limit",
            "token_limit must be at least 1, or null for the default".into(),
        ));
    }
    if window.is_some_and(|w| !(1..=MAX_TOKEN_WINDOW_SECS).contains(&w)) {
        return Err((
            "token_limit_window",
            format!(
                "token_limit_window must be 1 to {MAX_TOKEN_WINDOW_SECS} seconds, or null for the default"
            ),
        ));
    }
    let window_ms =
        window.map_or(u128::from(default_window), |w| u128::from(w.unsigned_abs())) * 1000;
    if let Some(tokens) = limit
        && u128::from(tokens.unsigned_abs()) * window_ms
            > u128::from(crate::config::MAX_LIMIT_UNITS)
    {
        return Err((
            "token_limit",
            format!(
                "a limit of {tokens} tokens over {} s is too large (tokens × window in ms must \
                 stay under 2^53); use a shorter window",
                window_ms / 1000
            ),
        ));
    }
    Ok(())
}

/// The longest window a user's own token limit may have: a year.
pub const MAX_TOKEN_WINDOW_SECS: i64 = 366 * 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_lower_cased_and_checked() {
        assert_eq!(
            normalize_email("  Ann@Example.COM ").unwrap(),
            "ann@example.com"
        );
        for bad in [
            "Ann <ann@example.com>",
            "\"a b\"@example.com",
            "x@[127.0.0.1]",
            "a\u{0}b@example.com",
            "ann@localhost",
            "",
            "ann",
            "ann@",
            "@example.com",
            "ann@@example.com",
            "a b@example.com",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_length_is_counted_in_characters() {
        assert!(check_password("1234567").is_err());
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"é".repeat(128)).is_ok());
        assert!(check_password(&"x".repeat(129)).is_err());
        // Counted as hashed (NFKC): a decomposed `é` is one character.
        assert!(check_password(&"e\u{301}".repeat(4)).is_err());
        assert!(check_password(&"e\u{301}".repeat(100)).is_ok());
        assert!(
            check_password(&"\u{301}".repeat(600)).is_err(),
            "raw size bounded"
        );
    }
}
