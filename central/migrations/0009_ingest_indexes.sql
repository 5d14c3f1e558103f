-- Ingest's cost in PostgreSQL, continued (issue 21): indexes that no query needs, each written on every summary.
-- Measured in steady state (every machine and hourly row updated once a minute: ingest.store of batches of 100 on
-- one connection, that backend's CPU time, A/B interleaved): about 3 us less per summary, of about 60. The fleet
-- view's timings on 100,000 machines are unchanged (its gateway filter reads the primary key, whose first column is
-- the gateway).
--
-- machines: every upsert changes health_last, which machines_fleet_order holds, so no update is HOT and each one
-- writes an entry into every index of the table. Kept: the primary key (ingest's conflict target, the machine
-- view, the gateway filter), machines_fleet_order (the fleet page) and machines_mode_order (the page with a mode
-- filter: without it a rare mode scans the whole fleet order, 0.6 -> 27 ms on 100,000 machines).
DROP INDEX machines_state;          -- worst_state alone: no query reads it (the states filter scans all rows anyway)
DROP INDEX machines_gateway_state;  -- (gateway_id, worst_state): the primary key's (gateway_id, ...) serves as well

-- summaries: the windows not ok by time were read by no query (the dashboard reads machines, and a machine's
-- windows through summaries_machine_chart). Dropping the parent's index drops every partition's.
DROP INDEX summaries_not_ok;
