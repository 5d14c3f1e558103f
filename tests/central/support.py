"""Helpers for the central tests: settings, authorization headers, a real server process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from pydantic import SecretStr

from central.settings import Settings
from testkit.central import OPS_TOKEN
from testkit.net import LOCALHOST, free_port


def make_settings(url: str, **overrides) -> Settings:
    # No maintenance task and nothing past retention: the tests share one database holding days of any year, and
    # retention would drop other tests' old days (tests/central/test_partitions.py tests it on databases of its own).
    values = {"database_url": SecretStr(url), "ops_token": SecretStr(OPS_TOKEN), "db_timeout_s": 2.0,
              "pool_max_size": 4, "maintenance_interval_s": 0, "retain_summaries_days": 100 * 366,
              "retain_rollup_days": 100 * 366, **overrides}
    return Settings(**values)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


OPS = bearer(OPS_TOKEN)


BIN = Path(sys.executable).parent
PDM_CENTRAL = shutil.which("pdm-central", path=str(BIN)) or "pdm-central"
GUNICORN = shutil.which("gunicorn", path=str(BIN)) or "gunicorn"


def environment(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PDM_CENTRAL_")}
    env.update({"PDM_CENTRAL_DATABASE_URL": url, "PDM_CENTRAL_OPS_TOKEN": OPS_TOKEN, "PDM_CENTRAL_LOG_FORMAT": "json",
                "PDM_CENTRAL_MAINTENANCE_INTERVAL_S": "0", "PDM_CENTRAL_RETAIN_SUMMARIES_DAYS": "36600",
                "PDM_CENTRAL_RETAIN_ROLLUP_DAYS": "36600", **extra})
    return env


class Server:
    def __init__(self, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.base = f"http://{LOCALHOST}:{port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    @classmethod
    def central(cls, central_url: str, log: Path, port: int | None = None) -> Server:
        """`pdm-central serve` on the database at `central_url` (on `port`, else a free one), once /readyz answers."""
        port = port or free_port()
        server = cls([PDM_CENTRAL, "serve", "--port", str(port)], environment(central_url), port, log)
        server.wait_ready()
        return server

    def wait_ready(self, timeout: float = 30.0, path: str = "/readyz") -> None:
        """Until `path` answers 200 (/healthz: the process serves, whether or not the database is there)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if requests.get(self.base + path, timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the server was not ready within {timeout:g} s:\n{self.log.read_text()}")

    def terminate(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the server ignored SIGTERM for {timeout:g} s:\n{self.log.read_text()}")
