UPDATE outbox_relay_locks SET token = coalesce(pg_sequence_last_value('outbox_relay_wakeup'), 0)
WHERE name = 'wakeup';
CREATE OR REPLACE FUNCTION waybill_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_relay_locks WHERE name = 'wakeup' AND token > 0) THEN
        PERFORM pg_notify('waybill_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;
COMMENT ON COLUMN outbox_relay_locks.token IS NULL;
DROP SEQUENCE outbox_relay_wakeup;
