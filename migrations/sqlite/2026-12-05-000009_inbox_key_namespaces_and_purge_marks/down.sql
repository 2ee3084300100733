DROP TABLE IF EXISTS inbox_purges;

-- Back to one namespace: where a business key and a message id now coincide, they were one
-- record before, so one row is kept.
DELETE FROM inbox_processed
 WHERE dedup_key LIKE 'b:%'
   AND EXISTS (SELECT 1 FROM inbox_processed o
                WHERE o.consumer = inbox_processed.consumer
                  AND o.dedup_key = substr(inbox_processed.dedup_key, 3));
UPDATE inbox_processed SET dedup_key = substr(dedup_key, 3) WHERE dedup_key LIKE 'b:%';
