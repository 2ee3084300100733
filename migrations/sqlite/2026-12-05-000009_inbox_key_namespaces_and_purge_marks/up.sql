-- Business keys get a namespace of their own: stored as `b:` + the key, while a message id
-- keeps its hyphenated lowercase form, so a business key equal to another message's id is no
-- longer that message's record. Rows written before were keyed by a business key exactly when
-- their key is not their own message's id (the library always recorded the message id); they
-- move into the business namespace. A business key equal to its own message's id cannot be
-- told from that id and stays; the inbox also looks it up in that form.
UPDATE inbox_processed SET dedup_key = 'b:' || dedup_key
 WHERE message_id IS NOT NULL
   AND dedup_key <> lower(substr(hex(message_id), 1, 8) || '-' || substr(hex(message_id), 9, 4)
       || '-' || substr(hex(message_id), 13, 4) || '-' || substr(hex(message_id), 17, 4)
       || '-' || substr(hex(message_id), 21, 12));

-- What each consumer's purges deleted: a message whose record is missing is new unless it was
-- sent before the newest record a purge deleted (plus the clock skew bound), so a redelivery
-- after a purge is refused while a late first delivery is not.
CREATE TABLE inbox_purges (
    -- Consumer name, as in inbox_processed.
    consumer TEXT PRIMARY KEY NOT NULL,
    -- The newest processed_at any purge deleted for this consumer (microseconds since the
    -- epoch, the clock that stamped it); only ever raised.
    purged_through BIGINT NOT NULL
);
