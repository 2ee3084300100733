-- Back to the plain layout: the history returns to outbox_messages as published rows (status
-- 1, purged by DELETE again) and the records to a plain inbox_processed with its primary key.
-- Run by `waybill_diesel::partitions::revert` in one transaction.
LOCK TABLE outbox_messages, inbox_processed_log IN ACCESS EXCLUSIVE MODE;

DROP TRIGGER outbox_messages_move_published ON outbox_messages;
INSERT INTO outbox_messages (seq, id, topic, partition_key, message_type, content_type, payload,
                             headers, status, attempts, available_at, created_at, published_at)
OVERRIDING SYSTEM VALUE
SELECT seq, id, topic, partition_key, message_type, content_type, payload, headers, 1, attempts,
       published_at, created_at, published_at
FROM outbox_published;
DROP TABLE outbox_published;
DROP FUNCTION waybill_outbox_move_published();

DROP VIEW inbox_processed;
DROP FUNCTION waybill_inbox_record();
-- As the create_inbox and inbox_payload_digest migrations made it.
CREATE TABLE inbox_processed (
    -- Consumer name, e.g. `billing`; every consumer deduplicates on its own.
    consumer TEXT NOT NULL,
    -- Dedup key: the message id's hyphenated lowercase form, or `b:` + a business key.
    dedup_key TEXT NOT NULL,
    -- The sender-assigned id of the processed message, when it had one.
    message_id UUID,
    -- When the consumer committed the message; retention purges by it.
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Concurrent duplicates serialize on this key: the second insert waits for the first.
    PRIMARY KEY (consumer, dedup_key),
    -- SHA-256 of the processed payload.
    payload_digest BYTEA CHECK (payload_digest IS NULL OR length(payload_digest) = 32)
);
CREATE INDEX inbox_processed_processed_at_idx ON inbox_processed (processed_at);
INSERT INTO inbox_processed (consumer, dedup_key, message_id, processed_at, payload_digest)
SELECT consumer, dedup_key, message_id, processed_at, payload_digest FROM inbox_processed_log
ON CONFLICT DO NOTHING;
DROP TABLE inbox_processed_log;

DROP FUNCTION waybill_ensure_partition(TEXT, TIMESTAMPTZ);
DROP FUNCTION waybill_partition_for(TEXT, TIMESTAMPTZ);
DROP TABLE waybill_partitioning;
