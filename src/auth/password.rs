//! Password hashing: argon2id for new hashes, bcrypt accepted from the Python original.
//!
//! Hashing is CPU- and memory-heavy (argon2id at OWASP's 19 MiB), so it runs on the blocking
//! pool, and a semaphore bounds how many run at once: a burst of logins queues instead of
//! exhausting memory or starving the runtime.

use std::borrow::Cow;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;
use unicode_normalization::UnicodeNormalization as _;

/// The outcome of checking a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Wrong password (or unknown user, checked against the dummy hash).
    Mismatch,
    /// Right password, hash is current.
    Match,
    /// Right password, but the hash is bcrypt or argon2 with old parameters: rehash it.
    MatchNeedsRehash,
}

/// The password hasher; clone freely (it is an `Arc` inside).
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    dummy_hash: Arc<str>,
}

fn argon2() -> Argon2<'static> {
    // OWASP's recommendation: argon2id, m = 19 MiB, t = 2, p = 1 (these are the crate defaults,
    // spelled out so that a change of defaults cannot weaken them silently).
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

fn hash_blocking(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(normalized(password).as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("argon2 hashing failed: {e}"))
}

/// Hands the 19 MiB a hash just used back to the system now, instead of leaving it in this
/// blocking thread's allocator heap (the binary uses mimalloc; with another allocator this
/// only tidies mimalloc's own, empty, heaps).
fn release_hash_memory() {
    // SAFETY: `mi_collect` only frees memory the calling thread's heap no longer uses.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// An argon2id hash with today's parameters, a random salt and a random output: checking a
/// password against it costs what checking against a user's hash costs, and it matches none.
/// Made without hashing anything (hashing at start-up cost relay 20 ms before it could listen).
fn dummy_hash() -> String {
    use argon2::password_hash::rand_core::RngCore as _;
    use base64::Engine as _;
    let params = argon2().params().clone();
    let salt = SaltString::generate(&mut OsRng);
    let mut output = [0u8; 32];
    OsRng.fill_bytes(&mut output);
    format!(
        "$argon2id$v=19$m={},t={},p={}${}${}",
        params.m_cost(),
        params.t_cost(),
        params.p_cost(),
        salt.as_str(),
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(output)
    )
}

fn is_bcrypt(hash: &str) -> bool {
    ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
}

/// The form passwords are hashed in: Unicode NFKC, so that the same password typed on another
/// keyboard or OS (composed `é` or `e` + accent, full-width digits) is the same password.
pub fn normalized(password: &str) -> Cow<'_, str> {
    if password.is_ascii() {
        Cow::Borrowed(password)
    } else {
        Cow::Owned(password.nfkc().collect())
    }
}

/// Checks `password` in its normalized form, and for hashes made before normalization (the
/// original's, or relay's before it normalized) in the form it was typed; a match of the raw
/// form asks for a rehash, which stores the normalized one.
fn verify_blocking(password: &str, hash: &str, raw_too: bool) -> Verdict {
    let norm = normalized(password);
    match verify_form(&norm, hash) {
        Verdict::Mismatch if raw_too && norm != password => match verify_form(password, hash) {
            Verdict::Mismatch => Verdict::Mismatch,
            Verdict::Match | Verdict::MatchNeedsRehash => Verdict::MatchNeedsRehash,
        },
        verdict => verdict,
    }
}

fn verify_form(password: &str, hash: &str) -> Verdict {
    if is_bcrypt(hash) {
        // bcrypt only looks at the first 72 bytes; passlib did the same, so this matches.
        return match bcrypt::verify(password, hash) {
            Ok(true) => Verdict::MatchNeedsRehash,
            _ => Verdict::Mismatch,
        };
    }
    let Ok(parsed) = PasswordHash::new(hash) else {
        return Verdict::Mismatch;
    };
    if argon2()
        .verify_password(password.as_bytes(), &parsed)
        .is_err()
    {
        return Verdict::Mismatch;
    }
    let current = parsed.algorithm.as_str() == "argon2id"
        && Params::try_from(&parsed).is_ok_and(|p| {
            let want = argon2();
            let want = want.params();
            p.m_cost() >= want.m_cost() && p.t_cost() >= want.t_cost()
        });
    if current {
        Verdict::Match
    } else {
        Verdict::MatchNeedsRehash
    }
}

impl Passwords {
    /// A hasher allowing `parallelism` hashes at once, with the dummy hash unknown emails are
    /// checked against, so that they cost the same time as a wrong password.
    pub async fn new(parallelism: usize) -> anyhow::Result<Passwords> {
        Ok(Passwords {
            permits: Arc::new(Semaphore::new(parallelism.max(1))),
            dummy_hash: dummy_hash().into(),
        })
    }

    /// Hashes a new password with argon2id.
    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        // The permit moves into the blocking task: if the client goes away, the hash still
        // runs to the end, and it must keep its place in the bound while it does.
        let permit = self.permits.clone().acquire_owned().await?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let hash = hash_blocking(&password);
            release_hash_memory();
            hash
        })
        .await?
    }

    /// Checks `password` against `hash`, or against the dummy hash when `hash` is `None`
    /// (unknown user), which always mismatches but costs the same.
    pub async fn verify(&self, password: String, hash: Option<String>) -> anyhow::Result<Verdict> {
        let permit = self.permits.clone().acquire_owned().await?;
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.dummy_hash.to_string());
        let verdict = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // The dummy hash never matches: one try is enough (and costs what one try costs).
            let verdict = verify_blocking(&password, &hash, known);
            release_hash_memory();
            verdict
        })
        .await?;
        Ok(if known { verdict } else { Verdict::Mismatch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_hash_is_a_current_argon2id_hash() {
        let dummy = dummy_hash();
        let parsed = PasswordHash::new(&dummy).unwrap();
        assert_eq!(parsed.algorithm.as_str(), "argon2id");
        // The same parameters as a real hash made now (and so the same cost to check).
        let real = hash_blocking("correct horse").unwrap();
        let real = PasswordHash::new(&real).unwrap();
        assert_eq!(
            Params::try_from(&parsed).unwrap(),
            Params::try_from(&real).unwrap()
        );
        assert_eq!(parsed.version, real.version);
        assert_eq!(parsed.hash.unwrap().len(), 32);
        // Checked in full (a hash that did not parse would be refused at once, and fast).
        assert!(argon2().verify_password(b"anything", &parsed).is_err());
        assert_ne!(dummy, dummy_hash(), "random salt and output");
    }

    #[tokio::test]
    async fn argon2id_round_trip() {
        let p = Passwords::new(2).await.unwrap();
        let h = p.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert_eq!(
            p.verify("correct horse".into(), Some(h.clone()))
                .await
                .unwrap(),
            Verdict::Match
        );
        assert_eq!(
            p.verify("wrong horse".into(), Some(h)).await.unwrap(),
            Verdict::Mismatch
        );
        assert_eq!(
            p.verify("anything".into(), None).await.unwrap(),
            Verdict::Mismatch
        );
    }

    #[tokio::test]
    async fn weak_argon2_params_ask_for_a_rehash() {
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        );
        let salt = SaltString::generate(&mut OsRng);
        let h = weak.hash_password(b"pw-123456", &salt).unwrap().to_string();
        let p = Passwords::new(1).await.unwrap();
        assert_eq!(
            p.verify("pw-123456".into(), Some(h)).await.unwrap(),
            Verdict::MatchNeedsRehash
        );
    }

    #[tokio::test]
    async fn passwords_are_normalized_and_old_raw_hashes_still_match() {
        let p = Passwords::new(2).await.unwrap();
        // "é" composed, and "e" + combining acute: one password under NFKC.
        let composed = "caf\u{e9}-secret";
        let decomposed = "cafe\u{301}-secret";
        let h = p.hash(composed.into()).await.unwrap();
        assert_eq!(
            p.verify(decomposed.into(), Some(h.clone())).await.unwrap(),
            Verdict::Match
        );
        // Full-width digits are digits.
        let h = p
            .hash("pass\u{ff11}\u{ff12}\u{ff13}-word".into())
            .await
            .unwrap();
        assert_eq!(
            p.verify("pass123-word".into(), Some(h)).await.unwrap(),
            Verdict::Match
        );
        // A hash of the raw (unnormalized) form, as made before: matches, and asks for a
        // rehash (which stores the normalized form).
        let salt = SaltString::generate(&mut OsRng);
        let raw = argon2()
            .hash_password(decomposed.as_bytes(), &salt)
            .unwrap()
            .to_string();
        assert_eq!(
            p.verify(decomposed.into(), Some(raw.clone()))
                .await
                .unwrap(),
            Verdict::MatchNeedsRehash
        );
        assert_eq!(
            p.verify("cafe-secret".into(), Some(raw)).await.unwrap(),
            Verdict::Mismatch
        );
    }
}
