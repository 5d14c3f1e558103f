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

-- summaries_hourly: the roll-up's trigger (0008) aggregated the modes of every summary of the statement (jsonb_each,
-- GROUP BY, jsonb_object_agg, a join), about 13 us per summary, even though a batch mostly holds one window per
-- machine and hour (an agent sends each minute's summaries). Such a machine-hour now takes its summary's modes as
-- they are when they are all numbers (what ingest's validation sends); a machine-hour of several windows (a backlog)
-- gets the per-mode maxima of its own windows, as 0002 computed them. Rows locked in the same order, the update's
-- merge unchanged: exactly once as before. Steady state, same method, with the indexes above: about 65 -> 53 us.
CREATE OR REPLACE FUNCTION pdm_roll_up_summaries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO summaries_hourly AS h (gateway_id, machine_id, hour, windows, health_min, health_mean_sum,
                                       p_failure_max, worst_rank, mode_risk_max)
    SELECT n.gateway_id, n.machine_id, n.hour, n.windows, n.health_min, n.health_mean_sum, n.p_failure_max,
           n.worst_rank,
           CASE WHEN n.windows = 1 AND jsonb_typeof(n.modes[1]) = 'object'
                     AND NOT jsonb_path_exists(n.modes[1], '$.* ? (@.type() != "number")')
                THEN n.modes[1]
                ELSE (SELECT coalesce(jsonb_object_agg(r.key, r.risk), '{}') FROM (
                          SELECT e.key, max(e.value::double precision) AS risk
                          FROM unnest(n.modes) AS x (risk), jsonb_each(x.risk) AS e
                          WHERE jsonb_typeof(e.value) = 'number' GROUP BY e.key) AS r) END
    FROM (SELECT gateway_id, machine_id, date_trunc('hour', window_start, 'UTC') AS hour, count(*) AS windows,
                 min(health_min) AS health_min, sum(health_mean) AS health_mean_sum,
                 max(p_failure_max) AS p_failure_max, min(pdm_state_rank(worst_state)) AS worst_rank,
                 array_agg(mode_risk_max) AS modes
          FROM new_summaries GROUP BY 1, 2, 3) AS n
    ORDER BY 1, 2, 3  -- rows locked in one order: two concurrent batches cannot deadlock
    ON CONFLICT (gateway_id, machine_id, hour) DO UPDATE SET
        windows = h.windows + excluded.windows, health_min = least(h.health_min, excluded.health_min),
        health_mean_sum = h.health_mean_sum + excluded.health_mean_sum,
        p_failure_max = greatest(h.p_failure_max, excluded.p_failure_max),
        worst_rank = least(h.worst_rank, excluded.worst_rank),
        mode_risk_max = h.mode_risk_max || (
            SELECT coalesce(jsonb_object_agg(e.key, e.value), '{}') FROM jsonb_each(excluded.mode_risk_max) AS e
            WHERE NOT h.mode_risk_max ? e.key
               OR (h.mode_risk_max->>e.key)::double precision < e.value::double precision);
    RETURN NULL;
END
$$;
