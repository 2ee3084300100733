DROP TABLE IF EXISTS outbox_relay_leases;
ALTER TABLE outbox_messages ADD COLUMN lease_token BIGINT;
ALTER TABLE outbox_messages ADD COLUMN lease_owner TEXT;
