DROP TABLE IF EXISTS inbox_purges;

-- Back to one namespace: where a business key and a message id now coincide, they were one
-- record before, so one row is kept.
DELETE b FROM inbox_processed b
  JOIN inbox_processed o ON o.consumer = b.consumer AND o.dedup_key = SUBSTRING(b.dedup_key, 3)
 WHERE b.dedup_key LIKE 'b:%';
UPDATE inbox_processed SET dedup_key = SUBSTRING(dedup_key, 3) WHERE dedup_key LIKE 'b:%';

SELECT CONCAT(
         'ALTER TABLE inbox_processed MODIFY dedup_key ', DATA_TYPE, '(',
         CHARACTER_MAXIMUM_LENGTH - 2, ')',
         IF(COLLATION_NAME IS NULL, '',
            CONCAT(' CHARACTER SET ', CHARACTER_SET_NAME, ' COLLATE ', COLLATION_NAME)),
         ' NOT NULL COMMENT ''Dedup key: the message id''''s hyphenated lowercase form, or a business key like order:4231''')
  INTO @waybill_narrow
  FROM information_schema.COLUMNS
 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'inbox_processed' AND COLUMN_NAME = 'dedup_key';
PREPARE waybill_narrow FROM @waybill_narrow;
EXECUTE waybill_narrow;
DEALLOCATE PREPARE waybill_narrow;
