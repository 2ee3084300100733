-- Partition keys, consumer names and dedup keys compare byte for byte, as on PostgreSQL and
-- SQLite. `utf8mb4_bin` is a PAD SPACE collation: 'order:42' and 'order:42 ' were equal, so a
-- distinct message was skipped as a duplicate, a parked key blocked its trailing-space twin and
-- `requeue --key` requeued both. A NO PAD binary collation compares exactly: MariaDB calls it
-- `utf8mb4_nopad_bin`, MySQL 8 `utf8mb4_0900_bin`; the statements are built with whichever this
-- server has.
SET @waybill_exact = (
    SELECT COLLATION_NAME FROM information_schema.COLLATIONS
    WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin')
    ORDER BY COLLATION_NAME = 'utf8mb4_nopad_bin' DESC LIMIT 1);

SET @waybill_sql = CONCAT(
    'ALTER TABLE outbox_messages MODIFY partition_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE ',
    @waybill_exact,
    ' NOT NULL COMMENT ''Unit of ordering, e.g. the aggregate order:4231 (compared byte for byte)''');
PREPARE waybill_exact_keys FROM @waybill_sql;
EXECUTE waybill_exact_keys;
DEALLOCATE PREPARE waybill_exact_keys;

SET @waybill_sql = CONCAT(
    'ALTER TABLE outbox_skipped MODIFY partition_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE ',
    @waybill_exact,
    ' NOT NULL COMMENT ''Unit of ordering, e.g. the aggregate order:4231 (compared byte for byte)''');
PREPARE waybill_exact_keys FROM @waybill_sql;
EXECUTE waybill_exact_keys;
DEALLOCATE PREPARE waybill_exact_keys;

SET @waybill_sql = CONCAT(
    'ALTER TABLE inbox_processed MODIFY consumer VARCHAR(255) CHARACTER SET utf8mb4 COLLATE ',
    @waybill_exact,
    ' NOT NULL COMMENT ''Consumer name, e.g. billing; every consumer deduplicates on its own (compared byte for byte)'', ',
    'MODIFY dedup_key VARCHAR(255) CHARACTER SET utf8mb4 COLLATE ',
    @waybill_exact,
    ' NOT NULL COMMENT ''Dedup key: the message id''''s hyphenated lowercase form, or a business key like order:4231 (compared byte for byte)''');
PREPARE waybill_exact_keys FROM @waybill_sql;
EXECUTE waybill_exact_keys;
DEALLOCATE PREPARE waybill_exact_keys;
