"""End to end (issue 18): MQTT -> `pdm-edge run` -> `pdm-central serve` on PostgreSQL. A technician acknowledges and
labels an alarm on the gateway's status API while central is down; when central comes back, both reach its episode
and audit log exactly once, as the technician at that gateway. An acknowledgement made at central comes down in the
desired state and shows on the gateway's page (headless Chromium, screenshot)."""

from __future__ import annotations

import psycopg
import requests
from selenium.webdriver.common.by import By

from testkit.mqtt import Publisher
from testkit.net import free_port
from tests.agent.test_run import AgentProcess, wait_for
from tests.browser import chromium, screenshot
from tests.browser import wait_for as wait_in_page
from tests.central.support import OPS, Server
from tests.central.test_end_to_end import DRIFTING, telemetry

STATUS_TOKEN = "status-token-for-e2e-0123456789"


def central_episode(central_url: str, gateway: str) -> tuple | None:
    with psycopg.connect(central_url) as conn:
        return conn.execute(
            "SELECT a.id, a.machine_id, a.acknowledged_by, a.label, a.label_mode, a.closed_at IS NULL"
            " FROM alarm_episodes a JOIN gateways g ON g.id = a.gateway_id WHERE g.name = %s AND a.merged_into IS NULL",
            (gateway,)).fetchone()


def audit(central_url: str, episode: int) -> list[tuple]:
    with psycopg.connect(central_url) as conn:
        return conn.execute("SELECT action, actor, detail->>'by', action_id IS NOT NULL FROM alarm_actions"
                            " WHERE episode_id = %s ORDER BY id", (episode,)).fetchall()


def test_actions_taken_at_the_gateway_while_central_is_down_reach_it_once(tmp_path, private_broker, central_url,
                                                                           gateways):
    name, token = gateways.add("e2e-actions")
    port = free_port()
    central = Server.central(central_url, tmp_path / "central-1.log", port)
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name, status={"token": STATUS_TOKEN},
                         central={"url": central.base, "token": token, "sync_interval_s": 0.5},
                         summary={"window_s": 1, "grace_s": 0.5})
    status = f"http://127.0.0.1:{agent.status_port}/api/v1/alarms"
    auth = {"Authorization": f"Bearer {STATUS_TOKEN}"}
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:  # the drifting machine goes into alarm and stays there
            publisher.publish_all([m for w in range(7) for m in telemetry(w)])
        wait_for(lambda: central_episode(central_url, name) is not None, 60, "the episode at central")
        assert central.terminate() == 0

        [alarm] = requests.get(status, headers=auth, timeout=10).json()["alarms"]
        assert alarm["machine_id"] == DRIFTING and alarm["open"]
        episode = f"{status}/{alarm['episode_id']}"
        assert requests.post(f"{episode}/acknowledge", json={"by": "Ana", "note": "checking the spindle"},
                             headers=auth, timeout=10).status_code == 200
        labelled = requests.post(f"{episode}/label", json={"by": "Ana", "label": "failure", "mode": "PWF"},
                                 headers=auth, timeout=10)
        assert labelled.status_code == 200 and labelled.json()["pending_sync"] == 2
        wait_for(lambda: agent.count("actions WHERE synced_at IS NULL") == 2, 10, "the actions kept")

        central = Server.central(central_url, tmp_path / "central-2.log", port)
        wait_for(lambda: agent.count("actions WHERE synced_at IS NULL") == 0, 60, "the actions at central")
        episode_id, machine, acknowledged_by, label, mode, still_open = central_episode(central_url, name)
        assert (machine, label, mode, still_open) == (DRIFTING, "failure", "PWF", True)
        assert acknowledged_by == f"Ana (technician at gateway {name})"
        actor = f"technician at gateway {name}"
        assert audit(central_url, episode_id) == [("acknowledge", actor, "Ana", True), ("label", actor, "Ana", True)]

        agent.stop()  # kill -9 and start again: nothing is sent twice
        agent.start()
        wait_for(lambda: "sync" in requests.get(f"http://127.0.0.1:{agent.status_port}/api/v1/status", headers=auth,
                                                timeout=10).json(), 30, "the agent back")
        listed = requests.get(status, headers=auth, timeout=10).json()["alarms"]
        assert [(a["acknowledged_by"], a["label"], a["pending_sync"]) for a in listed] == [("Ana", "failure", 0)]
        assert len(audit(central_url, episode_id)) == 2
    finally:
        agent.stop()
        central.terminate()


def test_an_acknowledgement_made_at_central_shows_on_the_gateway_s_page(tmp_path, private_broker, central_url,
                                                                        gateways):
    name, token = gateways.add("e2e-ack-down")
    central = Server.central(central_url, tmp_path / "central.log")
    agent = AgentProcess(tmp_path, private_broker.url, gateway_id=name, status={"token": STATUS_TOKEN},
                         central={"url": central.base, "token": token, "sync_interval_s": 0.5},
                         summary={"window_s": 1, "grace_s": 0.5})
    status = f"http://127.0.0.1:{agent.status_port}"
    auth = {"Authorization": f"Bearer {STATUS_TOKEN}"}
    try:
        agent.start()
        with Publisher(private_broker.url) as publisher:
            publisher.publish_all([m for w in range(7) for m in telemetry(w)])
        wait_for(lambda: central_episode(central_url, name) is not None, 60, "the episode at central")
        episode_id = central_episode(central_url, name)[0]
        acknowledged = requests.post(f"{central.base}/api/v1/alarms/{episode_id}/acknowledge",
                                     json={"by": "Olga"}, headers=OPS, timeout=10)
        assert acknowledged.status_code == 200

        def at_the_gateway() -> dict | None:
            listed = requests.get(f"{status}/api/v1/alarms", headers=auth, timeout=10).json()["alarms"]
            return listed[0] if listed and listed[0]["acknowledged_at"] else None
        wait_for(at_the_gateway, 30, "central's acknowledgement at the gateway")
        alarm = at_the_gateway()
        assert (alarm["acknowledged_by"], alarm["acknowledged_where"]) == ("Olga (ops token)", "central")
        assert agent.count("actions") == 0  # nothing of the gateway's own to send

        with chromium() as driver:
            driver.get(status + "/")
            wait_in_page(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "form.login input"))
            driver.find_element(By.CSS_SELECTOR, "form.login input").send_keys(STATUS_TOKEN)
            driver.find_element(By.CSS_SELECTOR, "form.login button").click()
            cell = f"return document.querySelector('tr[data-machine=\"{DRIFTING}\"] .ack-cell')?.innerText"
            text = wait_in_page(driver, lambda d: d.execute_script(cell))
            assert text.startswith("✓ acknowledged\nby Olga (ops token) at central")
            assert driver.find_elements(By.CSS_SELECTOR, "#alarms button.ack") == []
            screenshot(driver, "status-page-acknowledged-at-central")
    finally:
        agent.stop()
        central.terminate()
