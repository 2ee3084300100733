DROP TABLE IF EXISTS outbox_relays;
DROP TABLE IF EXISTS outbox_relay_leases;
ALTER TABLE outbox_messages
    DROP COLUMN bucket,
    ADD COLUMN lease_token BIGINT NULL
        COMMENT 'Fencing token of the claim that holds the message; older claims are refused',
    ADD COLUMN lease_owner VARCHAR(255) NULL COMMENT 'Name of the relay that holds the lease, for operators';
