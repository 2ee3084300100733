DROP TABLE IF EXISTS outbox_relays;
COMMENT ON COLUMN outbox_messages.available_at IS NULL;
ALTER TABLE outbox_messages RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, autovacuum_analyze_scale_factor, autovacuum_analyze_threshold);
DROP TABLE IF EXISTS outbox_relay_leases;
ALTER TABLE outbox_messages DROP COLUMN IF EXISTS bucket;
ALTER TABLE outbox_messages ADD COLUMN IF NOT EXISTS lease_token BIGINT,
    ADD COLUMN IF NOT EXISTS lease_owner TEXT;
