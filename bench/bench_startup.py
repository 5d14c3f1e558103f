"""Start-up benchmark: from spawning `pdm-edge run` to ready (sd_notify READY=1 and /readyz 200), and the agent's
steady RSS against a bare `import onnxruntime` plus the model.

Run: python -m bench.bench_startup [--quick] [--repeats N]   (writes the `startup` section of BENCHMARKS.md)

Each run: a new data dir, the default config plus a throwaway Mosquitto for the MQTT driver and the status API on a
free loopback port; NOTIFY_SOCKET points at a datagram socket of ours, as systemd's would (Type=notify), so READY=1
is timed exactly; /readyz is polled every 10 ms in parallel. Steady RSS: VmRSS of the idle agent 2 s after ready.
Bare: a Python process that imports onnxruntime and loads the same ONNX file in an InferenceSession (what any agent
scoring this model must hold), measured the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import requests

from bench.bench_ingest import stop_process
from bench.report import median_spread, table, write_section
from testkit.mqtt import Mosquitto
from testkit.net import free_port

GOAL_S = 1.5
SETTLE_S = 2.0
BARE = """
import onnxruntime as ort
from model.package import SHIPPED, Manifest
options = ort.SessionOptions()
options.intra_op_num_threads = 1
manifest = Manifest.load(SHIPPED)
session = ort.InferenceSession(str(SHIPPED / manifest.onnx.file), options, providers=["CPUExecutionProvider"])
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))
"""


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")) / 1024


def command() -> list[str]:
    """`pdm-edge` of this environment, as a service manager would start it."""
    script = Path(sys.executable).parent / "pdm-edge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def start_once(broker: Mosquitto, workdir: Path) -> dict:
    workdir.mkdir(parents=True)
    port = free_port()
    config = workdir / "agent.toml"
    config.write_text("\n".join([
        'gateway_id = "bench"', f'data_dir = "{workdir / "data"}"', 'log_format = "json"', "[mqtt]",
        f'url = "{broker.url}"', f'client_id = "pdm-bench-{uuid.uuid4().hex[:8]}"', "[status]",
        f'bind = "127.0.0.1:{port}"']) + "\n")
    notify_path = Path(tempfile.mkdtemp(prefix="pdm-notify-")) / "notify"  # short: AF_UNIX paths are ≤ 107 bytes
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PDM_") and k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}
    env["NOTIFY_SOCKET"] = str(notify_path)
    readyz: list[float] = []
    process = None
    try:
        with (workdir / "agent.log").open("w") as log:
            start = time.perf_counter()
            process = subprocess.Popen([*command(), "run", "--config", str(config)], cwd=workdir, env=env,
                                       stdout=log, stderr=subprocess.STDOUT)

        def poll_readyz() -> None:
            session = requests.Session()
            while process.poll() is None and time.perf_counter() - start < 60:
                try:
                    if session.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        readyz.append(time.perf_counter() - start)
                        return
                except requests.ConnectionError:
                    pass
                time.sleep(0.01)

        poller = threading.Thread(target=poll_readyz, daemon=True)
        poller.start()
        notify.settimeout(60)
        ready = None
        while ready is None:
            message = notify.recv(4096).decode()
            if "READY=1" in message.split("\n"):
                ready = time.perf_counter() - start
        poller.join(60)
        if not readyz:
            raise RuntimeError(f"/readyz never answered 200:\n{(workdir / 'agent.log').read_text()[-2000:]}")
        time.sleep(SETTLE_S)
        return {"ready": ready, "readyz": readyz[0], "rss": rss_mb(process.pid)}
    except (TimeoutError, OSError) as exc:
        raise RuntimeError(f"the agent was not ready: {exc}\n{(workdir / 'agent.log').read_text()[-2000:]}") from exc
    finally:
        if process is not None:
            stop_process(process)
        notify.close()
        shutil.rmtree(notify_path.parent, ignore_errors=True)


def bare_rss() -> float:
    out = subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    repeats = args.repeats or (2 if args.quick else 5)
    runs, bare = [], []
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp, ExitStack() as stack:
        broker = Mosquitto.start(Path(tmp) / "broker")
        stack.callback(broker.stop)
        start_once(broker, Path(tmp) / "warm-up")  # the page cache holds the libraries, as after a first boot
        for r in range(repeats):
            runs.append(start_once(broker, Path(tmp) / f"run-{r}"))
            bare.append(bare_rss())
            print(f"run {r + 1}/{repeats}: {runs[-1]}, bare {bare[-1]:.1f} MB", file=sys.stderr)

    def figure(key: str, fmt: str) -> str:
        return median_spread([run[key] for run in runs], fmt)

    ratios = [run["rss"] / b for run, b in zip(runs, bare, strict=True)]
    body = table([
        ("start-up to ready (spawn → sd_notify READY=1)", figure("ready", "{:.2f}") + " s", f"≤ {GOAL_S}"),
        ("spawn → /readyz 200", figure("readyz", "{:.2f}") + " s", ""),
        (f"agent RSS, idle, {SETTLE_S:g} s after ready", figure("rss", "{:.1f}") + " MB", ""),
        ("bare: import onnxruntime + InferenceSession of the model", median_spread(bare, "{:.1f}") + " MB", ""),
        ("agent RSS / bare", median_spread(ratios, "{:.2f}"), ""),
    ]) + (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''} after one warm-up start (libraries in the page "
        f"cache). `{' '.join(Path(c).name for c in command())} run` with the default config, a throwaway Mosquitto "
        "for its MQTT driver, a new data dir each run (the SQLite buffer is created and migrated), NOTIFY_SOCKET set "
        "as systemd sets it for Type=notify: READY=1 is sent once the model is loaded, the store open, the drivers "
        "and the status API started. Polling /readyz makes the status API's app (it is made at the first request "
        "that needs one; agent/status/server.py), so this idle RSS is with the API in use. The agent's RSS under "
        "load, with the page open and without, is in the ingest section.")
    write_section("startup", "python -m bench.bench_startup" + (" --quick" if args.quick else ""), body,
                  ("onnxruntime", "fastapi", "uvicorn", "paho-mqtt"))
    print(body)


if __name__ == "__main__":
    main()
