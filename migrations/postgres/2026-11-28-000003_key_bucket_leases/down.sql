DROP TABLE IF EXISTS outbox_relays;
DROP TABLE IF EXISTS outbox_relay_leases;
DROP INDEX IF EXISTS outbox_messages_bucket_pending_idx;
ALTER TABLE outbox_messages DROP COLUMN IF EXISTS bucket;
ALTER TABLE outbox_messages ADD COLUMN IF NOT EXISTS lease_token BIGINT,
    ADD COLUMN IF NOT EXISTS lease_owner TEXT;
