"""The technician's page in headless Chromium (issue 18): the open alarms first, and with the status token a
technician acknowledges and labels them on the spot; what they did is stored once, waiting to reach central.
Screenshots under artifacts/screenshots/."""

from __future__ import annotations

import sqlite3
import time

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from drivers.base import RawReading
from tests.agent.test_status import HEALTHY, READINGS_EACH, TOKEN, open_agent, token_agent
from tests.agent.test_status_page import click
from tests.browser import chromium, console_errors, retrying, screenshot, wait_for

ROWS = """return [...document.querySelectorAll('#alarms tr.alarm-row')].map(r => ({
    machine: r.dataset.machine, state: r.querySelector('.badge').textContent,
    ack: r.querySelector('.ack-cell').textContent, label: r.querySelector('.label-cell .current-label')?.textContent
        || '', sync: r.querySelector('.sync-cell').textContent}))"""


def rows(driver) -> list[dict]:
    return driver.execute_script(ROWS)


def row(driver, machine: str) -> dict:
    return next((r for r in rows(driver) if r["machine"] == machine), {})


def test_a_technician_acknowledges_and_labels_an_alarm_from_the_page(tmp_path):
    with token_agent(tmp_path) as agent, chromium() as driver:
        database = agent.agent.store.path
        driver.get(agent.url + "/")
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "form.login input"))
        driver.find_element(By.CSS_SELECTOR, "form.login input").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "form.login button").click()

        # The open alarms come first, the worst first, none acknowledged yet.
        wait_for(driver, lambda d: [(r["machine"], r["state"]) for r in rows(d)] == [("m-hdf", "alarm"),
                                                                                      ("m-ood", "alarm")])
        assert driver.execute_script("return document.querySelector('main > *').id") == "alarms"
        assert all(r["ack"] == "Acknowledge" for r in rows(driver))
        screenshot(driver, "status-page-alarms")

        retrying(driver, lambda d: d.find_element(By.ID, "technician").send_keys("Ana"))
        click(driver, 'tr[data-machine="m-hdf"] button.ack')
        wait_for(driver, lambda d: row(d, "m-hdf").get("ack", "").startswith("✓ acknowledgedby Ana"))
        assert row(driver, "m-hdf")["sync"] == "waiting to reach central"  # no central configured
        assert row(driver, "m-ood")["ack"] == "Acknowledge"

        retrying(driver, lambda d: Select(d.find_element(
            By.CSS_SELECTOR, 'tr[data-machine="m-hdf"] select.label-choice')).select_by_value("failure:HDF"))
        click(driver, 'tr[data-machine="m-hdf"] button.save-label')
        wait_for(driver, lambda d: row(d, "m-hdf").get("label") == "failure: heat dissipation (Ana)")
        screenshot(driver, "status-page-alarm-acknowledged-labelled")

        # m-ood returns to ok: its episode moves to "recently closed", where it can still be labelled.
        start = time.time()
        for i in range(READINGS_EACH):
            agent.agent.pipeline.put(RawReading("m-ood", start + i, dict(HEALTHY), "test", time.time()))
        closed = 'table.closed-alarms tr[data-machine="m-ood"]'
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, closed), 30)
        assert [r["machine"] for r in rows(driver)] == ["m-hdf", "m-ood"]
        retrying(driver, lambda d: Select(d.find_element(By.CSS_SELECTOR, f"{closed} select.label-choice"))
                 .select_by_value("false_alarm"))
        click(driver, f"{closed} button.save-label")
        wait_for(driver, lambda d: row(d, "m-ood").get("label") == "false alarm (Ana)")
        assert driver.find_elements(By.CSS_SELECTOR, f"{closed} button.ack") == []  # closed: nothing to acknowledge
        screenshot(driver, "status-page-alarm-closed-labelled")
        assert [e for e in console_errors(driver) if "status of 401" not in e] == []  # 401: before the token

    with sqlite3.connect(database) as db:
        assert db.execute("SELECT kind, json_extract(body, '$.by'), synced_at FROM actions ORDER BY id").fetchall() \
            == [("acknowledge", "Ana", None), ("label", "Ana", None), ("label", "Ana", None)]


def test_without_a_status_token_the_page_shows_the_alarms_but_no_buttons(tmp_path, mqtt_broker):
    with open_agent(tmp_path, mqtt_broker) as agent, chromium() as driver:
        driver.get(agent.url + "/")
        wait_for(driver, lambda d: len(rows(d)) == 2)
        assert driver.find_elements(By.CSS_SELECTOR, "#alarms button") == []
        assert "need the agent's status.token" in driver.execute_script(
            "return document.getElementById('alarms').textContent")
        assert all(r["ack"] == "not acknowledged" for r in rows(driver))
