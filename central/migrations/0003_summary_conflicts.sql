-- Conflicting duplicates (issue 14): a summary sent again under a stored summary_id but with other content (even
-- another machine_id). Ids are deterministic (UUIDv5 of gateway, machine and window start), so this is a bug on some
-- gateway. The stored summary is kept; each conflicting id is recorded here once, with how often it came again, for
-- the ops API (/api/v1/fleet) and for one log line per id (central/conflicts.py).
CREATE TABLE summary_conflicts (
    gateway_id        integer NOT NULL REFERENCES gateways (id),
    summary_id        uuid NOT NULL,
    stored_machine_id text NOT NULL,
    sent_machine_id   text NOT NULL,
    stored_batch_id   uuid NOT NULL,
    sent_batch_id     uuid NOT NULL,  -- the latest batch that conflicted
    times             bigint NOT NULL DEFAULT 1,
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, summary_id)
);
