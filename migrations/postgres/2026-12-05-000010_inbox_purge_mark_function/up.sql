-- The purge mark of one consumer (inbox_purges.purged_through; NULL when no purge deleted any of
-- its records), read through a function so the inbox's dedup insert can return it in the same
-- round trip: `INSERT .. ON CONFLICT DO NOTHING RETURNING inbox_purged_through(consumer)`.
--
-- VOLATILE on purpose, and it must stay so: an insert that meets the key's row being deleted by
-- an uncommitted purge waits for the purge, whose same statement raises the mark. The insert's
-- own snapshot was taken before that wait, so a plain subquery (or a STABLE function, which runs
-- on the caller's snapshot) would return the old mark and let a redelivery whose record was just
-- purged take effect twice. A VOLATILE function takes a fresh snapshot per call under READ
-- COMMITTED, after the wait, and sees the purge's mark. The body names the table unqualified, so
-- it is resolved on each call through the search_path, like the library's other statements.
CREATE FUNCTION inbox_purged_through(of_consumer TEXT) RETURNS TIMESTAMPTZ
    LANGUAGE sql VOLATILE
    AS $$ SELECT purged_through FROM inbox_purges WHERE consumer = of_consumer $$;
