-- Sequenced messages (issue 25): a per-key counter on the producer side, a per-key mark and the
-- held-back gaps on the consumer side.

-- The last sequence number handed out per topic and partition key. `enqueue` of a sequenced
-- message raises it with an upsert in the writer's transaction, so writers of one key wait for
-- each other's commit and sequence order is commit order.
CREATE TABLE outbox_key_sequences (
    -- The message topic.
    topic TEXT NOT NULL,
    -- The partition key.
    partition_key TEXT NOT NULL,
    -- The last sequence number handed out (the first message gets 1).
    last_sequence BIGINT NOT NULL CHECK (last_sequence >= 0),
    PRIMARY KEY (topic, partition_key)
);

-- The producer epoch's random part: one row, drawn at migration. `rotate_sequence_epoch`
-- draws a new one after a restore or failover that the epoch's automatic parts do not see.
CREATE TABLE outbox_sequence_epoch (
    -- Always 1: a single row.
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    -- 32 random hex digits.
    epoch TEXT NOT NULL
);
INSERT INTO outbox_sequence_epoch (id, epoch) VALUES (1, md5(random()::text || clock_timestamp()::text));

-- The producer epoch stamped on every sequenced message changes whenever the counter may have
-- gone back: it is the random row above, the cluster's system identifier (another cluster: a
-- restored dump, a rebuilt server), its current timeline (a promoted replica, a point-in-time
-- recovery) and the counter table's oid (the table restored from a dump into the same cluster),
-- computed inline by the enqueue statement (`EPOCH` in diesel-backend/src/sequence/pg.rs; a SQL
-- function would be planned on every call, which cost a quarter of the throughput).

-- Per consumer and (source, topic, key) stream: the last sequence applied. One row per key,
-- forever: duplicates are told by number, with no retention window.
CREATE TABLE inbox_sequence_marks (
    -- Consumer name, as in inbox_processed.
    consumer TEXT NOT NULL,
    -- SHA-256 of source, topic and partition key (NUL-separated): the stream, as a short key.
    stream BYTEA NOT NULL,
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
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, stream)
);

-- Messages held back because an earlier sequence number has not been applied yet: one per
-- consumer and stream, for operators (`waybill inbox gaps`) and to bound the wait.
CREATE TABLE inbox_sequence_gaps (
    -- Consumer name.
    consumer TEXT NOT NULL,
    -- As inbox_sequence_marks.stream.
    stream BYTEA NOT NULL,
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
    -- When the consumer first held this message back (the consumer's clock).
    first_seen_at TIMESTAMPTZ NOT NULL,
    -- When it last did.
    last_seen_at TIMESTAMPTZ NOT NULL,
    -- Whether the wait ran out and the message was parked (dead-lettered).
    parked BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (consumer, stream)
);
