-- Sequenced messages (issue 25): a per-key counter on the producer side, a per-key mark and the
-- held-back gaps on the consumer side. Times are integer microseconds since the Unix epoch.

-- The last sequence number handed out per topic and partition key, raised by `enqueue` in the
-- writer's transaction (SQLite has one writer at a time anyway).
CREATE TABLE outbox_key_sequences (
    -- The message topic.
    topic TEXT NOT NULL,
    -- The partition key.
    partition_key TEXT NOT NULL,
    -- The last sequence number handed out (the first message gets 1).
    last_sequence BIGINT NOT NULL CHECK (last_sequence >= 0),
    PRIMARY KEY (topic, partition_key)
);

-- The producer epoch stamped on sequenced messages; `rotate_sequence_epoch` draws a new one
-- after a restore, when the counter may have gone back.
CREATE TABLE outbox_sequence_epoch (
    -- Always 1: a single row.
    id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    -- 32 random hex digits.
    epoch TEXT NOT NULL
);
INSERT INTO outbox_sequence_epoch (id, epoch) VALUES (1, lower(hex(randomblob(16))));

-- Per consumer and (source, topic, key) stream: the last sequence applied.
CREATE TABLE inbox_sequence_marks (
    -- Consumer name, as in inbox_processed.
    consumer TEXT NOT NULL,
    -- SHA-256 of source, topic and partition key (NUL-separated).
    stream BLOB NOT NULL,
    -- The producer's CloudEvents source.
    source TEXT NOT NULL,
    -- The topic.
    topic TEXT NOT NULL,
    -- The partition key.
    partition_key TEXT NOT NULL,
    -- The producer epoch of the last applied message ('' before the first).
    epoch TEXT NOT NULL,
    -- The epoch before it ('' if none): its late redeliveries below epoch_start are duplicates.
    previous_epoch TEXT NOT NULL,
    -- The first sequence applied under that epoch (0 before the first message).
    epoch_start BIGINT NOT NULL,
    -- The last sequence applied (0 before the first message).
    last_sequence BIGINT NOT NULL,
    -- When the mark last moved.
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, stream)
);

-- Messages held back because an earlier sequence number has not been applied yet.
CREATE TABLE inbox_sequence_gaps (
    -- Consumer name.
    consumer TEXT NOT NULL,
    -- As inbox_sequence_marks.stream.
    stream BLOB NOT NULL,
    -- The producer's CloudEvents source.
    source TEXT NOT NULL,
    -- The topic.
    topic TEXT NOT NULL,
    -- The partition key.
    partition_key TEXT NOT NULL,
    -- The sequence number the consumer waits for.
    expected BIGINT NOT NULL,
    -- The sequence number it received instead.
    got BIGINT NOT NULL,
    -- The held message's id.
    message_id TEXT NOT NULL,
    -- When it was first held back.
    first_seen_at BIGINT NOT NULL,
    -- When it last was.
    last_seen_at BIGINT NOT NULL,
    -- Whether the wait ran out and it was parked (1) or is still held (0).
    parked BOOLEAN NOT NULL DEFAULT 0,
    PRIMARY KEY (consumer, stream)
);
