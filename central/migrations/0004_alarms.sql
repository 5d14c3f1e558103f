-- Alarm episodes, their audit log, and the notification outbox (issue 18, SPEC §10; central/alarms.py and
-- central/notify/ say how they are kept).

-- An episode: a machine out of ok, from its first event out of ok to its return to ok. Built from the events in
-- the ingest transaction; its events are the machine's events in [opened_at, closed_at] (no link table).
CREATE TABLE alarm_episodes (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gateway_id      integer NOT NULL REFERENCES gateways (id),
    machine_id      text NOT NULL,
    opened_at       timestamptz NOT NULL,
    closed_at       timestamptz,
    state           text NOT NULL CHECK (state IN ('warning', 'alarm')),  -- the latest state out of ok
    peak_state      text NOT NULL CHECK (peak_state IN ('warning', 'alarm')),
    dominant_mode   text NOT NULL,  -- of the event that reached the peak
    p_failure_max   double precision NOT NULL,
    events          integer NOT NULL,
    -- a late event can join two episodes into one: the later one points at the one kept, and is no longer listed
    merged_into     bigint REFERENCES alarm_episodes (id),
    acknowledged_at timestamptz,
    acknowledged_by text,
    assignee        text,
    label           text CHECK (label IN ('failure', 'false_alarm', 'unsure')),
    label_mode      text,
    escalated_at    timestamptz,
    -- when central first heard of it: escalation counts from here (a gateway offline for hours must not send an
    -- episode that escalates the moment it arrives)
    noticed_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alarm_episodes_machine ON alarm_episodes (gateway_id, machine_id, opened_at);
-- the list: open ones first, newest first
CREATE INDEX alarm_episodes_list ON alarm_episodes ((closed_at IS NULL) DESC, opened_at DESC, id DESC)
    WHERE merged_into IS NULL;
-- the notification worker's escalation check, every round: the open, unacknowledged ones only
CREATE INDEX alarm_episodes_unacknowledged ON alarm_episodes (noticed_at)
    WHERE closed_at IS NULL AND acknowledged_at IS NULL AND merged_into IS NULL;

-- Every action on an episode: who, when, what, from where.
CREATE TABLE alarm_actions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    episode_id  bigint NOT NULL REFERENCES alarm_episodes (id),
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,  -- "ops token" or "dashboard session"; later a gateway's technician
    action      text NOT NULL CHECK (action IN ('acknowledge', 'comment', 'assign', 'label')),
    detail      jsonb NOT NULL,
    client_addr inet
);
CREATE INDEX alarm_actions_episode ON alarm_actions (episode_id, id);

-- The outbox: one row per delivery, written in the transaction that made the transition (so a stored event and its
-- notifications commit together or not at all), delivered by a worker (central/notify/worker.py).
CREATE TABLE notify_outbox (
    delivery_id  uuid PRIMARY KEY,  -- UUIDv5 of (episode, transition, route, channel): stable across retries
    route        text NOT NULL,
    channel      text NOT NULL,
    episode_id   bigint REFERENCES alarm_episodes (id),  -- null for a digest
    transition   text NOT NULL,  -- opened, alarm, closed, escalation, digest
    payload      jsonb NOT NULL,
    -- pending: to deliver; held: part of a flood, waits for its route's digest; digested: sent within one;
    -- delivered; failed: gave up after the retry horizon
    state        text NOT NULL CHECK (state IN ('pending', 'held', 'digested', 'delivered', 'failed')),
    digest_id    uuid,
    created_at   timestamptz NOT NULL,
    due_at       timestamptz NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    delivered_at timestamptz
);
CREATE INDEX notify_outbox_due ON notify_outbox (due_at) WHERE state = 'pending';
CREATE INDEX notify_outbox_held ON notify_outbox (route, created_at) WHERE state = 'held';
CREATE INDEX notify_outbox_route_recent ON notify_outbox (route, created_at);
CREATE INDEX notify_outbox_log ON notify_outbox (created_at DESC, delivery_id);
CREATE INDEX notify_outbox_episode ON notify_outbox (episode_id, route, transition);
-- the delivery log's counts of what is not (yet) delivered
CREATE INDEX notify_outbox_undelivered ON notify_outbox (state) WHERE state IN ('pending', 'held', 'failed');
