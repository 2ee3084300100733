-- Parked messages an operator gave up on (`waybill skip`): a copy of the outbox row, moved here in
-- one transaction with its removal from outbox_messages, so the key flows again and the audit
-- trail stays. Retention (`waybill purge --older-than`) deletes rows by skipped_at.
-- Times are INTEGER microseconds since the Unix epoch (UTC), like the outbox.
CREATE TABLE outbox_skipped (
    -- The message's position in the outbox when it was skipped.
    seq INTEGER NOT NULL,
    -- Sender-assigned message id: the UUID's 16 bytes, big-endian.
    id BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
    -- Destination: exchange, subject or topic, as the transport maps it.
    topic TEXT NOT NULL,
    -- Unit of ordering, e.g. the aggregate `order:4231`.
    partition_key TEXT NOT NULL,
    -- What happened, e.g. `OrderPlaced`.
    message_type TEXT NOT NULL,
    -- Media type of the payload.
    content_type TEXT NOT NULL,
    -- The payload, byte for byte as enqueued.
    payload BLOB NOT NULL,
    -- JSON object of string headers, as enqueued.
    headers TEXT NOT NULL DEFAULT '{}',
    -- Failed publish attempts before it was parked.
    attempts INTEGER NOT NULL,
    -- Why it was parked.
    last_error TEXT,
    -- When the message was enqueued (microseconds since the epoch).
    created_at BIGINT NOT NULL,
    -- Why the operator skipped it.
    reason TEXT NOT NULL,
    -- When it was skipped (microseconds since the epoch).
    skipped_at BIGINT NOT NULL,
    -- Who skipped it (the operator's user name, or what `--by` said).
    skipped_by TEXT NOT NULL
);

-- Retention deletes skipped rows by age.
CREATE INDEX outbox_skipped_skipped_at_idx ON outbox_skipped (skipped_at);
