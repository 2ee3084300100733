-- The SHA-256 digest of each processed message's payload, so a message that arrives again
-- under a processed id but with another payload (a sender reusing ids, or a forgery) is
-- refused and dead-lettered instead of silently skipped as a duplicate. NULL on rows written
-- before this migration: those duplicates are skipped as before.
ALTER TABLE inbox_processed ADD COLUMN payload_digest BLOB
    CHECK (payload_digest IS NULL OR length(payload_digest) = 32);
