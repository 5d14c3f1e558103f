"""End to end with notifications: MQTT -> `pdm-edge run` -> `pdm-central serve` on PostgreSQL -> a webhook receiver.
The drifting machine's alarm reaches the receiver as one `opened` and one `closed` delivery, signed (issue 18)."""

from __future__ import annotations

import time

from testkit.mqtt import Publisher
from testkit.net import free_port
from tests.agent.test_run import AgentProcess, wait_for
from tests.central.notify_support import SECRET, Receiver
from tests.central.support import PDM_CENTRAL, Server, environment
from tests.central.test_end_to_end import DRIFTING, telemetry


def test_an_agent_s_alarm_reaches_the_webhook_once_per_transition(tmp_path, private_broker, central_url, gateways):
    name, token = gateways.add("e2e-notify")
    receiver = Receiver()
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    config = tmp_path / "notify.toml"
    config.write_text(f'[channels.hook]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret_file = "{secret}"\n'
                      f'[[routes]]\nname = "e2e-{name}"\ngateways = ["{name}"]\nfrom_state = "alarm"\n'
                      'channels = ["hook"]\n')
    port = free_port()
    central = Server([PDM_CENTRAL, "serve", "--port", str(port)],
                     environment(central_url, PDM_CENTRAL_NOTIFY_CONFIG=str(config)), port, tmp_path / "central.log")
    central.wait_ready()
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name,
                         central={"url": central.base, "token": token, "sync_interval_s": 0.5},
                         summary={"window_s": 1, "grace_s": 0.5})
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([m for w in range(10) for m in telemetry(w)])
        wait_for(lambda: len(receiver.answered) >= 2, 90, "the alarm's deliveries at the receiver")
        time.sleep(1.0)  # nothing more arrives: one delivery per transition
        assert receiver.transitions() == [("closed", DRIFTING, f"e2e-{name}"), ("opened", DRIFTING, f"e2e-{name}")]
        assert len(receiver.requests) == 2 and all(valid for _, _, valid in receiver.requests)
        opened = next(body for body in receiver.answered.values() if body["transition"] == "opened")
        assert opened["episode"]["state"] == "alarm" and opened["episode"]["gateway"] == name
    finally:
        agent.stop()
        central.terminate()
        receiver.close()
