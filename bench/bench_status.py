"""Status benchmark: the page's requests with 500 machines in the agent's store, and the agent's MQTT ingest rate
while the page is polled every second.

Run: python -m bench.bench_status [--quick] [--repeats N]   (writes the `status` section of BENCHMARKS.md)

Each measurement gets a freshly restarted throwaway Mosquitto and a fresh `pdm-edge run` (bench_ingest's
AgentProcess: its own data dir, client id and status port). Ingest: a backlog of default-format payloads over 500
machines, published while the agent is paused (SIGSTOP, after it subscribed and its status API answered), drained
by the agent as fast as it can once it goes on (SIGCONT): rate = readings / (SIGCONT → last commit); once with a client that fetches what the page's script fetches at each refresh of its overview
(/api/v1/status, then /api/v1/machines) every second, once without; the order alternates between runs. A backlog,
not a live flood: the agent keeps up with one paho publisher, so a flood's rate would be the publisher's. Latency: after the unpolled flood,
with the agent idle and 500 machines in its store, sequential GETs on one keep-alive connection, each timed from
sending the request to the last byte of the response, and the agent's CPU time per request, which other work on a
shared machine inflates far less than the wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Self

import requests

from bench.bench_ingest import AgentProcess, percentile, publish, telemetry
from bench.report import cpu_seconds, median_spread, table, write_section
from testkit.mqtt import Mosquitto

MACHINES = 500
POLL_S = 1.0
PAGE_REFRESH = ("/api/v1/status", "/api/v1/machines")  # what agent/static/status.html fetches for its overview
DETAIL = "/api/v1/machines/m07?history=300"  # what the page fetches for a machine's detail view, besides the status
ENDPOINTS = ("/api/v1/machines", "/", "/api/v1/status", DETAIL, "/api/v1/events", "/metrics")


class PagePoller:
    """What the page does: every POLL_S, its refresh's requests in sequence, on one keep-alive connection; in a thread
    from `with` to its end. Keeps each refresh's duration."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.refresh_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-poller", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with requests.Session() as session:
            next_at = time.monotonic()
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                started = time.perf_counter()
                for path in PAGE_REFRESH:
                    session.get(self.url + path, timeout=30).raise_for_status()
                self.refresh_ms.append((time.perf_counter() - started) * 1000)
                next_at += POLL_S


def flood(broker: Mosquitto, workdir: Path, messages: list, stack: ExitStack,
          polled: bool) -> tuple[dict, AgentProcess]:
    """The agent's rate and CPU per reading draining `messages` queued for it, the page polled meanwhile or not; and
    the agent, still up."""
    agent = AgentProcess(broker, workdir)
    stack.callback(agent.stop)
    agent.wait_subscribed()
    # The status API loads at its first request (agent/status/server.py OnFirstUse): made before the window in both
    # runs, so this compares the cost of polling, not the one-time load (the startup section's spawn → /readyz has it).
    requests.get(f"{agent.status_url}/api/v1/status", timeout=30).raise_for_status()
    os.kill(agent.process.pid, signal.SIGSTOP)  # the backlog builds up at the broker and in the agent's socket
    try:
        publish(broker, messages)
    finally:
        started, cpu_before = time.time(), cpu_seconds(agent.process.pid)
        os.kill(agent.process.pid, signal.SIGCONT)
    with PagePoller(agent.status_url) if polled else nullcontext() as poller:
        agent.wait_committed(len(messages))
    result = {"rate": len(messages) / (agent.commit_time(len(messages)) - started),
              "cpu_us": (cpu_seconds(agent.process.pid) - cpu_before) / len(messages) * 1e6}
    if poller is not None:
        result["refreshes"] = len(poller.refresh_ms)
        result["refresh_p50"] = percentile(poller.refresh_ms, 0.5)
        result["refresh_p99"] = percentile(poller.refresh_ms, 0.99)
    return result, agent


def latency(agent: AgentProcess, rounds: int) -> dict[str, float]:
    """For each of ENDPOINTS, `rounds` requests in a row after one to warm up: p50 and p99 (ms), and the agent's
    CPU time per request (ms), which other work on the machine does not inflate as it does the wall-clock times."""
    figures = {}
    with requests.Session() as session:
        machines = session.get(agent.status_url + "/api/v1/machines", timeout=30).json()["machines"]
        if len(machines) != MACHINES:
            raise RuntimeError(f"the store holds {len(machines)} machines, not {MACHINES}")
        for path in ENDPOINTS:
            session.get(agent.status_url + path, timeout=30).raise_for_status()
            samples, cpu_before = [], cpu_seconds(agent.process.pid)
            for _ in range(rounds):
                started = time.perf_counter()
                response = session.get(agent.status_url + path, timeout=30)
                samples.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            figures[f"{path} cpu"] = (cpu_seconds(agent.process.pid) - cpu_before) / rounds * 1000
            figures[f"{path} p50"], figures[f"{path} p99"] = percentile(samples, 0.5), percentile(samples, 0.99)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, 10,000 messages, 100 requests of each")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    repeats = args.repeats or (1 if args.quick else 7)
    flood_n, rounds = (10_000, 100) if args.quick else (50_000, 300)  # under paho's 65,535 message ids in flight
    messages, _ = telemetry(flood_n, seed=3, machines=MACHINES)

    runs: dict[str, list[dict]] = {"quiet": [], "polled": [], "latency": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp, ExitStack() as stack:
        broker = Mosquitto.start(Path(tmp) / "broker")
        stack.callback(broker.stop)
        for r in range(repeats):
            for polled in (r % 2 == 1, r % 2 == 0):  # alternate which goes first
                broker.restart()
                with ExitStack() as agent_stack:
                    result, agent = flood(broker, Path(tmp) / f"{r}-{polled}", messages, agent_stack, polled)
                    runs["polled" if polled else "quiet"].append(result)
                    if not polled:
                        runs["latency"].append(latency(agent, rounds))
            print(f"run {r + 1}/{repeats}: " + json.dumps({k: v[-1] for k, v in runs.items()}, default=round),
                  file=sys.stderr)

    load_after = os.getloadavg()[0]

    def figure(phase: str, key: str, fmt: str = "{:.1f}") -> str:
        return median_spread([run[key] for run in runs[phase]], fmt)

    ratios = [p["rate"] / q["rate"] for p, q in zip(runs["polled"], runs["quiet"])]
    cpu_ratios = [q["cpu_us"] / p["cpu_us"] for p, q in zip(runs["polled"], runs["quiet"])]
    names = {"/api/v1/machines": f"GET /api/v1/machines ({MACHINES} machines, each with its trend)",
             "/": "GET / (the page)", "/api/v1/status": "GET /api/v1/status",
             DETAIL: "GET /api/v1/machines/{id}?history=300 (the detail view)",
             "/api/v1/events": "GET /api/v1/events", "/metrics": "GET /metrics"}
    rows = []
    for path in ENDPOINTS:  # /api/v1/machines first: the suite's goal row is the first p99
        goal = "≤ 50" if path in ("/api/v1/machines", "/") else ""
        rows += [(f"{names[path]}, p99", figure("latency", f"{path} p99") + " ms", goal),
                 (f"{names[path]}, p50", figure("latency", f"{path} p50") + " ms", ""),
                 (f"{names[path]}, agent CPU per request", figure("latency", f"{path} cpu") + " ms", "")]
    rows += [
        ("ingest, page not polled (a backlog drained: SIGCONT → last commit)", figure("quiet", "rate", "{:,.0f}") + " readings/s",
         ""),
        ("ingest, page polled every second", figure("polled", "rate", "{:,.0f}") + " readings/s", ""),
        ("ingest polled / not polled", median_spread(ratios, "{:.3f}"), "≥ 0.95"),
        ("agent CPU per reading, page not polled", figure("quiet", "cpu_us") + " µs", ""),
        ("agent CPU per reading, page polled every second", figure("polled", "cpu_us") + " µs", ""),
        ("ingest polled / not polled from CPU per reading (not polled / polled)", median_spread(cpu_ratios, "{:.3f}"),
         "≥ 0.95"),
        ("page refresh (status + machines) during the flood, p50", figure("polled", "refresh_p50") + " ms", ""),
        ("page refresh (status + machines) during the flood, p99", figure("polled", "refresh_p99") + " ms", ""),
    ]
    body = table(rows) + (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''}. Each run: two backlogs of {flood_n:,} default-format "
        f"payloads over {MACHINES} machines (QoS 1, through a throwaway Mosquitto restarted before each), each "
        f"published while a fresh `pdm-edge run` (default config, its status API on 127.0.0.1, already answering) is "
        f"paused by SIGSTOP, then drained by it as fast as it can from SIGCONT to its last commit: the rate is the "
        f"agent's, not a publisher's (the agent keeps up with one paho publisher); during one of them a client "
        f"fetches what the page fetches at each refresh of its overview "
        f"({' then '.join(PAGE_REFRESH)}) every {POLL_S:g} s, as the page would if it refreshed every second (it "
        f"refreshes every 5 s); the order alternates from run to run. Latency: after the unpolled flood, the agent "
        f"idle with {MACHINES} machines and {flood_n // MACHINES} readings each in its store, {rounds} sequential "
        f"GETs of each endpoint in turn on one keep-alive connection (after a warm-up request), from sending the "
        f"request to the last byte; p50 and p99 per run, then their median and spread over the runs; the agent's CPU "
        f"time (user + system, /proc) over each endpoint's requests, divided by their number. CPU per reading: the "
        f"agent's CPU time from SIGCONT to the last commit, divided by the readings. The bench's "
        f"client and the broker share the machine's cores with the agent; load average (1 min) {load_before:.1f} "
        f"before and {load_after:.1f} after the runs, so other work shared them too: the p99s carry its stalls.")
    command = "python -m bench.bench_status" + (" --quick" if args.quick else "")
    write_section("status", command, body, ("fastapi", "uvicorn", "pydantic", "requests", "paho-mqtt"))
    print(body)


if __name__ == "__main__":
    main()
