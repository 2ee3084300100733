-- The transactional outbox: one row per message, written in the writer's own transaction.
-- Times are DATETIME(6) in UTC (MySQL has no time-zone-aware type that keeps microseconds).
CREATE TABLE outbox_messages (
    seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY
        COMMENT 'Position in the outbox; messages of one partition key are published in this order',
    id BINARY(16) NOT NULL
        COMMENT 'Sender-assigned message id: the UUID''s 16 bytes, big-endian (RFC 9562 order)',
    topic VARCHAR(255) NOT NULL COMMENT 'Destination: exchange, subject or topic',
    partition_key VARCHAR(255) NOT NULL COMMENT 'Unit of ordering, e.g. the aggregate order:4231',
    message_type VARCHAR(255) NOT NULL COMMENT 'What happened, e.g. OrderPlaced',
    content_type VARCHAR(255) NOT NULL COMMENT 'Media type of the payload',
    payload LONGBLOB NOT NULL COMMENT 'The payload, byte for byte as enqueued',
    headers LONGTEXT NOT NULL COMMENT 'JSON object of string headers (correlation id, traceparent, ...)'
        CHECK (JSON_VALID(headers)),
    status SMALLINT NOT NULL DEFAULT 0
        COMMENT '0 = pending, 1 = published (kept for the retention window), 2 = parked'
        CHECK (status IN (0, 1, 2)),
    attempts INT NOT NULL DEFAULT 0 COMMENT 'Failed publish attempts so far',
    last_error TEXT NULL COMMENT 'Error of the last failed attempt, or why the message was parked',
    available_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))
        COMMENT 'Not published before this time: a delay, a retry backoff or a relay''s lease',
    created_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)) COMMENT 'When the message was enqueued',
    published_at DATETIME(6) NULL COMMENT 'When the broker confirmed it (status 1 only)',
    lease_token BIGINT NULL
        COMMENT 'Fencing token of the claim that holds the message; older claims are refused',
    lease_owner VARCHAR(255) NULL COMMENT 'Name of the relay that holds the lease, for operators',
    UNIQUE KEY outbox_messages_id_key (id),
    -- Claim in order and find blocked keys (MySQL has no partial indexes).
    KEY outbox_messages_status_seq_idx (status, seq),
    KEY outbox_messages_status_available_idx (status, available_at),
    KEY outbox_messages_key_idx (partition_key, status, seq),
    KEY outbox_messages_status_published_idx (status, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Relay coordination rows. `claim` serializes claims across relays and hands out fencing tokens;
-- `purge` lets one relay at a time delete published rows.
CREATE TABLE outbox_relay_locks (
    name VARCHAR(64) NOT NULL PRIMARY KEY COMMENT 'Lock name: claim or purge',
    token BIGINT NOT NULL DEFAULT 0 COMMENT 'Last fencing token handed out, or purge runs so far',
    holder VARCHAR(255) NULL COMMENT 'Relay that took the lock last',
    updated_at DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) COMMENT 'When it did'
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
INSERT INTO outbox_relay_locks (name) VALUES ('claim'), ('purge');
