"""Alarm episodes on the fleet dashboard in headless Chromium, against `pdm-central serve` on PostgreSQL (issue 18):
open episodes first with their age and acknowledgement; ops acknowledge and label them from the page, and each
action is in the audit log as the dashboard session with the name given. Screenshot:
artifacts/screenshots/dashboard-alarms*.png."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from testkit import batches
from testkit.central import OPS_TOKEN
from tests.agent.test_run import wait_for as wait_until
from tests.agent.test_status_page import click
from tests.browser import chromium, console_errors, retrying, screenshot, wait_for
from tests.central.support import OPS, Server, bearer
from tests.central.test_dashboard import sign_in

EPISODES = """return [...document.querySelectorAll('#alarms tr.episode')].map(r => ({
    machine: r.dataset.machine, open: r.classList.contains('open'), state: r.querySelector('.badge').textContent,
    ack: r.querySelector('.ack-cell').textContent,
    label: r.querySelector('.label-cell .current-label')?.textContent || ''}))"""


def test_ops_acknowledge_and_label_an_alarm_episode_from_the_dashboard(central_url, gateways, conn, tmp_path):
    server = Server.central(central_url, tmp_path / "log")
    gateway = gateways.add("plant")
    name = gateway[0]
    now = datetime.now(UTC).replace(microsecond=0)
    story = [("press-01", now - timedelta(hours=3), "ok", "warning"),
             ("press-01", now - timedelta(hours=2), "warning", "ok"),
             ("mill-07", now - timedelta(minutes=40), "ok", "warning"),
             ("mill-07", now - timedelta(minutes=30), "warning", "alarm")]
    events = [batches.event(name, machine, 0, to_state, from_state, t0=t0)
              for machine, t0, from_state, to_state in story]
    body = batches.batch(name, summaries=[], events=events)
    assert requests.post(server.base + "/api/v1/ingest", json=body, headers=bearer(gateway[1]),
                         timeout=10).status_code == 200
    base = server.base.replace("127.0.0.1", "localhost")  # a secure context for the Secure cookie over http
    [episode_id] = conn.execute("SELECT a.id FROM alarm_episodes a JOIN gateways g ON g.id = a.gateway_id"
                                " WHERE g.name = %s AND a.closed_at IS NULL", [name]).fetchone()

    def audit() -> list[dict]:
        return requests.get(f"{server.base}/api/v1/alarms/{episode_id}", headers=OPS, timeout=10).json()["actions"]
    try:
        with chromium(1400, 1000) as driver:
            sign_in(driver, base, OPS_TOKEN)
            wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#alarms"))
            driver.get(f"{base}/#/?gateway={name}")  # this plant only: the database is shared with other tests

            def episodes(d=driver) -> list[dict]:
                return d.execute_script(EPISODES)
            wait_for(driver, lambda d: [e["machine"] for e in episodes(d)] == ["mill-07", "press-01"])
            mill, press = episodes()
            assert (mill["open"], mill["state"], press["open"], press["state"]) == (True, "alarm", False, "closed")
            mill_row = 'tr.episode[data-machine="mill-07"]'
            row_text = f"return document.querySelector('{mill_row}').textContent"
            # Read in scripts: the page redraws itself, and an element found a moment ago may be gone.
            assert mill["ack"] == "Acknowledge" and re.search(r"open for \d+ min", driver.execute_script(row_text))
            assert driver.execute_script("return document.querySelector('#alarms h2').textContent") \
                == "Alarm episodes: 1 open"
            screenshot(driver, "dashboard-alarms")

            retrying(driver, lambda d: d.find_element(By.ID, "person").send_keys("Olga"))
            click(driver, f"{mill_row} button.ack")
            wait_for(driver, lambda d: episodes(d)[0]["ack"].startswith("✓ acknowledgedby Olga (dashboard session)"))
            retrying(driver, lambda d: Select(d.find_element(By.CSS_SELECTOR, f"{mill_row} select.label-choice"))
                     .select_by_value("failure:OSF"))
            click(driver, f"{mill_row} button.save-label")
            wait_for(driver, lambda d: episodes(d)[0]["label"] == "failure: overstrain")
            screenshot(driver, "dashboard-alarms-acknowledged-labelled")

            click(driver, f"{mill_row} details summary")  # stays open across the page's refreshes
            retrying(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"{mill_row} input.assignee-input")
                     .send_keys("Piotr"))
            click(driver, f"{mill_row} button.assign")
            wait_for(driver, lambda d: "assigned to Piotr" in d.execute_script(row_text))
            retrying(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"{mill_row} input.comment-input").send_keys(
                "spindle bearing worn"))
            click(driver, f"{mill_row} button.comment")
            wait_until(lambda: len(audit()) == 4, 15, "the comment in the audit log")
            assert console_errors(driver) == []

        detail = requests.get(f"{server.base}/api/v1/alarms/{episode_id}", headers=OPS, timeout=10).json()
        assert [(a["action"], a["actor"], a["detail"].get("by")) for a in detail["actions"]] == [
            ("acknowledge", "dashboard session", "Olga"), ("label", "dashboard session", "Olga"),
            ("assign", "dashboard session", "Olga"), ("comment", "dashboard session", "Olga")]
        assert detail["assignee"] == "Piotr" and detail["actions"][3]["detail"]["text"] == "spindle bearing worn"
        assert (detail["label"], detail["label_mode"]) == ("failure", "OSF")
    finally:
        assert server.terminate() == 0
