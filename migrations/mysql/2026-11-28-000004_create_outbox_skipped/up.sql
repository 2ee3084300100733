-- Parked messages an operator gave up on (`waybill skip`): a copy of the outbox row, moved here in
-- one transaction with its removal from outbox_messages, so the key flows again and the audit
-- trail stays. Retention (`waybill purge --older-than`) deletes rows by skipped_at.
CREATE TABLE outbox_skipped (
    seq BIGINT NOT NULL COMMENT 'The message''s position in the outbox when it was skipped',
    id BINARY(16) NOT NULL COMMENT 'Sender-assigned message id: the UUID''s 16 bytes, big-endian',
    topic VARCHAR(255) NOT NULL COMMENT 'Destination: exchange, subject or topic',
    partition_key VARCHAR(255) NOT NULL COMMENT 'Unit of ordering, e.g. the aggregate order:4231',
    message_type VARCHAR(255) NOT NULL COMMENT 'What happened, e.g. OrderPlaced',
    content_type VARCHAR(255) NOT NULL COMMENT 'Media type of the payload',
    payload LONGBLOB NOT NULL COMMENT 'The payload, byte for byte as enqueued',
    headers LONGTEXT NOT NULL COMMENT 'JSON object of string headers, as enqueued'
        CHECK (JSON_VALID(headers)),
    attempts INT NOT NULL COMMENT 'Failed publish attempts before it was parked',
    last_error TEXT NULL COMMENT 'Why it was parked',
    created_at DATETIME(6) NOT NULL COMMENT 'When the message was enqueued',
    reason TEXT NOT NULL COMMENT 'Why the operator skipped it',
    skipped_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)) COMMENT 'When it was skipped',
    skipped_by VARCHAR(255) NOT NULL
        COMMENT 'Who skipped it (the operator''s user name, or what --by said)',
    UNIQUE KEY outbox_skipped_id_key (id),
    -- Retention deletes skipped rows by age.
    KEY outbox_skipped_skipped_at_idx (skipped_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'Parked messages an operator skipped, kept for the audit trail';
