DROP TABLE IF EXISTS outbox_relays;
DROP TABLE IF EXISTS outbox_relay_leases;
ALTER TABLE outbox_messages DROP COLUMN IF EXISTS bucket;
ALTER TABLE outbox_messages ADD COLUMN IF NOT EXISTS lease_token BIGINT,
    ADD COLUMN IF NOT EXISTS lease_owner TEXT;
