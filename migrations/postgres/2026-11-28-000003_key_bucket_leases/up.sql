-- Relays lease partition keys in 64 buckets instead of writing a lease into every message: a
-- claim writes a few bucket rows, and deleting (or marking) a published message is its only write.

-- The key's bucket, a pure function of the key, so every message of a key shares one lease.
ALTER TABLE outbox_messages ADD COLUMN bucket SMALLINT NOT NULL
    GENERATED ALWAYS AS ((('x' || substr(md5(partition_key), 1, 8))::bit(32)::int & 63)) STORED;
COMMENT ON COLUMN outbox_messages.bucket IS
    'Lease bucket of the partition key (0-63): a relay holds all of a key''s messages at once';

-- The per-message lease is gone: outbox_relay_leases holds leases per bucket.
ALTER TABLE outbox_messages DROP COLUMN lease_token, DROP COLUMN lease_owner;

-- One row per bucket. A claim leases the buckets it takes messages from, under its fencing
-- token; completing the claim releases them. An expired lease may be taken over by another
-- relay, and the late relay's writes are then refused (its token no longer holds the bucket).
CREATE TABLE outbox_relay_leases (
    -- The bucket, 0-63.
    bucket SMALLINT PRIMARY KEY CHECK (bucket BETWEEN 0 AND 63),
    -- Fencing token of the claim that holds (or last held) the bucket.
    token BIGINT NOT NULL DEFAULT 0,
    -- Name of the relay that holds the lease, for operators; NULL when released.
    owner TEXT,
    -- The lease ends here; '-infinity' once released.
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO outbox_relay_leases (bucket) SELECT generate_series(0, 63);

-- Relays seen recently. A claim takes 1/N of the free buckets when N relays claimed within the
-- last lease period, so a second relay always finds work instead of waiting for the first.
CREATE TABLE outbox_relays (
    -- The relay's name (RelayConfig::owner).
    owner TEXT PRIMARY KEY,
    -- Its last claim.
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A queue table: every published message leaves a dead tuple behind (DELETE, or the status
-- UPDATE under retention). The default autovacuum waits for 20% of the table to be dead, which a
-- large backlog can take hours to reach while the table and its indexes bloat; vacuum after
-- every few thousand instead.
ALTER TABLE outbox_messages SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000
);

COMMENT ON COLUMN outbox_messages.available_at IS
    'Not published before this time: a requested delay or a retry backoff (leases are per bucket)';
