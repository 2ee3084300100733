-- Whether a relay waits idle, kept in a sequence instead of the `wakeup` row of
-- outbox_relay_locks. The insert trigger read that row inside the writer's transaction, so under
-- SERIALIZABLE a relay flipping the flag made every enqueueing transaction a party to its
-- read/write dependencies, and writers that only enqueued were aborted. A sequence is read and
-- set outside any transaction's snapshot (`pg_sequence_last_value`, `setval`): the trigger adds
-- no dependency to the writer's transaction. Writers need SELECT (or USAGE) on it.
CREATE SEQUENCE outbox_relay_wakeup MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;
COMMENT ON SEQUENCE outbox_relay_wakeup IS
    '1 while some relay waits idle and wants a NOTIFY from writers; 0 (or never set) otherwise';

-- The flag in force when this migration runs carries over.
SELECT setval('outbox_relay_wakeup',
    (SELECT least(greatest(token, 0), 1) FROM outbox_relay_locks WHERE name = 'wakeup'));

CREATE OR REPLACE FUNCTION waybill_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_sequence_last_value('outbox_relay_wakeup') > 0 THEN
        PERFORM pg_notify('waybill_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;

COMMENT ON COLUMN outbox_relay_locks.token IS
    'Last fencing token handed out (claim); unused for `wakeup` (see the outbox_relay_wakeup sequence)';
