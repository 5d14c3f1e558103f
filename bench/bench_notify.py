"""Notification benchmark (issue 18): from an ingest carrying an alarm event to the webhook receiver's request, and
what notifications cost the ingest.

Run: python -m bench.bench_notify [--quick] [--repeats N]   (writes the `notify` section of BENCHMARKS.md)

PostgreSQL as in bench_central (a new database, dropped at the end). Two `pdm-central serve` processes on it, each a
uvicorn process on 127.0.0.1: "on" with PDM_CENTRAL_NOTIFY_CONFIG (one webhook channel to a real HTTP receiver, a
process of its own that checks each request's signature and reports when it arrived; one route for every gateway from
warning, digest_after at its maximum so that every transition is sent on its own), "off" without it. As in
production, "on" runs with PDM_CENTRAL_NOTIFY_WORKER=off and one `pdm-central notify` process delivers (its CPU is
reported on its own line).
  - latency: 200 times (30 with --quick), one after another, a batch with one summary and one event ok -> alarm
    of a new machine (so one new episode, one delivery) posted to "on"; the time from just before the POST to the
    receiver's request for that machine; p50 and p99; goal p99 <= 2 s. Also the ingest's own answer time.
  - throughput: the same batches (BATCH summaries of 50 machines with --events alarm events each, every one an
    episode opening or closing, so one delivery each; by default 4: each machine leaves or returns to ok every 2 h
    and every transition is sent, a bad day) posted one after another by one client, gzipped and built before the
    clock starts, to "on" and to "off" in turn, each run on a new gateway; the pairs alternate which goes first to
    cancel drift. Rate = summaries / (first POST -> last answer). After each "on" run, the bench waits for every
    delivery to reach the receiver and the outbox to be empty of pending rows, so a run never pays for the one
    before it; the API's and the notifier's CPU per batch (/proc) run to that point. Goal: on / off >= 0.9.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import hmac
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import psycopg
import requests

from bench.bench_central import add_gateway, bench_database, start_server
from bench.report import cpu_seconds, median_spread, table, write_section
from central.notify.outbox import LISTENER
from testkit import batches
from testkit.net import LOCALHOST

SECRET = "whsec-bench-3c9e1a7f5b2d4e6a8c0f"
LIMIT_MS = 2000.0  # issue 18: p99 from the ingest to the receiver's request
BATCH = 500  # summaries per batch: the agent's default batch size, as bench_central
MACHINES = 50
EVENTS = 4  # alarm events per batch by default (--events): each an episode opening (ok -> alarm) or closing (-> ok)
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
QUICK = ("Quick figures (--quick: 30 alarms, 2 short pairs of ingest runs), to be rerun without --quick on a quiet "
         "machine. ")
WAIT_S = 60.0  # for a delivery that should come: far past any goal, so a lost one fails the bench, not a figure


def now() -> float:
    """CLOCK_MONOTONIC: one clock for the whole machine, so the receiver's process and this one compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass(frozen=True)
class Arrival:
    at: float  # now() when the receiver had the request's headers
    delivery: str
    gateway: str
    machine: str
    transition: str
    valid: bool  # X-PDM-Signature matched


def serve_receiver(secret: bytes) -> None:
    """The receiver's process (`--receiver`): its port on the first line of stdout, then one JSON line per request;
    each answered 200 at once."""
    out = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver would

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            at = now()
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            expected = "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()
            body = json.loads(raw)
            episode = body.get("episode", {})
            line = json.dumps([at, self.headers["X-PDM-Delivery"], str(episode.get("gateway")),
                               str(episode.get("machine_id")), str(body.get("transition")),
                               hmac.compare_digest(expected, self.headers.get("X-PDM-Signature", ""))])
            with out:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

    server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Receiver:
    """The webhook receiver, in a process of its own (`--receiver`), as a real one would be on another machine: its
    work does not take this process's GIL from the client. Keeps each delivery's first arrival (a repeat of a
    delivery id is counted, not kept)."""

    def __init__(self, secret: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "bench.bench_notify", "--receiver"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(secret + "\n")
        self.process.stdin.close()
        self.url = f"http://{LOCALHOST}:{int(self.process.stdout.readline())}/hook"
        self.arrivals: dict[str, Arrival] = {}
        self.repeats = 0
        self.bad_signatures = 0
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(self.process.stdout,), name="receiver-reader",
                                       daemon=True)
        self.thread.start()

    def _read(self, lines: IO[str]) -> None:
        for line in lines:
            arrival = Arrival(*json.loads(line))
            with self.changed:
                self.bad_signatures += not arrival.valid
                if arrival.delivery in self.arrivals:
                    self.repeats += 1
                else:
                    self.arrivals[arrival.delivery] = arrival
                self.changed.notify_all()

    def wait_for(self, gateway: str, count: int, timeout: float = WAIT_S) -> list[Arrival]:
        """The first `count` deliveries of `gateway`'s episodes, once they have all arrived."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(found := [a for a in self.arrivals.values() if a.gateway == gateway]) < count:
                if not self.changed.wait(deadline - time.monotonic()):
                    raise RuntimeError(f"{len(found)} of {count} deliveries for {gateway} within {timeout:g} s")
            return found

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def write_config(folder: Path, url: str) -> Path:
    secret = folder / "webhook-secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    config = folder / "notify.toml"
    config.write_text(f'[channels.bench-hook]\ntype = "webhook"\nurl = "{url}"\nsecret_file = "{secret}"\n'
                      'timeout_s = 10\n\n[[routes]]\nname = "everything"\nfrom_state = "warning"\n'
                      'channels = ["bench-hook"]\ndigest_after = 100000\n')
    return config


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with 30 samples, p99 is the largest."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def gzipped(document: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(document).encode(), 5)


class Client:
    """One gateway posting gzipped batches on one keep-alive connection."""

    def __init__(self, base: str, token: str) -> None:
        self.url = base + "/api/v1/ingest"
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                     "Content-Encoding": "gzip"})

    def post(self, body: bytes) -> dict[str, Any]:
        response = self.session.post(self.url, data=body, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"central answered {response.status_code}: {response.text[:300]}")
        result: dict[str, Any] = response.json()
        return result

    def close(self) -> None:
        self.session.close()


def latency_batch(gateway: str, i: int) -> bytes:
    machine = f"lat-{i:04d}"
    return gzipped(batches.batch(gateway, summaries=[batches.summary(gateway, machine, i, state="alarm",
                                                                     p_failure_max=0.41, t0=T0)],
                                 events=[batches.event(gateway, machine, i, to_state="alarm", t0=T0)]))


def measure_latency(url: str, base: str, receiver: Receiver, n: int) -> tuple[list[float], list[float]]:
    """(ms from just before each POST to the receiver's request, ms from just before each POST to its answer)."""
    name = f"lat-{uuid.uuid4().hex[:8]}"
    _, token = add_gateway(url, name)
    bodies = [latency_batch(name, i) for i in range(n)]
    client, pause = Client(base, token), random.Random(18)
    latencies, answers = [], []
    try:
        for i, body in enumerate(bodies):
            started = now()
            result = client.post(body)
            answered = now()
            if result["accepted"]["events"] != 1:
                raise RuntimeError(f"batch {i}: {result}")
            [arrival] = [a for a in receiver.wait_for(name, i + 1) if a.machine == f"lat-{i:04d}"]
            if arrival.transition != "opened":
                raise RuntimeError(f"batch {i}: the receiver got {arrival.transition!r}, not 'opened'")
            latencies.append((arrival.at - started) * 1000)
            answers.append((answered - started) * 1000)
            time.sleep(pause.uniform(0.02, 0.1))  # the next alarm finds the worker idle, at no fixed phase
    finally:
        client.close()
    return latencies, answers


def throughput_bodies(gateway: str, count: int, per_batch: int) -> tuple[list[bytes], int]:
    """`count` batches of BATCH summaries (MACHINES machines, BATCH // MACHINES minutes each) with `per_batch` alarm
    events, each one machine's next transition (ok -> alarm, then alarm -> ok): the gzipped bodies, the events."""
    minutes = BATCH // MACHINES
    state = ["ok"] * MACHINES
    bodies, events = [], 0
    for k in range(count):
        first = k * minutes
        rows = [batches.summary(gateway, f"m-{m:03d}", first + w, t0=T0) for m in range(MACHINES)
                for w in range(minutes)]
        items = []
        for j in range(per_batch):
            m = (k * per_batch + j) % MACHINES
            to_state = "alarm" if state[m] == "ok" else "ok"
            items.append(batches.event(gateway, f"m-{m:03d}", first + j % minutes, to_state=to_state,
                                       from_state=state[m], t0=T0))
            state[m] = to_state
        events += len(items)
        bodies.append(gzipped(batches.batch(gateway, summaries=rows, events=items)))
    return bodies, events


def pending(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM notify_outbox WHERE state IN ('pending', 'held')").fetchone()
        return int(row[0]) if row else 0


def drain(url: str, timeout: float = WAIT_S) -> None:
    """Until the outbox has nothing left to send."""
    deadline = time.monotonic() + timeout
    while (left := pending(url)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        raise RuntimeError(f"{left} deliveries still pending after {timeout:g} s")


def backends(url: str) -> list[int]:
    """The PostgreSQL backends serving the bench's database (the servers', the notifier's), not this query's."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid()").fetchall()
    return [int(row[0]) for row in rows]


def backends_cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each backend still there (one that ended is left out of both ends of a run)."""
    found = {}
    for pid in pids:
        try:
            found[pid] = cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def backends_cpu_since(url: str, before: dict[int, float]) -> float:
    """CPU seconds the database's backends used since `before` (a backend started meanwhile counts from 0)."""
    after = backends_cpu(backends(url))
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


@dataclass(frozen=True)
class Run:
    rate: float  # summaries/s, first POST -> last answer
    cpu_ms: float  # the API process's CPU per batch
    notifier_cpu_ms: float  # the notifier process's CPU per batch (0 with notifications off)
    postgres_cpu_ms: float  # the database's backends' CPU per batch (the API's, the notifier's, the bench's drain)
    receiver_cpu_ms: float  # the webhook receiver's CPU per batch: the bench's, on the same 2 cores (0 when off)
    lag_ms: float | None  # the last delivery's arrival after the last answer (notifications on)


def ingest_run(url: str, server: tuple[int, str], count: int, per_batch: int, receiver: Receiver | None,
               notifier: int | None = None) -> Run:
    """One run of `count` batches on a new gateway to `server` (pid, base URL); `notifier`: its process id."""
    name = f"tp-{uuid.uuid4().hex[:8]}"
    _, token = add_gateway(url, name)
    bodies, events = throughput_bodies(name, count, per_batch)
    pid, base = server
    client = Client(base, token)
    try:
        accepted = 0
        postgres = backends_cpu(backends(url))
        cpu = cpu_seconds(pid)
        notifier_cpu = cpu_seconds(notifier) if notifier else 0.0
        receiver_cpu = cpu_seconds(receiver.process.pid) if receiver else 0.0
        started = now()
        for body in bodies:
            accepted += client.post(body)["accepted"]["events"]
        elapsed = now() - started
        ended = started + elapsed
    finally:
        client.close()
    if accepted != events:
        raise RuntimeError(f"{name}: {accepted} events accepted of {events}")
    lag = None
    if receiver is not None:
        arrivals = receiver.wait_for(name, events)
        if len(arrivals) != events:
            raise RuntimeError(f"{name}: {len(arrivals)} deliveries for {events} transitions")
        lag = max(0.0, (max(a.at for a in arrivals) - ended) * 1000)
        drain(url)
    notifier_ms = (cpu_seconds(notifier) - notifier_cpu) / count * 1000 if notifier else 0.0
    api_ms = (cpu_seconds(pid) - cpu) / count * 1000
    receiver_ms = (cpu_seconds(receiver.process.pid) - receiver_cpu) / count * 1000 if receiver else 0.0
    return Run(count * BATCH / elapsed, api_ms, notifier_ms, backends_cpu_since(url, postgres) / count * 1000,
               receiver_ms, lag)


def warm_up(url: str, base: str, receiver: Receiver | None, count: int, per_batch: int) -> None:
    """The first and the last batch of a run's range: its partitions exist, the code paths are warm."""
    name = f"warm-{uuid.uuid4().hex[:8]}"
    _, token = add_gateway(url, name)
    bodies, _ = throughput_bodies(name, count, per_batch)
    client = Client(base, token)
    try:
        for body in (bodies[0], bodies[-1]):
            client.post(body)
    finally:
        client.close()
    if receiver is not None:
        # The first batch's events all open episodes; the last one's may close episodes this gateway never opened
        # (100 batches: they do), which send nothing: so the outbox, not a count, says when the warm-up is over.
        receiver.wait_for(name, per_batch)
        drain(url)


def outbox_summary(url: str) -> tuple[int, int, int]:
    """(deliveries, delivered, sent more than once) in the outbox."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*), count(*) FILTER (WHERE state = 'delivered'), "
                           "count(*) FILTER (WHERE attempts > 1) FROM notify_outbox").fetchone()
    return (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)


def start_notifier(url: str, workdir: Path, config: Path) -> subprocess.Popen[bytes]:
    """`pdm-central notify` on `url`, as bench_central.start_server starts the API; once it listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDM_CENTRAL_")}
    env.update({"PDM_CENTRAL_DATABASE_URL": url, "PDM_CENTRAL_LOG_LEVEL": "WARNING",
                "PDM_CENTRAL_NOTIFY_CONFIG": str(config)})
    log = (workdir / "notify.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "central.cli", "notify"], env=env, stdout=log, stderr=log,
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pdm-central notify exited: {(workdir / 'notify.log').read_text()}")
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                               [LISTENER]).fetchone()
        if row and row[0]:
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("pdm-central notify did not listen within 30 s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 alarms, 2 pairs of short ingest runs")
    parser.add_argument("--repeats", type=int, help="pairs of ingest runs (on, off): 5, 2 with --quick")
    parser.add_argument("--events", type=int, default=EVENTS, help=f"alarm events per batch ({EVENTS})")
    parser.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        serve_receiver(sys.stdin.readline().strip().encode())
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    n = 30 if args.quick else 200
    repeats = args.repeats or (2 if args.quick else 5)
    count = 30 if args.quick else 100  # batches per ingest run
    runs: dict[str, list[Run]] = {"on": [], "off": []}
    load = os.getloadavg()
    with ExitStack() as stack:
        url, where = bench_database(stack, prefix="pdm_bench_notify")
        with psycopg.connect(url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            fsync = conn.execute("SHOW fsync").fetchone()[0]  # type: ignore[index]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-notify-")))
        receiver = Receiver(SECRET)
        stack.callback(receiver.close)
        config = write_config(workdir, receiver.url)
        servers: dict[str, tuple[int, str]] = {}
        for label in ("on", "off"):
            (workdir / label).mkdir()
            settings = {"notify_config": str(config), "notify_worker": "off"} if label == "on" else {}
            process, base = start_server(url, workdir / label, None, **settings)
            stack.callback(stop, process)
            servers[label] = (process.pid, base)
        notifier = start_notifier(url, workdir / "on", config)
        stack.callback(stop, notifier)
        warm_up(url, servers["on"][1], receiver, count, args.events)
        warm_up(url, servers["off"][1], None, count, args.events)
        measure_latency(url, servers["on"][1], receiver, 5)  # warm: the worker's thread, its session to the receiver
        latencies, answers = measure_latency(url, servers["on"][1], receiver, n)
        print(f"latency p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms",
              file=sys.stderr)
        for r in range(repeats):
            for label in ("on", "off") if r % 2 == 0 else ("off", "on"):
                on = label == "on"
                runs[label].append(ingest_run(url, servers[label], count, args.events, receiver if on else None,
                                              notifier.pid if on else None))
            a, b = runs["on"][-1], runs["off"][-1]
            print(f"pair {r + 1}/{repeats}: on {a.rate:,.0f}, off {b.rate:,.0f} summaries/s (on / off "
                  f"{a.rate / b.rate:.2f}); API CPU per batch on {a.cpu_ms:.1f}, off {b.cpu_ms:.1f} ms; notifier "
                  f"{a.notifier_cpu_ms:.1f} ms; PostgreSQL on {a.postgres_cpu_ms:.1f}, off {b.postgres_cpu_ms:.1f} ms; "
                  f"receiver {a.receiver_cpu_ms:.1f} ms",
                  file=sys.stderr)
        deliveries, delivered, retried = outbox_summary(url)
        if delivered != deliveries or receiver.bad_signatures:
            raise RuntimeError(f"{deliveries} deliveries, {delivered} delivered, "
                               f"{receiver.bad_signatures} bad signatures")
    on, off = [r.rate for r in runs["on"]], [r.rate for r in runs["off"]]
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    cpu_on, cpu_off = [r.cpu_ms for r in runs["on"]], [r.cpu_ms for r in runs["off"]]
    cpu_notifier = [r.notifier_cpu_ms for r in runs["on"]]
    cpu_postgres = {label: [r.postgres_cpu_ms for r in runs[label]] for label in ("on", "off")}
    lags = [r.lag_ms for r in runs["on"] if r.lag_ms is not None]
    rows = [
        ("ingest with an alarm event → webhook request, p99", f"{percentile(latencies, 0.99):,.1f} ms",
         f"≤ {LIMIT_MS:,.0f}"),
        ("ingest with an alarm event → webhook request, p50", f"{percentile(latencies, 0.5):,.1f} ms", ""),
        ("the same, largest", f"{max(latencies):,.1f} ms", ""),
        ("p99 / limit", f"{percentile(latencies, 0.99) / LIMIT_MS:.3f}", ""),
        ("the ingest's own answer (POST → response), p50 / p99",
         f"{percentile(answers, 0.5):,.1f} / {percentile(answers, 0.99):,.1f} ms", ""),
        (f"ingest, notifications off (1 client, gzip, {BATCH} summaries + {args.events} alarm events per batch)",
         median_spread(off) + " summaries/s", ""),
        ("ingest, notifications on (every transition sent to the webhook)", median_spread(on) + " summaries/s", ""),
        ("notifications on / off", median_spread(ratios, "{:.2f}"), "≥ 0.9"),
        ("central API CPU per batch, notifications off", median_spread(cpu_off, "{:.1f}") + " ms", ""),
        ("central API CPU per batch, notifications on (its worker off)", median_spread(cpu_on, "{:.1f}") + " ms", ""),
        (f"notifier process CPU per batch (its {args.events} deliveries)", median_spread(cpu_notifier, "{:.1f}")
         + " ms", ""),
        ("PostgreSQL backends' CPU per batch, notifications off / on",
         f"{median_spread(cpu_postgres['off'], '{:.1f}')} / {median_spread(cpu_postgres['on'], '{:.1f}')} ms", ""),
        ("the bench's webhook receiver's CPU per batch (on the same cores, charged to \"on\")",
         median_spread([r.receiver_cpu_ms for r in runs["on"]], "{:.1f}") + " ms", ""),
        ("on: last webhook request after the last ingest answer", median_spread(lags, "{:,.1f}") + " ms", ""),
    ]
    body = table(rows) + (
        f"\n\n{QUICK if args.quick else ''}On {where} (PostgreSQL {version}, fsync {fsync}), two "
        "`pdm-central serve` processes, one with PDM_CENTRAL_NOTIFY_CONFIG (a webhook channel to a receiver in its "
        "own process that answers 200 at once; one route for every gateway from warning, digest_after 100000 so that "
        "nothing is held for a digest) and, as in production, PDM_CENTRAL_NOTIFY_WORKER=off with one `pdm-central "
        "notify` process delivering, one without; client, receiver, servers, notifier and PostgreSQL share the 2 "
        "cores. "
        f"Latency: {n} batches one after another, each a new machine's summary and its event ok → alarm (one new "
        "episode, one delivery), from just before the POST to the receiver having the request's headers: central's "
        "part only (an agent sends its events at its next sync round, 30 s by default). Throughput: "
        f"{repeats} pairs of runs of the same {count} batches ({count * BATCH:,} summaries of {MACHINES} machines, "
        f"{args.events} events per batch, each an episode opening or closing, all sent), a new gateway each run, the "
        "order alternating from pair to pair; after an \"on\" run the bench waits for every delivery, and central's "
        f"CPU (/proc) counts to that point. {deliveries:,} deliveries in all, every one delivered, {retried} sent more "
        f"than once, {receiver.repeats} repeated requests, every signature valid; load average (1 min) "
        f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after.")
    write_section("notify", "python -m bench.bench_notify" + (" --quick" if args.quick else ""), body,
                  ("fastapi", "uvicorn", "psycopg", "psycopg-pool", "requests"))
    print(body)


if __name__ == "__main__":
    main()
