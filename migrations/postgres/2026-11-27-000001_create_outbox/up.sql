-- The transactional outbox: one row per message, written in the writer's own transaction.
CREATE TABLE outbox_messages (
    -- Position in the outbox; messages of one partition key are published in this order.
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Sender-assigned message id (UUIDv7 by default); the consumer's dedup key.
    id UUID NOT NULL CONSTRAINT outbox_messages_id_key UNIQUE,
    -- Destination: exchange, subject or topic, as the transport maps it.
    topic TEXT NOT NULL,
    -- Unit of ordering, e.g. the aggregate `order:4231`.
    partition_key TEXT NOT NULL,
    -- What happened, e.g. `OrderPlaced`.
    message_type TEXT NOT NULL,
    -- Media type of the payload, e.g. `application/json`.
    content_type TEXT NOT NULL,
    -- The payload, byte for byte as enqueued (bytea, not jsonb: jsonb would reorder keys).
    payload BYTEA NOT NULL,
    -- String map of headers (correlation id, W3C traceparent, ...).
    headers JSONB NOT NULL DEFAULT '{}',
    -- 0 = pending, 1 = published (kept for the retention window), 2 = parked.
    status SMALLINT NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 2)),
    -- Failed publish attempts so far.
    attempts INTEGER NOT NULL DEFAULT 0,
    -- Error of the last failed attempt, or why the message was parked.
    last_error TEXT,
    -- Not published before this time: a requested delay, a retry backoff or a relay's lease.
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the message was enqueued.
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- When the broker confirmed it (status 1 only).
    published_at TIMESTAMPTZ,
    -- Fencing token of the claim that holds the message; writes from an older claim are refused.
    lease_token BIGINT,
    -- Name of the relay that holds the lease, for operators.
    lease_owner TEXT
);

-- The relay's claim: pending rows in outbox order.
CREATE INDEX outbox_messages_pending_idx ON outbox_messages (seq) WHERE status = 0;
-- Pending rows that are not yet due (delayed, backing off or leased) block their key.
CREATE INDEX outbox_messages_waiting_idx ON outbox_messages (available_at) WHERE status = 0;
-- Parked rows block their key; operators list and requeue them by key.
CREATE INDEX outbox_messages_parked_idx ON outbox_messages (partition_key, seq) WHERE status = 2;
-- Retention purges published rows by age.
CREATE INDEX outbox_messages_published_idx ON outbox_messages (published_at) WHERE status = 1;

-- Relay coordination rows. `claim` serializes claims across relays and hands out fencing tokens;
-- `purge` lets one relay at a time delete published rows; `wakeup` is 1 while a relay waits idle.
CREATE TABLE outbox_relay_locks (
    -- Lock name: `claim` or `purge`.
    name TEXT PRIMARY KEY,
    -- Last fencing token handed out (claim); 1 while some relay waits idle (wakeup).
    token BIGINT NOT NULL DEFAULT 0,
    -- Relay that took the lock last.
    holder TEXT,
    -- When it did.
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO outbox_relay_locks (name) VALUES ('claim'), ('purge'), ('wakeup');

-- Wakes idle relays (LISTEN waybill_outbox) when an enqueueing transaction commits. Only while a
-- relay waits idle: a NOTIFY takes a database-wide lock at commit, which would serialize every
-- enqueueing transaction while the relays are busy anyway.
CREATE FUNCTION waybill_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_relay_locks WHERE name = 'wakeup' AND token > 0) THEN
        PERFORM pg_notify('waybill_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_messages_notify AFTER INSERT ON outbox_messages
    FOR EACH STATEMENT EXECUTE FUNCTION waybill_outbox_notify();
