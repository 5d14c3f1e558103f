-- Actions technicians take on alarm episodes at a gateway (issue 18, SPEC §10): they travel up in the ingest body
-- and land in the episodes' audit log (central/gateway_actions.py), each once: a gateway's action carries a
-- deterministic id, unique per gateway.
ALTER TABLE alarm_actions ADD COLUMN gateway_id integer REFERENCES gateways (id);  -- the gateway it was taken at
ALTER TABLE alarm_actions ADD COLUMN action_id uuid;  -- the gateway's id of the action
CREATE UNIQUE INDEX alarm_actions_gateway_action ON alarm_actions (gateway_id, action_id) WHERE action_id IS NOT NULL;
-- the desired state's acknowledgements and the dashboard's "acknowledged at the gateway": the episode's latest label
-- and its acknowledgement, found by episode
CREATE INDEX alarm_actions_episode_action ON alarm_actions (episode_id, action, at DESC);
