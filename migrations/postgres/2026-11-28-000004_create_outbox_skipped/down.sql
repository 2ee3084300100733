DROP TABLE IF EXISTS outbox_skipped;
