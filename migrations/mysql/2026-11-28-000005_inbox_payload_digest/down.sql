ALTER TABLE inbox_processed DROP COLUMN payload_digest;
