CREATE OR REPLACE FUNCTION inbox_purged_through(of_consumer TEXT) RETURNS TIMESTAMPTZ
    LANGUAGE sql VOLATILE
    AS $$ SELECT purged_through FROM inbox_purges WHERE consumer = of_consumer $$;
