-- The hourly purge forgets owners of stored responses older than 30 days (the upstream's own
-- retention): by creation time.
CREATE INDEX response_owners_created_at ON response_owners (created_at);
