-- The inbox: one row per message a consumer processed, written in the consumer's own
-- transaction together with the handler's writes, so each message takes effect once.
CREATE TABLE inbox_processed (
    -- Consumer name, e.g. `billing`; every consumer deduplicates on its own.
    consumer TEXT NOT NULL,
    -- Dedup key: the message id's hyphenated lowercase form, or a business key like `order:4231`.
    dedup_key TEXT NOT NULL,
    -- The sender-assigned id of the processed message, when it had one.
    message_id UUID,
    -- When the consumer committed the message; retention purges by it.
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Concurrent duplicates serialize on this key: the second insert waits for the first.
    PRIMARY KEY (consumer, dedup_key)
);

-- Retention purges rows by age.
CREATE INDEX inbox_processed_processed_at_idx ON inbox_processed (processed_at);
