DROP TRIGGER IF EXISTS outbox_messages_notify ON outbox_messages;
DROP FUNCTION IF EXISTS waybill_outbox_notify();
DROP TABLE IF EXISTS outbox_relay_locks;
DROP TABLE IF EXISTS outbox_messages;
