-- Gateways, the summaries and events they send, and the latest state of each machine.
-- Applied by `pdm-central migrate` in one transaction, recorded in schema_migrations.

CREATE TABLE gateways (
    id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$'),
    -- sha256 of the token: tokens are 256-bit random strings, so a fast hash is enough (see central/auth.py).
    token_hash   bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_seen_at timestamptz,
    last_addr    inet,
    agent_version text,
    last_batch_id uuid,
    last_status  jsonb  -- the batch's `gateway` object: buffer_pending, dropped_total, dropped, uptime_s
);

-- Ids are scoped by gateway: a gateway that sends another gateway's (predictable, UUIDv5) ids cannot make central
-- drop that gateway's data as duplicates.
CREATE TABLE summaries (
    gateway_id      integer NOT NULL REFERENCES gateways (id),
    summary_id      uuid NOT NULL,
    machine_id      text NOT NULL,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    model_sha256    text NOT NULL,
    readings        integer NOT NULL,
    rejected        integer NOT NULL,
    out_of_distribution integer NOT NULL,
    health_min      double precision NOT NULL,
    health_mean     double precision NOT NULL,
    health_last     double precision NOT NULL,
    p_failure_max   double precision NOT NULL,
    p_failure_mean  double precision NOT NULL,
    worst_state     text NOT NULL CHECK (worst_state IN ('ok', 'warning', 'alarm')),
    mode_risk_max   jsonb NOT NULL,
    inputs          jsonb NOT NULL,
    batch_id        uuid NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, summary_id)
);
CREATE INDEX summaries_machine_window ON summaries (gateway_id, machine_id, window_start);
-- "which windows were not ok, lately": small, as most windows are ok.
CREATE INDEX summaries_not_ok ON summaries (window_start) WHERE worst_state <> 'ok';

CREATE TABLE events (
    gateway_id      integer NOT NULL REFERENCES gateways (id),
    event_id        uuid NOT NULL,
    machine_id      text NOT NULL,
    ts              timestamptz NOT NULL,
    from_state      text NOT NULL CHECK (from_state IN ('ok', 'warning', 'alarm')),
    to_state        text NOT NULL CHECK (to_state IN ('ok', 'warning', 'alarm')),
    p_failure       double precision NOT NULL,
    health          double precision NOT NULL,
    dominant_mode   text NOT NULL,
    mode_risk       jsonb NOT NULL,
    reading         jsonb NOT NULL,
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    model_sha256    text NOT NULL,
    batch_id        uuid NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, event_id)
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_machine_ts ON events (gateway_id, machine_id, ts);

-- One row per machine: its latest summary, kept by ingest, so that the fleet and state queries read one row per
-- machine instead of scanning the history.
CREATE TABLE machines (
    gateway_id      integer NOT NULL REFERENCES gateways (id),
    machine_id      text NOT NULL,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    summary_id      uuid NOT NULL,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    worst_state     text NOT NULL CHECK (worst_state IN ('ok', 'warning', 'alarm')),
    health_last     double precision NOT NULL,
    p_failure_max   double precision NOT NULL,
    mode_risk_max   jsonb NOT NULL,
    model_name      text NOT NULL,
    model_version   text NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, machine_id)
);
CREATE INDEX machines_state ON machines (worst_state);
