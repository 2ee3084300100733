DROP INDEX IF EXISTS outbox_messages_pending_bucket_idx;
