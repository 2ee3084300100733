-- The partitioned layout (opt-in, PostgreSQL): published history and the inbox's records live
-- in tables partitioned by time range, forgotten by dropping whole partitions instead of
-- DELETE. There is no DEFAULT partition (it would make DETACH .. CONCURRENTLY impossible);
-- instead every insert path makes the partition it needs when create-ahead lagged
-- (`waybill_ensure_partition`). Pending messages stay in `outbox_messages`, which is not
-- partitioned: only published rows move, so nothing a roll-off drops was ever pending.
-- Run by `waybill_diesel::partitions::adopt` in one transaction; `revert.sql` undoes it.

-- Writers wait while the history and the records are copied, so none is missed.
LOCK TABLE outbox_messages, inbox_processed IN ACCESS EXCLUSIVE MODE;

CREATE TABLE waybill_partitioning (
    -- The partitioned table: `outbox_published` or `inbox_processed_log`.
    parent TEXT PRIMARY KEY,
    -- Width of one partition (whole seconds; date_bin takes no months).
    every INTERVAL NOT NULL CHECK (every >= interval '1 second'),
    -- A partition is rolled off once its upper bound is this far behind the database clock.
    retain INTERVAL NOT NULL CHECK (retain >= interval '0'),
    -- How many partitions past the current one create-ahead keeps ready.
    ahead INTEGER NOT NULL CHECK (ahead >= 1)
);

-- The partition of `of_parent` that holds time `at`: its bounds and its name, e.g.
-- `outbox_published_p20261206t000000` (lower bound in UTC). Bounds are aligned on 2000-01-01
-- UTC, so every process computes the same ones.
CREATE FUNCTION waybill_partition_for(of_parent TEXT, at TIMESTAMPTZ,
    OUT lower_bound TIMESTAMPTZ, OUT upper_bound TIMESTAMPTZ, OUT name TEXT)
    LANGUAGE sql STABLE AS $$
    SELECT b, b + p.every,
           p.parent || '_p' || to_char(b AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS')
    FROM waybill_partitioning p
    CROSS JOIN LATERAL (
        SELECT date_bin(p.every, at, timestamptz '2000-01-01 00:00:00+00') AS b) x
    WHERE p.parent = of_parent
$$;

-- Makes the partition of `of_parent` for time `at` unless it exists; true when it made it.
-- Called by create-ahead, and by every insert path before it writes, so an insert never fails
-- for want of a partition. The fast path is one catalog lookup; creating takes the parent's
-- lock until the caller commits, which only happens when create-ahead lagged.
CREATE FUNCTION waybill_ensure_partition(of_parent TEXT, at TIMESTAMPTZ) RETURNS BOOLEAN
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    part RECORD;
    ns TEXT;
BEGIN
    SELECT * INTO part FROM waybill_partition_for(of_parent, at);
    IF part.name IS NULL THEN
        RAISE EXCEPTION 'waybill: % is not a partitioned table of this layout', of_parent;
    END IF;
    SELECT c.relnamespace::regnamespace::text INTO ns
    FROM pg_class c WHERE c.oid = to_regclass(quote_ident(of_parent));
    IF to_regclass(format('%s.%I', ns, part.name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    -- One creator per table at a time; one that lost the race finds the table made.
    PERFORM pg_advisory_xact_lock(2003884386, hashtext(of_parent));
    BEGIN
        EXECUTE format('CREATE TABLE %s.%I PARTITION OF %s.%I FOR VALUES FROM (%L) TO (%L)',
                       ns, part.name, ns, of_parent, part.lower_bound, part.upper_bound);
    EXCEPTION WHEN duplicate_table THEN
        RETURN false;
    END;
    RETURN true;
END;
$$;

-- Published history, moved out of outbox_messages when the relay marks a message published.
CREATE TABLE outbox_published (
    -- The message's position in the outbox.
    seq BIGINT NOT NULL,
    -- Sender-assigned message id.
    id UUID NOT NULL,
    -- Destination: exchange, subject or topic.
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
    -- Failed publish attempts before it went out.
    attempts INTEGER NOT NULL,
    -- When the message was enqueued.
    created_at TIMESTAMPTZ NOT NULL,
    -- When the broker confirmed it; the partition key, so roll-off forgets by this time.
    published_at TIMESTAMPTZ NOT NULL
) PARTITION BY RANGE (published_at);
-- Operators look published messages up by id.
CREATE INDEX outbox_published_id_idx ON outbox_published (id);

-- The inbox's records. `inbox_processed` becomes a view of this table, so every statement of
-- the library works unchanged; inserts go through `waybill_inbox_record`.
ALTER TABLE inbox_processed RENAME TO inbox_processed_unpartitioned;
CREATE TABLE inbox_processed_log (
    -- Consumer name, e.g. `billing`.
    consumer TEXT NOT NULL,
    -- Dedup key, as in inbox_processed.
    dedup_key TEXT NOT NULL,
    -- The sender-assigned id of the processed message, when it had one.
    message_id UUID,
    -- When the consumer committed the message (database clock); the partition key.
    processed_at TIMESTAMPTZ NOT NULL,
    -- SHA-256 of the processed payload.
    payload_digest BYTEA CHECK (payload_digest IS NULL OR length(payload_digest) = 32)
) PARTITION BY RANGE (processed_at);
-- The dedup lookup. A unique index on a partitioned table must include the partition key,
-- which would let a redelivery at another time in: uniqueness is kept by the insert trigger.
CREATE INDEX inbox_processed_log_key_idx ON inbox_processed_log (consumer, dedup_key);

INSERT INTO waybill_partitioning (parent, every, retain, ahead)
VALUES ('outbox_published', @EVERY@, @OUTBOX_RETAIN@, @AHEAD@),
       ('inbox_processed_log', @EVERY@, @INBOX_RETAIN@, @AHEAD@);

-- The history and the records there are, each in the partition of its time.
SELECT waybill_ensure_partition('outbox_published', t)
FROM (SELECT DISTINCT date_bin(@EVERY@, coalesce(published_at, created_at),
                               timestamptz '2000-01-01 00:00:00+00') AS t
      FROM outbox_messages WHERE status = 1) published;
INSERT INTO outbox_published (seq, id, topic, partition_key, message_type, content_type, payload,
                              headers, attempts, created_at, published_at)
SELECT seq, id, topic, partition_key, message_type, content_type, payload, headers, attempts,
       created_at, coalesce(published_at, created_at)
FROM outbox_messages WHERE status = 1;
DELETE FROM outbox_messages WHERE status = 1;

SELECT waybill_ensure_partition('inbox_processed_log', t)
FROM (SELECT DISTINCT date_bin(@EVERY@, processed_at, timestamptz '2000-01-01 00:00:00+00') AS t
      FROM inbox_processed_unpartitioned) processed;
INSERT INTO inbox_processed_log (consumer, dedup_key, message_id, processed_at, payload_digest)
SELECT consumer, dedup_key, message_id, processed_at, payload_digest
FROM inbox_processed_unpartitioned;
DROP TABLE inbox_processed_unpartitioned;

CREATE VIEW inbox_processed AS
    SELECT consumer, dedup_key, message_id, processed_at, payload_digest FROM inbox_processed_log;

-- Moves what an UPDATE marked published (status 1) into the history, once per statement. The
-- relay moves its rows itself (a DELETE .. RETURNING feeding the history insert); this catches
-- a relay of an older version and hand-written SQL that mark in place.
CREATE FUNCTION waybill_outbox_move_published() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    at TIMESTAMPTZ;
BEGIN
    FOR at IN SELECT DISTINCT coalesce(published_at, statement_timestamp())
              FROM published WHERE status = 1 LOOP
        PERFORM waybill_ensure_partition('outbox_published', at);
    END LOOP;
    INSERT INTO outbox_published (seq, id, topic, partition_key, message_type, content_type,
                                  payload, headers, attempts, created_at, published_at)
    SELECT seq, id, topic, partition_key, message_type, content_type, payload, headers,
           attempts, created_at, coalesce(published_at, statement_timestamp())
    FROM published WHERE status = 1;
    -- By primary key: the planner has no statistics on a transition table and joined it in a
    -- nested loop (a batch of 1,000 took a million comparisons).
    DELETE FROM outbox_messages
    WHERE seq = ANY(ARRAY(SELECT seq FROM published WHERE status = 1)) AND status = 1;
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_messages_move_published AFTER UPDATE ON outbox_messages
    REFERENCING NEW TABLE AS published
    FOR EACH STATEMENT EXECUTE FUNCTION waybill_outbox_move_published();

-- An inbox record's insert: at most one record per (consumer, dedup_key) across all
-- partitions. Concurrent inserts of one key serialize on an advisory lock; the check runs on
-- a fresh snapshot taken after the wait (READ COMMITTED; under SERIALIZABLE a concurrent
-- duplicate fails serialization instead). REPEATABLE READ would check on a snapshot from
-- before the wait and let the duplicate in, so it is refused. Returns NULL for a duplicate,
-- so `INSERT .. ON CONFLICT DO NOTHING` reports 0 rows as it does on the plain table.
CREATE FUNCTION waybill_inbox_record() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    -- The partition this session last found or made, so most inserts skip the check:
    -- '<table oid> <lower> <upper> <upper + retention>' in microseconds since the epoch. It
    -- holds a time within its bounds while no roll-off can have dropped it (the clock is before
    -- upper + retention). Partitions dropped by hand, not by a roll-off, are not noticed.
    known TEXT := current_setting('waybill.inbox_partition', true);
    log_oid TEXT := to_regclass('inbox_processed_log')::oid::text;
    at_us BIGINT;
    fresh BOOLEAN := false;
    part RECORD;
BEGIN
    IF current_setting('transaction_isolation') = 'repeatable read' THEN
        RAISE EXCEPTION 'the partitioned inbox needs READ COMMITTED or SERIALIZABLE, not REPEATABLE READ'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    NEW.processed_at := coalesce(NEW.processed_at, now());
    PERFORM pg_advisory_xact_lock(hashtext(NEW.consumer), hashtext(NEW.dedup_key));
    IF EXISTS (SELECT 1 FROM inbox_processed_log
               WHERE consumer = NEW.consumer AND dedup_key = NEW.dedup_key) THEN
        RETURN NULL;
    END IF;
    at_us := (extract(epoch FROM NEW.processed_at) * 1000000)::bigint;
    IF split_part(known, ' ', 1) = log_oid THEN
        fresh := at_us >= split_part(known, ' ', 2)::bigint
             AND at_us < split_part(known, ' ', 3)::bigint
             AND (extract(epoch FROM statement_timestamp()) * 1000000)::bigint
                 < split_part(known, ' ', 4)::bigint;
    END IF;
    IF NOT fresh THEN
        PERFORM waybill_ensure_partition('inbox_processed_log', NEW.processed_at);
        SELECT f.lower_bound, f.upper_bound, c.retain INTO part
        FROM waybill_partition_for('inbox_processed_log', NEW.processed_at) f
        CROSS JOIN waybill_partitioning c WHERE c.parent = 'inbox_processed_log';
        PERFORM set_config('waybill.inbox_partition', concat_ws(' ', log_oid,
            (extract(epoch FROM part.lower_bound) * 1000000)::bigint,
            (extract(epoch FROM part.upper_bound) * 1000000)::bigint,
            (extract(epoch FROM part.upper_bound + part.retain) * 1000000)::bigint), false);
    END IF;
    INSERT INTO inbox_processed_log (consumer, dedup_key, message_id, processed_at,
                                     payload_digest)
    VALUES (NEW.consumer, NEW.dedup_key, NEW.message_id, NEW.processed_at, NEW.payload_digest);
    RETURN NEW;
END;
$$;
CREATE TRIGGER inbox_processed_record INSTEAD OF INSERT ON inbox_processed
    FOR EACH ROW EXECUTE FUNCTION waybill_inbox_record();
