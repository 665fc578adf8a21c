-- A user's own token limit (tokens per window in seconds), overriding TOKEN_LIMIT /
-- TOKEN_LIMIT_WINDOW; NULL means the defaults.
ALTER TABLE users ADD COLUMN token_limit BIGINT;
ALTER TABLE users ADD COLUMN token_limit_window BIGINT;
