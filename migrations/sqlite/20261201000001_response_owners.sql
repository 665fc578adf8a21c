-- Who created each stored response and each of its output items (the upstream keeps them by
-- id, under relay's one key). relay serves a stored response, and accepts an id as
-- previous_response_id or in an input item, only for the user recorded here.
CREATE TABLE response_owners (
    object_id   TEXT PRIMARY KEY NOT NULL,
    user_id     BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL
);

CREATE INDEX response_owners_user_id ON response_owners (user_id);
