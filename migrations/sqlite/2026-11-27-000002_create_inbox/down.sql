DROP TABLE IF EXISTS inbox_processed;
