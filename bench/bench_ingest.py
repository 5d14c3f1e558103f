"""Ingest benchmark: MQTT QoS 1 → validate → score → SQLite commit → ack, against a throwaway Mosquitto.

Run: python -m bench.bench_ingest [--quick] [--repeats N]   (writes the `ingest` section of BENCHMARKS.md)

Every process it starts (broker, bare subscriber, agent) listens or connects on 127.0.0.1 only and is stopped on
exit, error included. Each measurement gets a freshly restarted broker (no sessions left over), a new client id and,
for the agent, a new data directory. Commit times are observed from outside, without changing the agent: a thread
polls `SELECT max(id) FROM readings` on a read-only connection every POLL_S. Readings are committed in arrival
order with ids 1..N (all valid, no duplicates), so `max(id) >= k` means reading k is committed; the first poll that
sees it is an upper bound of its commit time, late by at most one poll interval.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack, nullcontext
from pathlib import Path

import requests

from bench.report import cpu_seconds, median_spread, write_section
from testkit.mqtt import Mosquitto, Publisher
from testkit.net import free_port

MACHINES = 20
T0 = 1_790_000_000
POLL_S = 0.002
RSS_EVERY_S = 0.1
PACED_RATE = 5000
LAG_KEEPS_UP_S = 0.1
SUBSCRIBER = """
import json, sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, n, client_id, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
times = []
def on_message(client, userdata, message):
    times.append(time.time())
    if len(times) == n:
        client.disconnect()
client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
client.on_connect = lambda c, *_: c.subscribe("pdm/+/telemetry", qos=1)
client.on_subscribe = lambda *_: print("ready", flush=True)
client.on_message = on_message
client.connect(host, port)
timer = threading.Timer(timeout, client.disconnect)
timer.daemon = True
timer.start()
client.loop_forever()
print(json.dumps({"received": len(times), "first": times[0] if times else 0, "last": times[-1] if times else 0}))
"""


def telemetry(n: int, seed: int, machines: int = MACHINES) -> tuple[list[tuple[str, str]], list[tuple[str, float]]]:
    """n default-format payloads round-robin over `machines` machines, unique ts per machine; and their (machine,
    ts)."""
    rng = random.Random(seed)
    messages, keys = [], []
    for i in range(n):
        machine, ts = f"m{i % machines:02d}", T0 + i // machines
        air = round(rng.gauss(300, 2), 1)
        body = {"ts": ts, "air_temperature": air, "process_temperature": round(air + rng.gauss(10, 1), 1),
                "rotational_speed": int(rng.gauss(1540, 150)), "torque": round(rng.gauss(40, 8), 1),
                "tool_wear": rng.randrange(250)}
        messages.append((f"pdm/{machine}/telemetry", json.dumps(body)))
        keys.append((machine, float(ts)))
    return messages, keys


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def publish(broker: Mosquitto, messages: list, rate: float | None = None) -> tuple[list[float], float]:
    """Publish at QoS 1; return each message's hand-off time and when the broker had acknowledged them all."""
    with Publisher(broker.url, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}") as publisher:
        publisher.publish_all(messages, qos=1, rate=rate, timeout=120)
        return publisher.published_at, time.time()


def publisher_alone(broker: Mosquitto, messages: list) -> float:
    """The publisher's own rate with nobody subscribed: first hand-off to the last PUBACK."""
    published_at, all_acked = publish(broker, messages)
    return len(messages) / (all_acked - published_at[0])


def bare_subscriber(broker: Mosquitto, messages: list, stack: ExitStack) -> dict:
    process = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, broker.host, str(broker.port), str(len(messages)),
         f"bench-sub-{uuid.uuid4().hex[:8]}", "120"], stdout=subprocess.PIPE, text=True)
    stack.callback(stop_process, process)
    if process.stdout.readline().strip() != "ready":
        raise RuntimeError("the bare subscriber did not subscribe")
    published_at, all_acked = publish(broker, messages)
    result = json.loads(process.stdout.readline())
    process.wait(10)
    if result["received"] != len(messages):
        raise RuntimeError(f"the bare subscriber received {result['received']} of {len(messages)}")
    n = len(messages)
    return {"received_rate": (n - 1) / (result["last"] - result["first"]),
            "end_to_end_rate": n / (result["last"] - published_at[0]),
            "publisher_rate": n / (all_acked - published_at[0]), "lag": result["last"] - all_acked}


class AgentProcess:
    """`pdm-edge run` in a subprocess on its own data dir and client id, with a commit poller and RSS sampler; its
    status API on a free loopback port (`status_url`)."""

    def __init__(self, broker: Mosquitto, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        self.db_path = workdir / "data" / "agent.db"
        self.log = workdir / "agent.log"
        config = workdir / "agent.toml"
        status_port = free_port()
        config.write_text("\n".join([
            'gateway_id = "bench"', f'data_dir = "{workdir / "data"}"', 'log_format = "json"', "[mqtt]",
            f'url = "{broker.url}"', f'client_id = "pdm-bench-{uuid.uuid4().hex[:8]}"',
            'default_machine_type = "M"', "[status]", f'bind = "127.0.0.1:{status_port}"']) + "\n")
        self.status_url = f"http://127.0.0.1:{status_port}"
        # No PDM_ variables, credentials or .env of ours: the agent sees only this config (cwd is the workdir).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PDM_") and k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}
        self.commits: list[tuple[float, float, int]] = []  # (previous poll, poll that saw it, max(id))
        self.rss_mb: list[float] = []
        self.anon_mb: list[float] = []  # the process's own memory (heap, Python objects, onnxruntime's buffers)
        self.file_mb: list[float] = []  # library pages mapped: how many depends on what the page cache holds
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_subscribed(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "subscribed to" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not subscribe:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self._poller.start()

    def wait_committed(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.commits or self.commits[-1][2] < n:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent committed {self.commits[-1][2] if self.commits else 0} of {n}")
            time.sleep(0.01)

    def commit_time(self, reading_id: int) -> float:
        """Upper bound of when reading `reading_id` was committed (the first poll that saw it)."""
        return self.commits[bisect.bisect_left(self.commits, reading_id, key=lambda c: c[2])][1]

    def rows(self) -> list[tuple[int, str, float, float]]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as db:
            assert db.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0, "readings were rejected"
            return db.execute("SELECT id, machine_id, ts, received_at FROM readings ORDER BY id").fetchall()

    def stop(self) -> None:
        self._stop.set()
        if self._poller.is_alive():
            self._poller.join()
        stop_process(self.process)

    def _poll(self) -> None:
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        status = Path(f"/proc/{self.process.pid}/status")
        previous, seen, next_rss = time.time(), 0, 0.0
        while not self._stop.is_set():
            count = db.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
            now = time.time()
            if count != seen:
                self.commits.append((previous, now, count))
                seen = count
            if now >= next_rss:
                kb = {line.split(":")[0]: int(line.split()[1]) for line in status.read_text().splitlines()
                      if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
                self.rss_mb.append(kb["VmRSS"] / 1024)
                self.anon_mb.append(kb["RssAnon"] / 1024)
                self.file_mb.append(kb["RssFile"] / 1024)
                next_rss = now + RSS_EVERY_S
            previous = now
            time.sleep(POLL_S)
        db.close()


def agent_flood(broker: Mosquitto, workdir: Path, messages: list, stack: ExitStack) -> dict:
    agent = AgentProcess(broker, workdir)
    stack.callback(agent.stop)
    agent.wait_subscribed()
    cpu_before = cpu_seconds(agent.process.pid)
    published_at, all_acked = publish(broker, messages)
    n = len(messages)
    agent.wait_committed(n)
    cpu_us = (cpu_seconds(agent.process.pid) - cpu_before) / n * 1e6
    last_commit = agent.commit_time(n)
    last_received = max(row[3] for row in agent.rows())
    agent.stop()
    return {"rate": n / (last_commit - published_at[0]), "received_rate": n / (last_received - published_at[0]),
            "publisher_rate": n / (all_acked - published_at[0]), "lag": last_commit - all_acked, "cpu_us": cpu_us}


def agent_paced(broker: Mosquitto, workdir: Path, messages: list, keys: list, stack: ExitStack,
                page: bool = False) -> dict:
    """With `page`, the status page is open meanwhile: loaded before the run, its overview refreshed every second
    (bench_status.PagePoller): the status API's app is made at its first request (agent/status/server.py)."""
    from bench.bench_status import PagePoller  # bench_status imports this module

    agent = AgentProcess(broker, workdir)
    stack.callback(agent.stop)
    agent.wait_subscribed()
    if page:
        requests.get(agent.status_url + "/", timeout=30).raise_for_status()
    with PagePoller(agent.status_url) if page else nullcontext():
        published_at, _ = publish(broker, messages, rate=PACED_RATE)
    agent.wait_committed(len(messages))
    rss, anon, mapped = agent.rss_mb[:], agent.anon_mb[:], agent.file_mb[:]
    rows = agent.rows()
    polls = [c[1] - c[0] for c in agent.commits]
    agent.stop()
    index = {key: i for i, key in enumerate(keys)}
    received, committed = [], []
    for reading_id, machine_id, ts, received_at in rows:
        sent = published_at[index[machine_id, ts]]
        received.append((received_at - sent) * 1000)
        committed.append((agent.commit_time(reading_id) - sent) * 1000)
    achieved = len(messages) / (published_at[-1] - published_at[0])
    return {"received_p50": percentile(received, 0.5), "received_p99": percentile(received, 0.99),
            "committed_p50": percentile(committed, 0.5), "committed_p99": percentile(committed, 0.99),
            "rss_median": statistics.median(rss), "rss_max": max(rss), "anon_median": statistics.median(anon),
            "file_median": statistics.median(mapped), "rate": achieved,
            "poll_ms": statistics.median(polls) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, 10,000 messages, 3 s paced")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    repeats = args.repeats or (1 if args.quick else 3)
    flood_n, paced_s = (10_000, 3) if args.quick else (50_000, 10)  # under paho's 65,535 message ids in flight
    flood, _ = telemetry(flood_n, seed=1)
    paced, paced_keys = telemetry(PACED_RATE * paced_s, seed=2)

    runs: dict[str, list[dict]] = {"alone": [], "bare": [], "flood": [], "paced": [], "paced_page": []}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, ExitStack() as stack:
        broker = Mosquitto.start(Path(tmp) / "broker")
        stack.callback(broker.stop)
        for r in range(repeats):
            broker.restart()
            runs["alone"].append({"rate": publisher_alone(broker, flood)})
            broker.restart()
            runs["bare"].append(bare_subscriber(broker, flood, stack))
            broker.restart()
            runs["flood"].append(agent_flood(broker, Path(tmp) / f"flood-{r}", flood, stack))
            broker.restart()
            for page in (r % 2 == 1, r % 2 == 0):  # alternate which goes first
                broker.restart()
                runs["paced_page" if page else "paced"].append(
                    agent_paced(broker, Path(tmp) / f"paced-{r}-{page}", paced, paced_keys, stack, page))
            print(f"run {r + 1}/{repeats}: " + json.dumps({k: v[-1] for k, v in runs.items()}, default=round),
                  file=sys.stderr)

    def figure(phase: str, key: str, fmt: str = "{:,.0f}") -> str:
        return median_spread([run[key] for run in runs[phase]], fmt)

    ratios = [f["rate"] / b["end_to_end_rate"] for f, b in zip(runs["flood"], runs["bare"])]
    rows = [
        ("publisher alone, QoS 1, nobody subscribed (first publish → last PUBACK)",
         figure("alone", "rate") + " msg/s", ""),
        ("bare paho subscriber, QoS 1 auto-ack: first → last received", figure("bare", "received_rate") + " msg/s", ""),
        ("bare paho subscriber: first publish → last received", figure("bare", "end_to_end_rate") + " msg/s", ""),
        ("publisher during the bare-subscriber run", figure("bare", "publisher_rate") + " msg/s", ""),
        ("agent: first publish → last commit (validated, scored, committed, acked)",
         figure("flood", "rate") + " readings/s", ""),
        ("agent: first publish → last received by the driver", figure("flood", "received_rate") + " readings/s", ""),
        ("publisher during the agent run", figure("flood", "publisher_rate") + " msg/s", ""),
        ("agent CPU per reading, all its threads (flood)", figure("flood", "cpu_us") + " µs", ""),
        ("agent / bare subscriber (first publish → last commit / last received)",
         median_spread(ratios, "{:.2f}"), "≥ 0.8"),
        ("last receive (bare) after the publisher's last PUBACK", figure("bare", "lag", "{:.2f}") + " s", ""),
        ("last commit (agent) after the publisher's last PUBACK", figure("flood", "lag", "{:.2f}") + " s", ""),
        (f"paced run: achieved publish rate (goal {PACED_RATE:,}/s)", figure("paced", "rate") + " msg/s", ""),
        ("latency publish → received by the driver, p50", figure("paced", "received_p50", "{:.1f}") + " ms", ""),
        ("latency publish → received by the driver, p99", figure("paced", "received_p99", "{:.1f}") + " ms",
         "≤ 250"),
        ("latency publish → committed (upper bound), p50", figure("paced", "committed_p50", "{:.1f}") + " ms", ""),
        ("latency publish → committed (upper bound), p99", figure("paced", "committed_p99", "{:.1f}") + " ms", ""),
        ("agent RSS during the paced run, median", figure("paced", "rss_median", "{:.1f}") + " MB", "≤ 100"),
        ("agent RSS during the paced run, max", figure("paced", "rss_max", "{:.1f}") + " MB", "≤ 100"),
        ("of the RSS, median: anonymous (the process's own) / file-backed (library pages mapped)",
         figure("paced", "anon_median", "{:.1f}") + " / " + figure("paced", "file_median", "{:.1f}") + " MB", ""),
        ("the same with the status page open (overview refreshed every second): RSS median / max",
         figure("paced_page", "rss_median", "{:.1f}") + " / " + figure("paced_page", "rss_max", "{:.1f}") + " MB", ""),
        ("the same with the status page open: latency publish → committed (upper bound), p99",
         figure("paced_page", "committed_p99", "{:.1f}") + " ms", ""),
    ]
    body = "| figure | median (min–max) | goal |\n|---|---|---|\n"
    body += "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    body += (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''}. Mosquitto on 127.0.0.1 (unlimited queues, restarted "
        f"before each measurement); MQTT 5, QoS 1; the agent's default config (MQTT driver with manual ack after "
        f"commit, batches of ≤ 500 or ≤ 100 ms, SQLite WAL with synchronous = FULL) and a new data dir each run. "
        f"Flood: {flood_n:,} default-format payloads on pdm/<machine>/telemetry, {MACHINES} machines, published as "
        f"fast as one paho Publisher can; publisher, broker and subscriber or agent share the machine's cores. "
        f"Paced: {PACED_RATE:,} msg/s for {paced_s} s. `received_at` is when the MQTT driver got the message "
        f"(time.time(), the clock of `Publisher.published_at`); the commit follows in the same batch. Commit time is "
        f"observed from outside by polling max(id) of the read-only SQLite file every {POLL_S * 1000:g} ms "
        f"(median interval achieved {figure('paced', 'poll_ms', '{:.1f}')} ms): an upper bound, late by at most one "
        f"interval. RSS is VmRSS of the agent process every {RSS_EVERY_S * 1000:g} ms during the paced run: its "
        f"anonymous part is the agent's own; its file-backed part is library code mapped (onnxruntime's 37 MB "
        f"library most), more when the page cache holds the libraries (a restart after an install or upgrade) "
        f"than after a reboot (about 100 against 111 MB on 2026-12-07), and the kernel reclaims it under memory "
        f"pressure. The "
        f"status API's app (FastAPI, routes, models) is made at its first request: in the plain paced run nothing "
        f"asked for it; with the page open, the page is loaded before the run and its overview (/api/v1/status, "
        f"/api/v1/machines) fetched every second during it, each run in turn first.")
    def limit(phase: str) -> str:
        lag = statistics.median(run["lag"] for run in runs[phase])
        return "the publisher" if lag < LAG_KEEPS_UP_S else "the receiver"

    body += (f"\n\nWhich side limits: with the bare subscriber, {limit('bare')}; with the agent, {limit('flood')} "
             f"(a receiver that finishes within {LAG_KEEPS_UP_S:g} s of the publisher's last PUBACK kept up with it).")
    command = "python -m bench.bench_ingest" + (" --quick" if args.quick else "")
    write_section("ingest", command, body, ("paho-mqtt", "onnxruntime", "numpy", "pydantic"))
    print(body)


if __name__ == "__main__":
    main()
