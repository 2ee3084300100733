-- Relays lease the outbox instead of writing a lease into every message: a claim writes one lease
-- row, and deleting (or marking) a published message is its only write. SQLite has one writer,
-- so the whole outbox is a single bucket (0): relays take turns.
ALTER TABLE outbox_messages DROP COLUMN lease_token;
ALTER TABLE outbox_messages DROP COLUMN lease_owner;

CREATE TABLE outbox_relay_leases (
    -- The bucket: always 0 on SQLite.
    bucket INTEGER PRIMARY KEY NOT NULL,
    -- Fencing token of the claim that holds (or last held) the bucket.
    token BIGINT NOT NULL DEFAULT 0,
    -- Name of the relay that holds the lease, for operators; NULL when released.
    owner TEXT,
    -- The lease ends here (microseconds since the epoch); 0 once released.
    expires_at BIGINT NOT NULL DEFAULT 0
);
INSERT INTO outbox_relay_leases (bucket) VALUES (0);
