-- Summaries, events and the hourly roll-up laid out by time (issue 21): declarative range partitions, one per UTC day
-- for summaries, one per UTC month for events and the roll-up, so that retention drops a whole partition instead of
-- deleting rows (central/partitions.py creates them ahead and drops them; ingest creates a missing one on demand).
--
-- The rows of an existing database are moved, not lost: each table is renamed, a partitioned one is created LIKE it
-- (so columns added by any earlier migration come along), the partitions its rows need are created, the rows copied,
-- the keys and indexes built per partition, the old table dropped. One transaction, as every migration.
--
-- What changes for the data:
--   * a primary key of a partitioned table holds the partition key: (gateway_id, summary_id, window_start) and
--     (gateway_id, event_id, ts). Ids are UUIDv5 of gateway, machine and that very time (sync.protocol), so a resend
--     still meets its stored row; an id sent again with another time is stored as another row.
--   * no foreign keys to gateways from these tables: attaching or dropping a partition with one would lock gateways,
--     which every ingest updates. Ingest writes only for an existing, active gateway (its `gw` CTE), and gateways
--     are revoked, never deleted, so the reference holds without the constraint.
--   * no default partition: a row without its partition fails (ingest creates the partition first), and a
--     partition can be detached CONCURRENTLY (not allowed beside a default one).

-- Which tables are partitioned and by what period; read by pdm_ensure_partition and central/partitions.py.
CREATE TABLE pdm_partitioned (
    parent text PRIMARY KEY,
    period text NOT NULL CHECK (period IN ('day', 'month'))
);
INSERT INTO pdm_partitioned (parent, period) VALUES ('summaries', 'day'), ('events', 'month'),
                                                    ('summaries_hourly', 'month');

-- The partition of `parent` that holds `moment`, created when missing; its name (parent_pYYYYMMDD or parent_pYYYYMM,
-- the UTC start of its period) is returned. Created as a plain table LIKE the parent, then attached: ATTACH takes
-- SHARE UPDATE EXCLUSIVE on the parent, which neither reads nor writes wait for (CREATE TABLE ... PARTITION OF would
-- take ACCESS EXCLUSIVE); the attach builds the partition's indexes, on an empty table at once. An advisory lock per
-- parent serialises concurrent callers (ingest in several workers, the maintenance job).
CREATE FUNCTION pdm_ensure_partition(parent_table text, moment timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    part_period text;
    lower_utc timestamp;
    upper_utc timestamp;
    part_name text;
BEGIN
    SELECT p.period INTO STRICT part_period FROM pdm_partitioned p WHERE p.parent = parent_table;
    lower_utc := date_trunc(part_period, moment AT TIME ZONE 'UTC');
    upper_utc := lower_utc + ('1 ' || part_period)::interval;  -- in UTC: a day is 24 hours, whatever TimeZone says
    part_name := parent_table || '_p'
                 || to_char(lower_utc, CASE part_period WHEN 'day' THEN 'YYYYMMDD' ELSE 'YYYYMM' END);
    IF EXISTS (SELECT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = parent_table::regclass AND c.relname = part_name) THEN
        RETURN part_name;
    END IF;
    PERFORM pg_advisory_xact_lock(1885628751, parent_table::regclass::oid::integer);
    IF EXISTS (SELECT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = parent_table::regclass AND c.relname = part_name) THEN
        RETURN part_name;  -- created meanwhile by another caller
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part_name, parent_table);
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent_table, part_name,
                   lower_utc AT TIME ZONE 'UTC', upper_utc AT TIME ZONE 'UTC');
    RETURN part_name;
END
$$;

-- summaries ----------------------------------------------------------------------------------------------------------
DROP TRIGGER summaries_roll_up ON summaries;  -- the roll-up already holds the rows being moved
ALTER TABLE summaries RENAME TO summaries_unpartitioned;
ALTER INDEX summaries_pkey RENAME TO summaries_unpartitioned_pkey;
ALTER INDEX summaries_machine_chart RENAME TO summaries_unpartitioned_chart;
ALTER INDEX summaries_not_ok RENAME TO summaries_unpartitioned_not_ok;
CREATE TABLE summaries (LIKE summaries_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (window_start);
SELECT pdm_ensure_partition('summaries', day)
FROM (SELECT DISTINCT date_trunc('day', window_start, 'UTC') AS day FROM summaries_unpartitioned) AS days;
INSERT INTO summaries SELECT * FROM summaries_unpartitioned;
DROP TABLE summaries_unpartitioned;
ALTER TABLE summaries ADD PRIMARY KEY (gateway_id, summary_id, window_start);
CREATE INDEX summaries_machine_chart ON summaries (gateway_id, machine_id, window_start)
    INCLUDE (health_min, health_mean, p_failure_max, worst_state, mode_risk_max);
CREATE INDEX summaries_not_ok ON summaries (window_start) WHERE worst_state <> 'ok';

-- events -------------------------------------------------------------------------------------------------------------
ALTER TABLE events RENAME TO events_unpartitioned;
ALTER INDEX events_pkey RENAME TO events_unpartitioned_pkey;
ALTER INDEX events_ts RENAME TO events_unpartitioned_ts;
ALTER INDEX events_machine_ts RENAME TO events_unpartitioned_machine_ts;
CREATE TABLE events (LIKE events_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (ts);
SELECT pdm_ensure_partition('events', month)
FROM (SELECT DISTINCT date_trunc('month', ts, 'UTC') AS month FROM events_unpartitioned) AS months;
INSERT INTO events SELECT * FROM events_unpartitioned;
DROP TABLE events_unpartitioned;
ALTER TABLE events ADD PRIMARY KEY (gateway_id, event_id, ts);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_machine_ts ON events (gateway_id, machine_id, ts);

-- the hourly roll-up -------------------------------------------------------------------------------------------------
ALTER TABLE summaries_hourly RENAME TO summaries_hourly_unpartitioned;
ALTER INDEX summaries_hourly_pkey RENAME TO summaries_hourly_unpartitioned_pkey;
CREATE TABLE summaries_hourly (LIKE summaries_hourly_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (hour);
SELECT pdm_ensure_partition('summaries_hourly', month)
FROM (SELECT DISTINCT date_trunc('month', hour, 'UTC') AS month FROM summaries_hourly_unpartitioned) AS months;
INSERT INTO summaries_hourly SELECT * FROM summaries_hourly_unpartitioned;
DROP TABLE summaries_hourly_unpartitioned;
ALTER TABLE summaries_hourly ADD PRIMARY KEY (gateway_id, machine_id, hour);

-- The roll-up of newly stored summaries, as before (migration 0002).
CREATE TRIGGER summaries_roll_up AFTER INSERT ON summaries REFERENCING NEW TABLE AS new_summaries
    FOR EACH STATEMENT EXECUTE FUNCTION pdm_roll_up_summaries();
