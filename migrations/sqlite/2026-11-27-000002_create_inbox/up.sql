-- The inbox: one row per message a consumer processed, written in the consumer's own
-- transaction together with the handler's writes, so each message takes effect once.
-- Times are INTEGER microseconds since the Unix epoch (UTC), like the outbox.
CREATE TABLE inbox_processed (
    -- Consumer name, e.g. `billing`; every consumer deduplicates on its own.
    consumer TEXT NOT NULL,
    -- Dedup key: the message id's hyphenated lowercase form, or a business key like `order:4231`.
    dedup_key TEXT NOT NULL,
    -- The sender-assigned id of the processed message, when it had one: the UUID's 16 bytes.
    message_id BLOB CHECK (message_id IS NULL OR length(message_id) = 16),
    -- When the consumer processed the message (microseconds since the epoch); retention purges
    -- by it.
    processed_at BIGINT NOT NULL,
    -- Duplicates conflict on this key (SQLite's single writer serializes concurrent ones).
    PRIMARY KEY (consumer, dedup_key)
);

-- Retention purges rows by age.
CREATE INDEX inbox_processed_processed_at_idx ON inbox_processed (processed_at);
