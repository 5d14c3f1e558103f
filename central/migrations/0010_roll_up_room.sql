-- The hourly roll-up's pages keep room for its updates (issue 21). A machine-hour's row is inserted by the hour's
-- first summary and updated by each later one: 59 times an hour when every window is sent. On a full page (the
-- default fillfactor, 100) an update finds no room beside its row, so it writes the new version on another page and a
-- new primary-key entry. With room on the page, the new version stays there and no index is written (a HOT update).
--
-- Why half: an agent's batch updates the rows of all its machines in one statement, and those rows were inserted
-- together, so they share pages; a page needs room for a new version of each of its rows at once. 200 s runs at the
-- million machines' rate (every window, 2 cores), share of the roll-up's updates that were HOT and PostgreSQL's CPU
-- per summary: fillfactor 100, 13 % and 89 us; 80, 54 % and 85 us; 50, 100 % and 85 us (83 us against 89 on
-- another machine); over 600 s, with two checkpoints in the run, 92 -> 90 us. The CPU saved is the same for 80 and
-- 50 within one run's noise; 50 is chosen for its HOT share, which holds whatever the batch size.
--
-- The cost is disk: a page of the roll-up keeps about half its space free after its hour, so a machine-hour takes
-- about 450 bytes instead of 257 (DEPLOYMENT.md's sizing counts it so). The raw summaries, 1,100 bytes a minute,
-- are still most of the disk.
--
-- pdm_partitioned gains the fillfactor its partitions are created with (a partitioned table has no storage
-- parameters of its own, and CREATE TABLE ... LIKE does not copy a partition's). The partitions that exist already
-- are altered too; that applies to the pages filled from now on.
ALTER TABLE pdm_partitioned ADD COLUMN fillfactor integer CHECK (fillfactor BETWEEN 10 AND 100);
UPDATE pdm_partitioned SET fillfactor = 50 WHERE parent = 'summaries_hourly';

CREATE OR REPLACE FUNCTION pdm_ensure_partition(parent_table text, moment timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    part_period text;
    part_fillfactor integer;
    lower_utc timestamp;
    upper_utc timestamp;
    part_name text;
BEGIN
    SELECT p.period, p.fillfactor INTO STRICT part_period, part_fillfactor
    FROM pdm_partitioned p WHERE p.parent = parent_table;
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
    IF part_fillfactor IS NOT NULL THEN
        EXECUTE format('ALTER TABLE %I SET (fillfactor = %s)', part_name, part_fillfactor);
    END IF;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent_table, part_name,
                   lower_utc AT TIME ZONE 'UTC', upper_utc AT TIME ZONE 'UTC');
    RETURN part_name;
END
$$;

DO $$
DECLARE
    part record;
BEGIN
    FOR part IN SELECT c.relname, p.fillfactor FROM pdm_partitioned p JOIN pg_inherits i
                ON i.inhparent = p.parent::regclass JOIN pg_class c ON c.oid = i.inhrelid
                WHERE p.fillfactor IS NOT NULL LOOP
        EXECUTE format('ALTER TABLE %I SET (fillfactor = %s)', part.relname, part.fillfactor);
    END LOOP;
END
$$;
