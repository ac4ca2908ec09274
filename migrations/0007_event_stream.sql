-- Events as a stream that can be resumed. Ids come from a sequence and commit out of
-- order: an event with a lower id can become visible after one with a higher id, so a
-- reader that remembers "the last id I saw" would skip it. Instead each event records
-- its transaction, and readers take only events of transactions older than every
-- transaction still running (the snapshot's xmin): those are all committed (or gone)
-- and no new event can appear among them. Read in (tx, id) order, a position in that
-- order is a cursor that misses nothing and repeats nothing.
ALTER TABLE events ADD COLUMN tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_stream ON events (tx, id);

-- Watchers wake on this rather than polling.
CREATE FUNCTION flotilla_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flotilla_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION flotilla_events_notify();
