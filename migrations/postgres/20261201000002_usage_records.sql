-- One row per request that reached the upstream, written off the request path in batches.
-- No foreign key to users: a record outlives its user's deletion until the retention purge,
-- and a batch must never fail because one user went away meanwhile.
CREATE TABLE usage_records (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id           UUID NOT NULL,
    api_key_id        UUID,
    endpoint          TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    status            INTEGER NOT NULL,
    streamed          BOOLEAN NOT NULL,
    cancelled         BOOLEAN NOT NULL,
    estimated         BOOLEAN NOT NULL,
    duration_ms       BIGINT NOT NULL,
    ttfb_ms           BIGINT,
    request_id        TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL
);

-- A user's records over a time range (GET /usage), and the retention purge.
CREATE INDEX usage_records_user_time ON usage_records (user_id, created_at);
CREATE INDEX usage_records_time ON usage_records (created_at);
