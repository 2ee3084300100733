-- Relays lease partition keys in 64 buckets instead of writing a lease into every message: a
-- claim writes a few bucket rows, and deleting (or marking) a published message is its only write.
ALTER TABLE outbox_messages
    ADD COLUMN bucket SMALLINT AS (CRC32(partition_key) & 63) STORED
        COMMENT 'Lease bucket of the partition key (0-63): a relay holds all of a key''s messages at once',
    DROP COLUMN lease_token,
    DROP COLUMN lease_owner;

-- One row per bucket. A claim leases the buckets it takes messages from, under its fencing
-- token; completing the claim releases them. An expired lease may be taken over by another
-- relay, and the late relay's writes are then refused (its token no longer holds the bucket).
CREATE TABLE outbox_relay_leases (
    bucket SMALLINT NOT NULL PRIMARY KEY COMMENT 'The bucket, 0-63',
    token BIGINT NOT NULL DEFAULT 0 COMMENT 'Fencing token of the claim that holds (or last held) it',
    owner VARCHAR(255) NULL COMMENT 'Relay that holds the lease, for operators; NULL when released',
    expires_at DATETIME(6) NOT NULL DEFAULT '1970-01-01 00:00:00'
        COMMENT 'The lease ends here (UTC); 1970-01-01 once released'
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
INSERT INTO outbox_relay_leases (bucket)
    WITH RECURSIVE b (n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM b WHERE n < 63)
    SELECT n FROM b;

-- Relays seen recently. A claim takes 1/N of the free buckets when N relays claimed within the
-- last lease period, so a second relay always finds work instead of waiting for the first.
CREATE TABLE outbox_relays (
    owner VARCHAR(255) NOT NULL PRIMARY KEY COMMENT 'The relay''s name (RelayConfig::owner)',
    seen_at DATETIME(6) NOT NULL COMMENT 'Its last claim (UTC)'
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
