-- Parked messages an operator gave up on (`waybill skip`): a copy of the outbox row, moved here in
-- one transaction with its removal from outbox_messages, so the key flows again and the audit
-- trail stays. Retention (`waybill purge --older-than`) deletes rows by skipped_at.
CREATE TABLE outbox_skipped (
    -- The message's position in the outbox when it was skipped.
    seq BIGINT NOT NULL,
    -- Sender-assigned message id.
    id UUID NOT NULL CONSTRAINT outbox_skipped_id_key UNIQUE,
    -- Destination: exchange, subject or topic, as the transport maps it.
    topic TEXT NOT NULL,
    -- Unit of ordering, e.g. the aggregate `order:4231`.
    partition_key TEXT NOT NULL,
    -- What happened, e.g. `OrderPlaced`.
    message_type TEXT NOT NULL,
    -- Media type of the payload.
    content_type TEXT NOT NULL,
    -- The payload, byte for byte as enqueued.
    payload BYTEA NOT NULL,
    -- String map of headers, as enqueued.
    headers JSONB NOT NULL DEFAULT '{}',
    -- Failed publish attempts before it was parked.
    attempts INTEGER NOT NULL,
    -- Why it was parked.
    last_error TEXT,
    -- When the message was enqueued.
    created_at TIMESTAMPTZ NOT NULL,
    -- Why the operator skipped it.
    reason TEXT NOT NULL,
    -- When it was skipped.
    skipped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Who skipped it (the operator's user name, or what `--by` said).
    skipped_by TEXT NOT NULL
);

-- Retention deletes skipped rows by age.
CREATE INDEX outbox_skipped_skipped_at_idx ON outbox_skipped (skipped_at);
