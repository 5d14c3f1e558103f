"""The technician's page in headless Chromium, against `pdm-edge run` fed by the MQTT plant simulator: what a
technician sees at `/`, the detail view a click opens, the gateway panel, and the token prompt. Screenshots are
saved under artifacts/screenshots/."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

from drivers.simulator import Drift, Plant
from drivers.simulator_mqtt import MqttSimulator
from tests.agent.test_run import AgentProcess
from tests.browser import chromium, console_errors, screenshot, wait_for

TOKEN = "page-token-for-tests-0123456789"
MACHINES = ["m1", "m2", "m3", "m4"]
PAGE_WAIT_S = 60.0  # the page refreshes every 5 s; the drifting machine needs a few seconds to reach its alarm

# Read in one script, so a refresh of the page between two reads cannot mix two renderings.
CARDS = """return [...document.querySelectorAll('a.card')].map(c => [c.querySelector('.id').textContent,
    c.querySelector('.badge').textContent, c.classList.contains(c.querySelector('.badge').textContent)])"""
OVERVIEW = """return {counts: [...document.querySelectorAll('.counts > span')].map(e => e.textContent),
    risk: Object.fromEntries([...document.querySelectorAll('a.card')].map(c => [c.querySelector('.id').textContent,
        c.querySelector('.risk').textContent])),
    trends: document.querySelectorAll('a.card svg.spark polyline').length}"""
DRIVERS = """const h = [...document.querySelectorAll('h2')].find(e => e.textContent === 'Drivers');
    return h ? [...h.nextElementSibling.querySelectorAll('tr')].slice(1)
        .map(r => [...r.cells].map(c => c.textContent)) : null"""
GATEWAY = """const h = [...document.querySelectorAll('h2')].find(e => e.textContent === 'Gateway');
    return h ? Object.fromEntries([...h.nextElementSibling.querySelectorAll('dt')]
        .map(dt => [dt.textContent, dt.nextElementSibling.textContent])) : null"""
PROMPT = "return document.querySelector('form.login p')?.textContent || ''"
DETAIL = """const h = [...document.querySelectorAll('h2')].map(e => e.textContent);
    if (!h.includes('Latest values')) return null;
    const rows = t => [...t.querySelectorAll('tr')].slice(1).map(r => [...r.cells].map(c => c.textContent));
    const panels = [...document.querySelectorAll('.panel table')];
    return {id: document.querySelector('.panel .id').firstChild.textContent,
            badge: document.querySelector('.panel .badge').textContent, headings: h,
            inputs: rows(panels[0]), events: panels[2] ? rows(panels[2]) : [],
            modes: [...panels[1].querySelectorAll('tr')].slice(1)
                .map(r => [r.querySelector('strong').textContent, r.classList.contains('out')])}"""


def status_url(agent: AgentProcess) -> str:
    return "http://" + tomllib.loads(agent.config.read_text())["status"]["bind"] + "/"


@contextmanager
def simulated_plant(broker_url: str, plant: Plant) -> Iterator[MqttSimulator]:
    """The plant simulator publishing five times a second until the block ends."""
    simulator = MqttSimulator(plant, broker_url, interval_s=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=simulator.run, args=(stop,), name="plant-simulator")
    thread.start()
    try:
        yield simulator
    finally:
        stop.set()
        thread.join()
        simulator.close()


@pytest.fixture
def plant_agent(tmp_path, private_broker) -> Iterator[AgentProcess]:
    """The agent on a plant of four machines; m2 drifts to overstrain within seconds."""
    agent = AgentProcess(tmp_path, private_broker.url)
    try:
        agent.start()
        with simulated_plant(private_broker.url, Plant(len(MACHINES), seed=0, drift=Drift("m2", "OSF", 0.1))):
            yield agent
    finally:
        agent.stop()


def click(driver, selector: str) -> None:
    """Click the element once it exists, again if a refresh replaced it under the click."""
    def attempt(d) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except StaleElementReferenceException:
            return False

    wait_for(driver, attempt)


def test_the_page_lists_the_machines_opens_a_detail_view_and_shows_the_drivers(plant_agent):
    with chromium() as driver:
        driver.get(status_url(plant_agent))
        # Worst first: the drifting machine in alarm, the others ok; each card coloured by its state.
        expected = [["m2", "alarm", True], *([m, "ok", True] for m in MACHINES if m != "m2")]
        wait_for(driver, lambda d: d.execute_script(CARDS) == expected, PAGE_WAIT_S)
        assert driver.title == "pdm-edge gw-test"
        overview = driver.execute_script(OVERVIEW)
        assert overview["counts"] == ["1 alarm", "0 warning", "3 ok"]
        assert overview["risk"]["m2"].startswith("Overstrain — tool wear × torque near the limit")
        assert overview["risk"]["m1"].startswith("No elevated risk")
        assert overview["trends"] == len(MACHINES)  # each card's health trend

        [[name, connection, errors, last_error]] = wait_for(driver, lambda d: d.execute_script(DRIVERS))
        assert (name, connection, errors, last_error) == ("mqtt", "connected", "none", "–")
        gateway = driver.execute_script(GATEWAY)
        assert gateway["gateway"] == "gw-test" and gateway["model"].startswith("ai4i-failure")
        assert "accepted" in gateway["readings"] and gateway["sync"] == "off (no central URL): buffering locally"
        screenshot(driver, "status-page")
        driver.execute_script("[...document.querySelectorAll('h2')].find(e => e.textContent === 'Gateway')"
                              ".scrollIntoView(); window.scrollBy(0, -70)")  # clear of the sticky header
        screenshot(driver, "status-page-gateway")

        click(driver, 'a.card[href="#/m/m2"]')
        detail = wait_for(driver, lambda d: d.execute_script(DETAIL), PAGE_WAIT_S)
        assert driver.current_url.endswith("#/m/m2") and driver.title == "m2 · pdm-edge"
        assert (detail["id"], detail["badge"]) == ("m2", "alarm")
        assert detail["headings"] == ["Latest values", "Risk by failure mode", "Recent state changes"]
        assert [row[0].split("outside")[0] for row in detail["inputs"]] == [
            "air temperature", "process temperature", "rotational speed", "torque", "tool wear"]
        assert [label for label, _ in detail["modes"]] == ["tool wear failure", "heat dissipation", "power",
                                                           "overstrain"]
        assert ["overstrain", True] in detail["modes"]  # marked as elevated
        assert any(row[1].endswith("→ alarm") for row in detail["events"]), detail["events"]
        assert driver.find_elements(By.CSS_SELECTOR, "svg.chart polyline")
        screenshot(driver, "status-page-detail")

        click(driver, "a.back")
        wait_for(driver, lambda d: d.execute_script(CARDS) and d.title == "pdm-edge gw-test")
        assert console_errors(driver) == []  # no script error, no CSP violation, no failed request


def test_with_a_token_the_page_asks_for_it_and_refuses_a_wrong_one(tmp_path, private_broker, monkeypatch):
    monkeypatch.setenv("PDM_STATUS__TOKEN", TOKEN)
    agent = AgentProcess(tmp_path, private_broker.url)
    try:
        agent.start()
        with simulated_plant(private_broker.url, Plant(2, seed=1)), chromium() as driver:
            driver.get(status_url(agent))
            assert "needs its token" in wait_for(driver, lambda d: d.execute_script(PROMPT))
            assert not driver.find_elements(By.CSS_SELECTOR, "a.card")
            screenshot(driver, "status-page-token")

            driver.find_element(By.CSS_SELECTOR, "form.login input").send_keys("not-the-token")
            driver.find_element(By.CSS_SELECTOR, "form.login button").click()
            wait_for(driver, lambda d: "That token was refused" in d.execute_script(PROMPT))

            driver.find_element(By.CSS_SELECTOR, "form.login input").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "form.login button").click()
            wait_for(driver, lambda d: [c[0] for c in d.execute_script(CARDS)] == ["m1", "m2"], PAGE_WAIT_S)
            assert not driver.find_elements(By.CSS_SELECTOR, "form.login")
            assert driver.execute_script("return sessionStorage.getItem('pdm-status-token')") == TOKEN
            # The two refused requests are the only errors: no script error, no CSP violation.
            errors = console_errors(driver)
            assert len(errors) == 2 and all("status of 401" in e for e in errors), errors
    finally:
        agent.stop()
