DROP FUNCTION IF EXISTS inbox_purged_through(TEXT);
