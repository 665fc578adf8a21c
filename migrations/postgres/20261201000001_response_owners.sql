-- Who created each stored response (the upstream keeps responses by id, under relay's one
-- key). relay serves a stored response, and accepts its id as previous_response_id, only for
-- the user recorded here.
CREATE TABLE response_owners (
    response_id TEXT PRIMARY KEY,
    user_id     UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL
);

CREATE INDEX response_owners_user_id ON response_owners (user_id);
