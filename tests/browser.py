"""Headless Chromium for the page tests: Debian's chromium and chromium-driver, driven with Selenium.

The driver and browser are the system's (/usr/bin/chromedriver, /usr/bin/chromium): Selenium is given both paths, so
it never tries to download either. Screenshots go to ``artifacts/screenshots/`` at the repository root (or
``$PDM_TEST_ARTIFACTS``), where CI keeps them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("PDM_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PDM_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("PDM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))

# No background traffic: this machine's network is closed and Chromium would retry Google's hosts at every start.
_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
          "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars")


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def require_browser() -> None:
    """Fail (not skip) with the fix when the browser is missing: the page tests check what technicians and ops see,
    and scripts/test.sh installs both packages, so a missing one is a broken test machine, not an optional extra."""
    if not available():
        pytest.fail(f"the page tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install chromium chromium-driver (scripts/test.sh does it)", pytrace=False)


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[WebDriver]:
    """A fresh headless Chromium with an empty profile, closed on exit."""
    require_browser()
    profile = tempfile.mkdtemp(prefix="pdm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in _FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: WebDriver, condition, timeout: float = 15.0):
    """Wait until ``condition(driver)`` is truthy and return it (Selenium's explicit wait, no sleeps)."""
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the page as ``artifacts/screenshots/<name>.png`` and return the path."""
    folder = ARTIFACTS / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"Chromium could not save the screenshot {path}")
    return path


def console_errors(driver: WebDriver) -> list[str]:
    """Console messages at SEVERE level (script errors, CSP violations, failed requests)."""
    entries = driver.get_log("browser")  # type: ignore[attr-defined]  # Chromium's driver has it
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]


def retrying(driver: WebDriver, action, timeout: float = 15.0) -> None:
    """Run ``action(driver)`` until it does not meet a stale element: a page that redraws itself every few seconds may
    replace an element between finding it and using it."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt(d) -> bool:
        try:
            action(d)
            return True
        except StaleElementReferenceException:
            return False

    wait_for(driver, attempt, timeout)
