-- The transactional outbox: one row per message, written in the writer's own transaction.
-- Times are INTEGER microseconds since the Unix epoch (UTC): exact and comparable;
-- read them with datetime(col / 1000000, 'unixepoch').
CREATE TABLE outbox_messages (
    -- Position in the outbox; messages of one partition key are published in this order.
    seq INTEGER PRIMARY KEY NOT NULL,
    -- Sender-assigned message id: the UUID's 16 bytes, big-endian (RFC 9562 order).
    id BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
    -- Destination: exchange, subject or topic, as the transport maps it.
    topic TEXT NOT NULL,
    -- Unit of ordering, e.g. the aggregate `order:4231`.
    partition_key TEXT NOT NULL,
    -- What happened, e.g. `OrderPlaced`.
    message_type TEXT NOT NULL,
    -- Media type of the payload, e.g. `application/json`.
    content_type TEXT NOT NULL,
    -- The payload, byte for byte as enqueued.
    payload BLOB NOT NULL,
    -- JSON object of string headers (correlation id, W3C traceparent, ...).
    headers TEXT NOT NULL DEFAULT '{}',
    -- 0 = pending, 1 = published (kept for the retention window), 2 = parked.
    status SMALLINT NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 2)),
    -- Failed publish attempts so far.
    attempts INTEGER NOT NULL DEFAULT 0,
    -- Error of the last failed attempt, or why the message was parked.
    last_error TEXT,
    -- Not published before this time: a requested delay, a retry backoff or a relay's lease.
    available_at BIGINT NOT NULL,
    -- When the message was enqueued.
    created_at BIGINT NOT NULL,
    -- When the broker confirmed it (status 1 only).
    published_at BIGINT,
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

-- Relay coordination rows: `claim` hands out fencing tokens (SQLite's single writer already
-- serializes claims); `purge` records the last purge.
CREATE TABLE outbox_relay_locks (
    -- Lock name: `claim` or `purge`.
    name TEXT PRIMARY KEY NOT NULL,
    -- Last fencing token handed out (claim) or purge runs so far (purge).
    token BIGINT NOT NULL DEFAULT 0,
    -- Relay that took the lock last.
    holder TEXT,
    -- When it did (microseconds since the epoch).
    updated_at BIGINT NOT NULL DEFAULT 0
);
INSERT INTO outbox_relay_locks (name) VALUES ('claim'), ('purge');
