-- Rotation families ("sessions") become rows of their own. A family row is what revocation
-- marks, and a token is live only while its family is; rotation and revocation run in
-- BEGIN IMMEDIATE transactions, which SQLite serialises. Every token now belongs to a family
-- row (foreign key), which SQLite can only add by rebuilding refresh_tokens.
CREATE TABLE refresh_families (
    id         BLOB PRIMARY KEY NOT NULL,
    user_id    BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

CREATE INDEX refresh_families_user_id ON refresh_families (user_id);

-- One family per existing family_id. Tokens were only ever revoked family-wide, so a family
-- with any revoked token is a revoked family: this also kills a successor that a refresh race
-- stored after its family had been revoked.
INSERT INTO refresh_families (id, user_id, created_at, revoked_at)
SELECT family_id, MIN(user_id), MIN(created_at), MAX(revoked_at)
FROM refresh_tokens
GROUP BY family_id;

CREATE TABLE refresh_tokens_new (
    id         BLOB PRIMARY KEY NOT NULL,
    user_id    BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id  BLOB NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
    token_hash TEXT NOT NULL UNIQUE,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    used_at    TEXT,
    revoked_at TEXT
);

INSERT INTO refresh_tokens_new
    (id, user_id, family_id, token_hash, expires_at, created_at, used_at, revoked_at)
SELECT t.id, t.user_id, t.family_id, t.token_hash, t.expires_at, t.created_at, t.used_at,
       COALESCE(t.revoked_at, f.revoked_at)
FROM refresh_tokens t
JOIN refresh_families f ON f.id = t.family_id;

DROP TABLE refresh_tokens;
ALTER TABLE refresh_tokens_new RENAME TO refresh_tokens;

CREATE INDEX refresh_tokens_family_id ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_id ON refresh_tokens (user_id);
