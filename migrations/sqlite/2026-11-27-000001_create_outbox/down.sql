DROP TABLE IF EXISTS outbox_relay_locks;
DROP TABLE IF EXISTS outbox_messages;
