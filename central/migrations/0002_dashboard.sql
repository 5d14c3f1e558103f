-- The fleet dashboard: its login sessions, and the indexes its views need (central/dashboard.py says which query
-- uses which).

-- A session id is 256 random bits held in the browser's cookie; only its sha256 is stored (as gateway tokens).
CREATE TABLE dashboard_sessions (
    id_hash     bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    client_addr inet
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);

-- alarm first, then warning, then ok: the fleet view's order.
CREATE FUNCTION pdm_state_rank(state text) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE state WHEN 'alarm' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END;

-- The failure mode of highest risk (ties by name), or null when the object holds no number.
CREATE FUNCTION pdm_dominant_mode(risk jsonb) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
    BEGIN ATOMIC
        SELECT key FROM jsonb_each(risk) WHERE jsonb_typeof(value) = 'number'
        ORDER BY value::double precision DESC, key LIMIT 1;
    END;

ALTER TABLE machines ADD COLUMN dominant_mode text GENERATED ALWAYS AS (pdm_dominant_mode(mode_risk_max)) STORED;

-- Fleet view: the first page in its order is the first rows of one of these, with or without a mode filter.
CREATE INDEX machines_fleet_order ON machines (pdm_state_rank(worst_state), health_last, gateway_id, machine_id);
CREATE INDEX machines_mode_order ON machines (dominant_mode, pdm_state_rank(worst_state), health_last, gateway_id,
                                              machine_id);
-- Fleet with a gateway filter: that gateway's machines.
CREATE INDEX machines_gateway_state ON machines (gateway_id, worst_state);

-- Fleet counts and the gateways panel: machines by gateway and state, kept by triggers on machines, so that neither
-- reads the 100,000 rows of machines at every refresh.
CREATE TABLE machine_states (
    gateway_id  integer NOT NULL REFERENCES gateways (id),
    worst_state text NOT NULL,
    machines    integer NOT NULL,
    PRIMARY KEY (gateway_id, worst_state)
);

CREATE FUNCTION pdm_count_machine_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO machine_states AS c (gateway_id, worst_state, machines)
        SELECT gateway_id, worst_state, count(*) FROM new_machines GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (gateway_id, worst_state) DO UPDATE SET machines = c.machines + excluded.machines;
    ELSE
        INSERT INTO machine_states AS c (gateway_id, worst_state, machines)
        SELECT gateway_id, worst_state, sum(delta) FROM (
            SELECT gateway_id, worst_state, 1 AS delta FROM new_machines
            UNION ALL
            SELECT gateway_id, worst_state, -1 FROM old_machines
        ) AS changes
        GROUP BY 1, 2 HAVING sum(delta) <> 0 ORDER BY 1, 2  -- one lock order: concurrent batches cannot deadlock
        ON CONFLICT (gateway_id, worst_state) DO UPDATE SET machines = c.machines + excluded.machines;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER machines_count_inserted AFTER INSERT ON machines REFERENCING NEW TABLE AS new_machines
    FOR EACH STATEMENT EXECUTE FUNCTION pdm_count_machine_states();
CREATE TRIGGER machines_count_updated AFTER UPDATE ON machines
    REFERENCING OLD TABLE AS old_machines NEW TABLE AS new_machines
    FOR EACH STATEMENT EXECUTE FUNCTION pdm_count_machine_states();

INSERT INTO machine_states (gateway_id, worst_state, machines)
SELECT gateway_id, worst_state, count(*) FROM machines GROUP BY 1, 2;

-- Machine view, ranges up to a few days: a machine's windows with what its chart draws, from the index alone (an
-- index-only scan: no heap page per window). Replaces summaries_machine_window, whose key it extends.
CREATE INDEX summaries_machine_chart ON summaries (gateway_id, machine_id, window_start)
    INCLUDE (health_min, health_mean, p_failure_max, worst_state, mode_risk_max);
DROP INDEX summaries_machine_window;

-- Machine view, longer ranges (weeks to months): per machine and UTC hour, the worst of its windows, kept by a
-- trigger on every insert into summaries (a duplicate, not inserted, is not counted: exactly once here too). A month
-- is 720 rows instead of 43,200.
CREATE TABLE summaries_hourly (
    gateway_id      integer NOT NULL REFERENCES gateways (id),
    machine_id      text NOT NULL,
    hour            timestamptz NOT NULL,
    windows         integer NOT NULL,
    health_min      double precision NOT NULL,
    health_mean_sum double precision NOT NULL,  -- / windows: the hour's mean health
    p_failure_max   double precision NOT NULL,
    worst_rank      integer NOT NULL,  -- pdm_state_rank() of the worst state
    mode_risk_max   jsonb NOT NULL,
    PRIMARY KEY (gateway_id, machine_id, hour)
);

-- Per failure mode, the higher risk of two objects.
CREATE FUNCTION pdm_risk_max(a jsonb, b jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE
    BEGIN ATOMIC
        SELECT coalesce(jsonb_object_agg(key, risk), '{}'::jsonb) FROM (
            SELECT key, max(value::double precision) AS risk
            FROM (SELECT * FROM jsonb_each(a) UNION ALL SELECT * FROM jsonb_each(b)) AS both_
            WHERE jsonb_typeof(value) = 'number' GROUP BY key) AS maxima;
    END;

CREATE FUNCTION pdm_roll_up_summaries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO summaries_hourly AS h (gateway_id, machine_id, hour, windows, health_min, health_mean_sum,
                                       p_failure_max, worst_rank, mode_risk_max)
    SELECT n.gateway_id, n.machine_id, date_trunc('hour', n.window_start, 'UTC'), count(*), min(n.health_min),
           sum(n.health_mean), max(n.p_failure_max), min(pdm_state_rank(n.worst_state)),
           (SELECT coalesce(jsonb_object_agg(r.key, r.risk), '{}'::jsonb) FROM (
               SELECT e.key, max(e.value::double precision) AS risk
               FROM unnest(array_agg(n.mode_risk_max)) AS x (risk), jsonb_each(x.risk) AS e
               WHERE jsonb_typeof(e.value) = 'number' GROUP BY e.key) AS r)
    FROM new_summaries n
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3  -- rows locked in one order: two concurrent batches cannot deadlock
    ON CONFLICT (gateway_id, machine_id, hour) DO UPDATE SET
        windows = h.windows + excluded.windows, health_min = least(h.health_min, excluded.health_min),
        health_mean_sum = h.health_mean_sum + excluded.health_mean_sum,
        p_failure_max = greatest(h.p_failure_max, excluded.p_failure_max),
        worst_rank = least(h.worst_rank, excluded.worst_rank),
        mode_risk_max = pdm_risk_max(h.mode_risk_max, excluded.mode_risk_max);
    RETURN NULL;
END
$$;

CREATE TRIGGER summaries_roll_up AFTER INSERT ON summaries REFERENCING NEW TABLE AS new_summaries
    FOR EACH STATEMENT EXECUTE FUNCTION pdm_roll_up_summaries();

-- What was stored before this migration.
INSERT INTO summaries_hourly (gateway_id, machine_id, hour, windows, health_min, health_mean_sum, p_failure_max,
                              worst_rank, mode_risk_max)
SELECT n.gateway_id, n.machine_id, date_trunc('hour', n.window_start, 'UTC'), count(*), min(n.health_min),
       sum(n.health_mean), max(n.p_failure_max), min(pdm_state_rank(n.worst_state)),
       (SELECT coalesce(jsonb_object_agg(r.key, r.risk), '{}'::jsonb) FROM (
           SELECT e.key, max(e.value::double precision) AS risk
           FROM unnest(array_agg(n.mode_risk_max)) AS x (risk), jsonb_each(x.risk) AS e
           WHERE jsonb_typeof(e.value) = 'number' GROUP BY e.key) AS r)
FROM summaries n
GROUP BY 1, 2, 3;
