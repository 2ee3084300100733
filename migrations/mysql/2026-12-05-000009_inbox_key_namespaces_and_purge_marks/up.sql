-- Business keys get a namespace of their own: stored as `b:` + the key, while a message id
-- keeps its hyphenated lowercase form, so a business key equal to another message's id is no
-- longer that message's record.
--
-- The prefix needs two more characters: widen dedup_key by 2, keeping its type, character set
-- and collation whatever they are now (another migration may have changed them).
SELECT CONCAT(
         'ALTER TABLE inbox_processed MODIFY dedup_key ', DATA_TYPE, '(',
         CHARACTER_MAXIMUM_LENGTH + 2, ')',
         IF(COLLATION_NAME IS NULL, '',
            CONCAT(' CHARACTER SET ', CHARACTER_SET_NAME, ' COLLATE ', COLLATION_NAME)),
         ' NOT NULL COMMENT ''Dedup key: a message id''''s hyphenated lowercase form, or b: and a business key like order:4231''')
  INTO @waybill_widen
  FROM information_schema.COLUMNS
 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'inbox_processed' AND COLUMN_NAME = 'dedup_key';
PREPARE waybill_widen FROM @waybill_widen;
EXECUTE waybill_widen;
DEALLOCATE PREPARE waybill_widen;

-- Rows written before were keyed by a business key exactly when their key is not their own
-- message's id (the library always recorded the message id); they move into the business
-- namespace. A business key equal to its own message's id cannot be told from that id and
-- stays; the inbox also looks it up in that form.
UPDATE inbox_processed SET dedup_key = CONCAT('b:', dedup_key)
 WHERE message_id IS NOT NULL
   AND dedup_key <> LOWER(CONCAT_WS('-', SUBSTR(HEX(message_id), 1, 8),
       SUBSTR(HEX(message_id), 9, 4), SUBSTR(HEX(message_id), 13, 4),
       SUBSTR(HEX(message_id), 17, 4), SUBSTR(HEX(message_id), 21, 12)));

CREATE TABLE inbox_purges (
    consumer VARCHAR(255) NOT NULL
        COMMENT 'Consumer name, as in inbox_processed',
    purged_through DATETIME(6) NOT NULL
        COMMENT 'The newest processed_at any purge deleted for this consumer (UTC); only ever raised',
    PRIMARY KEY (consumer)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
  COMMENT = 'What each consumer''s purges deleted: a message without a record sent before the mark (plus the clock skew bound) may have been purged';
