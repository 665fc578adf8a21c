-- Revocation: access tokens issued at or before this time (Unix milliseconds) are refused.
ALTER TABLE users ADD COLUMN sessions_revoked_at BIGINT;

-- API keys, for servers: only the SHA-256 of the key is stored, with a short visible prefix.
CREATE TABLE api_keys (
    id           BLOB PRIMARY KEY NOT NULL,
    user_id      BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,
    last_used_at TEXT
);

CREATE INDEX api_keys_user_id ON api_keys (user_id);
