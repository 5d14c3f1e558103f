-- Ingest's cost in PostgreSQL (issue 21: 16,700 summaries/s on two cores): two per-row function calls of the hot
-- path made set-based or inline. Measured per summary stored (batches of 100, backend CPU time): the roll-up's
-- trigger about 39 us before, and machines' generated dominant_mode about 13 us.

-- The hourly roll-up, as before (migration 0002: exactly once, the rows locked in one order), with the per-mode maxima
-- aggregated once over the whole statement's modes instead of a subquery per machine-hour, and merged into a stored
-- row by `||` of the modes that went higher instead of pdm_risk_max() (an SQL function run per row). A stored row's
-- modes are numbers only, as this function writes them.
CREATE OR REPLACE FUNCTION pdm_roll_up_summaries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO summaries_hourly AS h (gateway_id, machine_id, hour, windows, health_min, health_mean_sum,
                                       p_failure_max, worst_rank, mode_risk_max)
    SELECT n.gateway_id, n.machine_id, n.hour, n.windows, n.health_min, n.health_mean_sum, n.p_failure_max,
           n.worst_rank, coalesce(r.mode_risk_max, '{}')
    FROM (SELECT gateway_id, machine_id, date_trunc('hour', window_start, 'UTC') AS hour, count(*) AS windows,
                 min(health_min) AS health_min, sum(health_mean) AS health_mean_sum,
                 max(p_failure_max) AS p_failure_max, min(pdm_state_rank(worst_state)) AS worst_rank
          FROM new_summaries GROUP BY 1, 2, 3) AS n
    LEFT JOIN (SELECT gateway_id, machine_id, hour, jsonb_object_agg(key, risk) AS mode_risk_max
               FROM (SELECT s.gateway_id, s.machine_id, date_trunc('hour', s.window_start, 'UTC') AS hour, e.key,
                            max(e.value::double precision) AS risk
                     FROM new_summaries s, jsonb_each(s.mode_risk_max) AS e
                     WHERE jsonb_typeof(e.value) = 'number'
                     GROUP BY 1, 2, 3, 4) AS per_mode
               GROUP BY 1, 2, 3) AS r USING (gateway_id, machine_id, hour)
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
DROP FUNCTION pdm_risk_max(jsonb, jsonb);

-- A machine's dominant mode is written by ingest with the rest of its latest state (central/ingest.py), computed
-- inline there: as a generated column it ran pdm_dominant_mode(), an SQL function, once per row updated. The stored
-- values stay as they are.
ALTER TABLE machines ALTER COLUMN dominant_mode DROP EXPRESSION;
DROP FUNCTION pdm_dominant_mode(jsonb);
