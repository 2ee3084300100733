-- The inbox: one row per message a consumer processed, written in the consumer's own
-- transaction together with the handler's writes, so each message takes effect once.
-- Times are DATETIME(6) in UTC, like the outbox.
CREATE TABLE inbox_processed (
    consumer VARCHAR(255) NOT NULL
        COMMENT 'Consumer name, e.g. billing; every consumer deduplicates on its own',
    dedup_key VARCHAR(255) NOT NULL
        COMMENT 'Dedup key: the message id''s hyphenated lowercase form, or a business key like order:4231',
    message_id BINARY(16) NULL
        COMMENT 'Sender-assigned id of the processed message, when it had one: the UUID''s 16 bytes',
    processed_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))
        COMMENT 'When the consumer processed the message; retention purges by it',
    -- Concurrent duplicates serialize on this key: the second insert waits for the first.
    PRIMARY KEY (consumer, dedup_key),
    -- Retention purges rows by age.
    KEY inbox_processed_processed_at_idx (processed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'The inbox: messages each consumer processed, written with the handler''s writes';
