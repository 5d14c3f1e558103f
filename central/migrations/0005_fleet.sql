-- Fleet management (issue 17, SPEC §9): signed model bundles, each gateway's desired state, what it applied,
-- staged rollouts and the shadow figures their gates read. Independent of 0006: applied before it on a new database,
-- after it on one upgraded from a release that had 0006 already.

-- A signed bundle as uploaded (`pdm-central model upload`): the exact tar bytes gateways download and verify.
CREATE TABLE model_bundles (
    name         text NOT NULL CHECK (name ~ '^[A-Za-z0-9._-]{1,64}$'),
    version      text NOT NULL CHECK (version ~ '^[A-Za-z0-9._-]{1,64}$'),
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),  -- the ONNX file's, as the signed manifest says
    key_id       text NOT NULL,
    signer       text NOT NULL,
    bundle       bytea NOT NULL,
    uploaded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Revisions come from one sequence: a revision names one desired state of one gateway, and its ETag changes with it.
CREATE SEQUENCE desired_revision;

-- What central wants each gateway to run. No row: nothing (revision 0; the gateway runs its own configuration).
CREATE TABLE gateway_desired (
    gateway_id      integer PRIMARY KEY REFERENCES gateways (id),
    revision        bigint NOT NULL,
    model           jsonb,          -- {name, version, sha256} or null: the gateway's configured model
    shadow          jsonb,          -- {name, version, sha256} or null: no shadow scoring
    config_revision integer NOT NULL DEFAULT 0,
    overrides       jsonb NOT NULL DEFAULT '{}',
    pinned          boolean NOT NULL DEFAULT false,  -- rollouts leave a pinned gateway alone
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- One staged rollout; at most one is running at a time.
CREATE TABLE rollouts (
    id              integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL,
    version         text NOT NULL,
    sha256          text NOT NULL,
    state           text NOT NULL CHECK (state IN ('running', 'completed', 'rolled_back', 'aborted')),
    cohorts         jsonb NOT NULL,  -- [[gateway name, ...], ...]
    cohort          integer NOT NULL DEFAULT 0,  -- index of the cohort in progress
    phase           text NOT NULL CHECK (phase IN ('shadow', 'live', 'done')),
    gates           jsonb NOT NULL,  -- min_readings, min_minutes, min_agreement, max_alarm_rate_change
    previous        jsonb NOT NULL DEFAULT '{}',  -- gateway name -> the model it ran before (null: its own)
    reason          text,  -- why it stopped, when it did
    started_at      timestamptz NOT NULL DEFAULT now(),
    phase_started_at timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (name, version) REFERENCES model_bundles (name, version)
);
CREATE UNIQUE INDEX rollouts_one_running ON rollouts ((true)) WHERE state = 'running';

-- Shadow figures summed from the summaries central stored (each once: only newly stored ones count), per gateway
-- and candidate; a rollout clears its cohort's rows when the cohort starts shadowing.
CREATE TABLE shadow_figures (
    gateway_id    integer NOT NULL REFERENCES gateways (id),
    name          text NOT NULL,
    version       text NOT NULL,
    readings      bigint NOT NULL DEFAULT 0,
    agreed        bigint NOT NULL DEFAULT 0,
    live_warning  bigint NOT NULL DEFAULT 0,
    live_alarm    bigint NOT NULL DEFAULT 0,
    warning       bigint NOT NULL DEFAULT 0,
    alarm         bigint NOT NULL DEFAULT 0,
    out_of_distribution bigint NOT NULL DEFAULT 0,
    score_s       double precision NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, name, version)
);
