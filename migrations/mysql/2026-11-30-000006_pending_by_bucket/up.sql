-- Pending messages by bucket, in outbox order: a claim finds where the free buckets' work
-- begins with one probe per bucket, instead of walking the leased buckets' messages in `seq`
-- order to get there (with every bucket that has work leased, that walk was the whole backlog).
CREATE INDEX outbox_messages_status_bucket_idx ON outbox_messages (status, bucket, seq);
