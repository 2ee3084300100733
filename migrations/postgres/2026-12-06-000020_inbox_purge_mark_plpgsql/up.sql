-- inbox_purged_through in PL/pgSQL instead of SQL: the same result, at a fraction of the cost. A
-- SQL function that is not inlined is planned again on every call, and the inbox's dedup insert
-- calls it once per message (about 10 us of server time each, a tenth of a handled message);
-- PL/pgSQL keeps the plan of its query for the session.
--
-- Still VOLATILE, and the mark still read by a query of its own: under READ COMMITTED each query of
-- a VOLATILE PL/pgSQL function runs on a fresh snapshot, taken after any wait of the calling insert
-- on a concurrent purge of its key, so it sees the mark that purge raised (migration
-- 2026-12-05-000010 says why that matters).
CREATE OR REPLACE FUNCTION inbox_purged_through(of_consumer TEXT) RETURNS TIMESTAMPTZ
    LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    mark TIMESTAMPTZ;
BEGIN
    SELECT purged_through INTO mark FROM inbox_purges WHERE consumer = of_consumer;
    RETURN mark;
END
$$;
