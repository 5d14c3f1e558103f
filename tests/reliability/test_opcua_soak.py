"""OPC UA soak: `pdm-edge run` with one `[[opcua]]` server whose 5 machines change 5 times a second, the server
restarted every RESTART_EVERY_S; the agent process sampled from /proc. After a warm-up, RSS, file descriptors and
threads stay flat (growth under 5 %), no log line is at error level, every change is stored at most once and the
readings resume after every restart. Short: 60 s with a restart every 15 s; PDM_RELIABILITY=long: 10 minutes with a
restart every minute. Figures in artifacts/reliability/opcua-soak-<short|long>.json.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("asyncua", reason="the opcua extra: pip install 'pdm-edge[opcua]'")

from drivers.simulator import INPUTS
from testkit.net import free_port
from testkit.opcua import OpcuaServers
from tests.reliability.plant import LEVEL, growth, process_figures
from tests.scale import LONG, scaled

DURATION_S = scaled(40, 600)
RESTART_EVERY_S = scaled(10, 60)
WARM_UP_S = scaled(10, 60)
MACHINES = {f"m{i}": "LMH"[i % 3] for i in range(1, 6)}
ARTIFACT = Path(__file__).resolve().parents[2] / "artifacts" / "reliability" / \
    f"opcua-soak-{'long' if LONG else 'short'}.json"


def stored(db_path: Path) -> list[tuple[str, float]]:
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            rows = db.execute('SELECT machine_id, "values" FROM readings').fetchall()
    except sqlite3.OperationalError:
        return []
    return [(machine, json.loads(values)["tool_wear"]) for machine, values in rows]


def error_lines(log: Path) -> list[dict]:
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [e for e in entries if e.get("level") in ("error", "critical")]


@pytest.mark.timeout(DURATION_S + 600)
def test_opcua_soak_with_server_restarts_stays_flat_and_stores_each_change_once(tmp_path):
    data, log, config = tmp_path / "data", tmp_path / "agent.log", tmp_path / "agent.toml"
    with OpcuaServers() as servers:
        port = servers.serve(MACHINES)
        lines = ['gateway_id = "soak"', f'data_dir = "{data}"', 'log_format = "json"', "[status]",
                 f'bind = "127.0.0.1:{free_port()}"', "[[opcua]]", f'url = "opc.tcp://127.0.0.1:{port}"',
                 'name = "plc"', "sampling_ms = 100", "backoff_max_s = 2.0"]
        for machine, machine_type in MACHINES.items():
            lines += ["[[opcua.machines]]", f'machine_id = "{machine}"', f'machine_type = "{machine_type}"',
                      "[opcua.machines.nodes]", *(f'{name} = "ns=2;s={machine}.{name}"' for name in INPUTS)]
        config.write_text("\n".join(lines) + "\n")
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                       stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        samples: list[dict] = []
        restarts = 0
        try:
            start = time.monotonic()
            next_restart = start + RESTART_EVERY_S
            n = 0
            while (now := time.monotonic()) - start < DURATION_S:
                assert process.poll() is None, log.read_text()[-2000:]
                if now >= next_restart:
                    servers.stop(port)
                    time.sleep(1.0)
                    servers.serve(MACHINES, port=port, keep=True)
                    restarts += 1
                    next_restart = now + RESTART_EVERY_S
                n += 1
                for machine in MACHINES:
                    servers.write(port, machine, {"tool_wear": float(n % 250) + n // 250 * 0.001})
                if now - start >= WARM_UP_S and (not samples or now - samples[-1]["t"] >= 1.0):
                    samples.append({"t": now, **process_figures(process.pid)})
                time.sleep(0.2)
            last = float(n % 250) + n // 250 * 0.001
            deadline = time.monotonic() + 60
            while not all((m, last) in set(stored(data / "agent.db")) for m in MACHINES):
                assert time.monotonic() < deadline, "the last values were not stored after the last restart"
                time.sleep(0.2)
        finally:
            process.terminate()
            exit_code = process.wait(60)
    rows = stored(data / "agent.db")
    twice = [key for key, count in Counter(rows).items() if count > 1]
    figures = {"duration_s": DURATION_S, "restarts": restarts, "values_written": n, "readings": len(rows),
               **{key: growth(samples, key, level) for key, level in LEVEL.items()}, "samples": len(samples)}
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
    assert exit_code == 0
    assert twice == []
    assert restarts >= DURATION_S // RESTART_EVERY_S - 1
    assert figures["rss_kb"][2] < 0.05 and figures["fds"][1] <= figures["fds"][0] + 2
    assert figures["threads"][1] <= figures["threads"][0]
    assert error_lines(log) == []
