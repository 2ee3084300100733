-- The SHA-256 digest of each processed message's payload, so a message that arrives again
-- under a processed id but with another payload (a sender reusing ids, or a forgery) is
-- refused and dead-lettered instead of silently skipped as a duplicate. NULL on rows written
-- before this migration: those duplicates are skipped as before.
ALTER TABLE inbox_processed ADD COLUMN payload_digest BINARY(32) NULL
    COMMENT 'SHA-256 of the processed payload; a redelivery with another payload is refused';
