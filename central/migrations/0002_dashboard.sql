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
-- Gateways panel: machines by state per gateway from the index alone.
CREATE INDEX machines_gateway_state ON machines (gateway_id, worst_state);

-- Machine view: a machine's windows over a range, with what its chart draws, from the index alone (an index-only
-- scan: no heap page per window). Replaces summaries_machine_window, whose key it extends.
CREATE INDEX summaries_machine_chart ON summaries (gateway_id, machine_id, window_start)
    INCLUDE (health_min, health_mean, p_failure_max, worst_state, mode_risk_max);
DROP INDEX summaries_machine_window;
