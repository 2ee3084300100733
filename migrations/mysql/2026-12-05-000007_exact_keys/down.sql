-- Back to the PAD SPACE collation. Fails on a unique key (the inbox's) if it now holds two keys
-- that differ only by trailing spaces: delete one of them first.
ALTER TABLE outbox_messages MODIFY partition_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin
    NOT NULL COMMENT 'Unit of ordering, e.g. the aggregate order:4231';
ALTER TABLE outbox_skipped MODIFY partition_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin
    NOT NULL COMMENT 'Unit of ordering, e.g. the aggregate order:4231';
ALTER TABLE inbox_processed
    MODIFY consumer VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL
        COMMENT 'Consumer name, e.g. billing; every consumer deduplicates on its own',
    MODIFY dedup_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL
        COMMENT 'Dedup key: the message id''s hyphenated lowercase form, or a business key like order:4231';
