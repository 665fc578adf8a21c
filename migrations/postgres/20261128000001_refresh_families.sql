-- Rotation families ("sessions") become rows of their own. A family row is what rotation locks
-- (SELECT … FOR UPDATE) and what revocation marks, so that spending a token, storing its
-- successor and revoking the family are serialised on one row, and a token is live only while
-- its family is. Every token now belongs to a family row (foreign key).
CREATE TABLE refresh_families (
    id         UUID PRIMARY KEY,
    user_id    UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ
);

CREATE INDEX refresh_families_user_id ON refresh_families (user_id);

-- One family per existing family_id. Tokens were only ever revoked family-wide, so a family
-- with any revoked token is a revoked family: this also kills a successor that a refresh race
-- stored after its family had been revoked.
INSERT INTO refresh_families (id, user_id, created_at, revoked_at)
SELECT family_id, (array_agg(user_id ORDER BY created_at))[1], MIN(created_at), MAX(revoked_at)
FROM refresh_tokens
GROUP BY family_id;

UPDATE refresh_tokens t
SET revoked_at = f.revoked_at
FROM refresh_families f
WHERE f.id = t.family_id AND f.revoked_at IS NOT NULL AND t.revoked_at IS NULL;

ALTER TABLE refresh_tokens
    ADD CONSTRAINT refresh_tokens_family_id_fkey
    FOREIGN KEY (family_id) REFERENCES refresh_families (id) ON DELETE CASCADE;
