ALTER TABLE inbox_processed DROP COLUMN IF EXISTS payload_digest;
