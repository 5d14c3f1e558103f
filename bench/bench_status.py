"""Status benchmark: the page's requests with 500 machines in the agent's store, and the agent's MQTT ingest rate
while the page is polled every second.

Run: python -m bench.bench_status [--quick] [--repeats N]   (writes the `status` section of BENCHMARKS.md)

Each measurement gets a freshly restarted throwaway Mosquitto and a fresh `pdm-edge run` (bench_ingest's
AgentProcess: its own data dir, client id and status port). Ingest: a flood of default-format payloads over 500
machines, published as fast as one paho Publisher can, rate = readings / (first publish → last commit), once with a
client that fetches what the page's script fetches at each refresh of its overview (/api/v1/status, then
/api/v1/machines) every second, once without; the order alternates between runs. Latency: after the unpolled flood,
with the agent idle and 500 machines in its store, sequential GETs on one keep-alive connection, each timed from
sending the request to the last byte of the response.
"""

from __future__ import annotations

import argparse
import json
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
from bench.report import median_spread, table, write_section
from tests.services import Mosquitto

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


def flood(broker: Mosquitto, workdir: Path, messages: list, stack: ExitStack, polled: bool) -> tuple[dict, str]:
    """The agent's ingest rate for `messages`, the page polled meanwhile or not; and its status URL, still up."""
    agent = AgentProcess(broker, workdir)
    stack.callback(agent.stop)
    agent.wait_subscribed()
    with PagePoller(agent.status_url) if polled else nullcontext() as poller:
        published_at, _ = publish(broker, messages)
        agent.wait_committed(len(messages))
    result = {"rate": len(messages) / (agent.commit_time(len(messages)) - published_at[0])}
    if poller is not None:
        result["refreshes"] = len(poller.refresh_ms)
        result["refresh_p50"] = percentile(poller.refresh_ms, 0.5)
        result["refresh_p99"] = percentile(poller.refresh_ms, 0.99)
    return result, agent.status_url


def latency(url: str, rounds: int) -> dict[str, float]:
    """p50 and p99 (ms) of each of ENDPOINTS, requested in turn `rounds` times after one warm-up round."""
    samples: dict[str, list[float]] = {path: [] for path in ENDPOINTS}
    with requests.Session() as session:
        machines = session.get(url + "/api/v1/machines", timeout=30).json()["machines"]
        if len(machines) != MACHINES:
            raise RuntimeError(f"the store holds {len(machines)} machines, not {MACHINES}")
        for round_ in range(rounds + 1):
            for path in ENDPOINTS:
                started = time.perf_counter()
                response = session.get(url + path, timeout=30)
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if round_:
                    samples[path].append(elapsed)
    return {f"{path} {q}": percentile(values, p) for path, values in samples.items()
            for q, p in (("p50", 0.5), ("p99", 0.99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, 10,000 messages, 100 rounds of requests")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    repeats = args.repeats or (1 if args.quick else 5)
    flood_n, rounds = (10_000, 100) if args.quick else (50_000, 300)  # under paho's 65,535 message ids in flight
    messages, _ = telemetry(flood_n, seed=3, machines=MACHINES)

    runs: dict[str, list[dict]] = {"quiet": [], "polled": [], "latency": []}
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp, ExitStack() as stack:
        broker = Mosquitto.start(Path(tmp) / "broker")
        stack.callback(broker.stop)
        for r in range(repeats):
            for polled in (r % 2 == 1, r % 2 == 0):  # alternate which goes first
                broker.restart()
                with ExitStack() as agent_stack:
                    result, url = flood(broker, Path(tmp) / f"{r}-{polled}", messages, agent_stack, polled)
                    runs["polled" if polled else "quiet"].append(result)
                    if not polled:
                        runs["latency"].append(latency(url, rounds))
            print(f"run {r + 1}/{repeats}: " + json.dumps({k: v[-1] for k, v in runs.items()}, default=round),
                  file=sys.stderr)

    def figure(phase: str, key: str, fmt: str = "{:.1f}") -> str:
        return median_spread([run[key] for run in runs[phase]], fmt)

    ratios = [p["rate"] / q["rate"] for p, q in zip(runs["polled"], runs["quiet"])]
    names = {"/api/v1/machines": f"GET /api/v1/machines ({MACHINES} machines, each with its trend)",
             "/": "GET / (the page)", "/api/v1/status": "GET /api/v1/status",
             DETAIL: "GET /api/v1/machines/{id}?history=300 (the detail view)",
             "/api/v1/events": "GET /api/v1/events", "/metrics": "GET /metrics"}
    rows = []
    for path in ("/api/v1/machines", "/"):  # the goal's rows first
        for q in ("p99", "p50"):
            rows.append((f"{names[path]}, {q}", figure("latency", f"{path} {q}") + " ms", "≤ 50" if q == "p99" else ""))
    for path in ENDPOINTS[2:]:
        rows += [(f"{names[path]}, {q}", figure("latency", f"{path} {q}") + " ms", "") for q in ("p50", "p99")]
    rows += [
        ("ingest, page not polled (first publish → last commit)", figure("quiet", "rate", "{:,.0f}") + " readings/s",
         ""),
        ("ingest, page polled every second", figure("polled", "rate", "{:,.0f}") + " readings/s", ""),
        ("ingest polled / not polled", median_spread(ratios, "{:.3f}"), "≥ 0.95"),
        ("page refresh (status + machines) during the flood, p50", figure("polled", "refresh_p50") + " ms", ""),
        ("page refresh (status + machines) during the flood, p99", figure("polled", "refresh_p99") + " ms", ""),
    ]
    body = table(rows) + (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''}. Each run: two floods of {flood_n:,} default-format "
        f"payloads over {MACHINES} machines (QoS 1, published as fast as one paho Publisher can, through a throwaway "
        f"Mosquitto restarted before each), each into a fresh `pdm-edge run` (default config, its status API on "
        f"127.0.0.1); during one of them a client fetches what the page fetches at each refresh of its overview "
        f"({' then '.join(PAGE_REFRESH)}) every {POLL_S:g} s, as the page would if it refreshed every second (it "
        f"refreshes every 5 s); the order alternates from run to run. Latency: after the unpolled flood, the agent "
        f"idle with {MACHINES} machines and {flood_n // MACHINES} readings each in its store, {rounds} rounds of "
        f"sequential GETs of each endpoint on one keep-alive connection (after a warm-up round), from sending the "
        f"request to the last byte; p50 and p99 per run, then their median and spread over the runs. The bench's "
        f"client and the broker share the machine's cores with the agent.")
    command = "python -m bench.bench_status" + (" --quick" if args.quick else "")
    write_section("status", command, body, ("fastapi", "uvicorn", "pydantic", "requests", "paho-mqtt"))
    print(body)


if __name__ == "__main__":
    main()
