-- Sequenced messages (issue 25): a per-key counter on the producer side, a per-key mark and the
-- held-back gaps on the consumer side.

-- The last sequence number handed out per topic and partition key, raised by `enqueue` in the
-- writer's transaction: writers of one key wait for each other's commit.
CREATE TABLE outbox_key_sequences (
    topic VARCHAR(255) NOT NULL COMMENT 'The message topic',
    partition_key VARCHAR(255) NOT NULL COMMENT 'The partition key',
    last_sequence BIGINT NOT NULL COMMENT 'The last sequence number handed out (the first is 1)'
        CHECK (last_sequence >= 0),
    PRIMARY KEY (topic, partition_key)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- The producer epoch stamped on sequenced messages; `rotate_sequence_epoch` draws a new one
-- after a restore or failover, when the counter may have gone back.
CREATE TABLE outbox_sequence_epoch (
    id SMALLINT NOT NULL PRIMARY KEY COMMENT 'Always 1: a single row' CHECK (id = 1),
    epoch VARCHAR(64) NOT NULL COMMENT '32 random hex digits'
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
INSERT INTO outbox_sequence_epoch (id, epoch) VALUES (1, MD5(CONCAT(RAND(), UUID())));

-- Per consumer and (source, topic, key) stream: the last sequence applied.
CREATE TABLE inbox_sequence_marks (
    consumer VARCHAR(255) NOT NULL COMMENT 'Consumer name, as in inbox_processed',
    stream BINARY(32) NOT NULL COMMENT 'SHA-256 of source, topic and partition key, NUL-separated',
    source TEXT NOT NULL COMMENT 'The producer''s CloudEvents source',
    topic VARCHAR(255) NOT NULL COMMENT 'The topic',
    partition_key VARCHAR(255) NOT NULL COMMENT 'The partition key',
    epoch VARCHAR(255) NOT NULL COMMENT 'Producer epoch of the last applied message ('''' before the first)',
    previous_epoch VARCHAR(255) NOT NULL COMMENT 'The epoch before it ('''' if none): its late redeliveries below epoch_start are duplicates',
    epoch_start BIGINT NOT NULL COMMENT 'First sequence applied under that epoch (0 before the first)',
    last_sequence BIGINT NOT NULL COMMENT 'Last sequence applied (0 before the first)',
    updated_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)) COMMENT 'When the mark last moved',
    PRIMARY KEY (consumer, stream)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Messages held back because an earlier sequence number has not been applied yet.
CREATE TABLE inbox_sequence_gaps (
    consumer VARCHAR(255) NOT NULL COMMENT 'Consumer name',
    stream BINARY(32) NOT NULL COMMENT 'As inbox_sequence_marks.stream',
    source TEXT NOT NULL COMMENT 'The producer''s CloudEvents source',
    topic VARCHAR(255) NOT NULL COMMENT 'The topic',
    partition_key VARCHAR(255) NOT NULL COMMENT 'The partition key',
    expected BIGINT NOT NULL COMMENT 'The sequence number the consumer waits for',
    got BIGINT NOT NULL COMMENT 'The sequence number it received instead',
    message_id VARCHAR(64) NOT NULL COMMENT 'The held message''s id',
    first_seen_at DATETIME(6) NOT NULL COMMENT 'When it was first held back (consumer clock, UTC)',
    last_seen_at DATETIME(6) NOT NULL COMMENT 'When it last was',
    parked BOOLEAN NOT NULL DEFAULT FALSE COMMENT 'Whether the wait ran out and it was parked',
    PRIMARY KEY (consumer, stream)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
