"""Fleet benchmark (issue 17): the cost of shadow scoring on ingest, and of the downlink when nothing changed.

Run: python -m bench.bench_fleet [--quick] [--repeats N]   (writes the `fleet` section of BENCHMARKS.md)

- Ingest with a shadow model against without, in the same run: the agent's pipeline (validate, score, the
  machines' windows and alarms, one SQLite transaction per batch on the checkout's disk) fed pre-built readings of
  20 machines as fast as it takes them; "shadow" scores every batch a second time with a candidate derived from the
  shipped package (testkit/models.py: same graph, another version) and adds its figures to the summaries. The two
  alternate, each into a new database. Goal: shadow / without >= 0.6.
- Downlink when nothing changed: the agent's real SyncClient against `pdm-central serve` with an empty outbox,
  counting the HTTP requests of one round and the bytes of central's answer (status line and headers: a 304 has no
  body); then GATEWAYS gateways each polling `GET /desired` with If-None-Match once, from 16 client threads at once,
  with the latency percentiles central answered them in.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import psycopg
import requests

from agent.config import PipelineConfig
from agent.machines import Machines
from agent.pipeline import Pipeline
from agent.store import Store
from bench.bench_central import bench_database, start_server
from bench.report import median_spread, output_root, table, write_section
from central import auth
from drivers.base import RawReading
from model.package import load
from model.score import Scorer
from sync.client import SyncClient
from sync.config import CentralConfig
from sync.protocol import GatewayStatus
from sync.remote import AlarmsConfig, SummaryConfig
from testkit.models import derive_package

MACHINES = 20
T0 = 1_790_000_000.0
CLIENTS = 16


def stream(n: int) -> list[RawReading]:
    fields = {"machine_type": "M", "air_temperature": 300.0, "process_temperature": 310.0,
              "rotational_speed": 1500, "torque": 40.0, "tool_wear": 10}
    return [RawReading(f"m{i % MACHINES:02d}", T0 + i // MACHINES * 0.1, dict(fields, tool_wear=(i // 200) % 200),
                       "bench", T0, payload="{}") for i in range(n)]


def ingest_rate(folder: Path, live: Scorer, shadow: Scorer | None, readings: list[RawReading]) -> float:
    with Store.open(folder / f"{uuid.uuid4().hex}.db") as store:
        machines = Machines("bench", SummaryConfig(window_s=1, grace_s=0.5), AlarmsConfig(), live.model,
                            store.machines(), started_at=T0)
        pipeline = Pipeline(live, store, PipelineConfig(queue_max=len(readings) + 1), machines, clock=lambda: T0)
        pipeline.set_shadow(shadow)
        for reading in readings:
            pipeline.put(reading)
        started = time.perf_counter()
        pipeline.start()
        if not pipeline.stop(timeout=600):
            raise RuntimeError("the pipeline did not drain")
        elapsed = time.perf_counter() - started
        if store.counters().readings_accepted != len(readings):
            raise RuntimeError(f"stored {store.counters().readings_accepted} of {len(readings)}")
    return len(readings) / elapsed


class CountingSession(requests.Session):
    """A real session that counts its requests and the size of each answer's status line and headers."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, int, int]] = []  # (method, status, bytes)

    def request(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        response = super().request(method, url, *args, **kwargs)
        head = len(f"HTTP/1.1 {response.status_code} {response.reason}\r\n") + sum(
            len(f"{k}: {v}\r\n") for k, v in response.headers.items()) + 2
        self.requests.append((method, response.status_code, head + len(response.content)))
        return response


class EmptyOutbox:
    def pending(self, limit: int) -> list:  # type: ignore[type-arg]
        return []

    def mark_synced(self, record_ids) -> None:  # type: ignore[no-untyped-def]
        pass

    def set_aside(self, records, reason) -> None:  # type: ignore[no-untyped-def]
        pass


def downlink_round(base: str, name: str, token: str) -> tuple[int, int, int]:
    """Requests of a round with nothing to send and nothing changed, the answer's status and bytes."""
    session = CountingSession()
    config = CentralConfig(url=base, token=token)
    client = SyncClient(config, name, "bench", EmptyOutbox(),
                        lambda: GatewayStatus(buffer_pending=0, dropped_total=0, uptime_s=1.0), session=session)
    client.sync_once()  # the first round takes the ETag
    session.requests.clear()
    client.sync_once()
    client.close()
    [(method, status, size)] = session.requests  # one GET
    assert method == "GET"
    return len(session.requests), status, size


def poll_all(base: str, gateways: list[tuple[str, str]]) -> list[float]:
    """Each gateway polls once with the current ETag, 16 at a time; the latencies in ms."""
    etags: dict[str, str] = {}
    with requests.Session() as s:
        for name, token in gateways[:1]:
            etags[name] = s.get(f"{base}/api/v1/gateways/{name}/desired",
                                headers={"Authorization": f"Bearer {token}"}).headers["ETag"]
    etag = next(iter(etags.values()))  # nothing desired: every gateway's ETag is the same
    latencies: list[float] = []
    lock = threading.Lock()
    queue = list(gateways)

    def worker() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if not queue:
                        return
                    name, token = queue.pop()
                started = time.perf_counter()
                answer = session.get(f"{base}/api/v1/gateways/{name}/desired",
                                     headers={"Authorization": f"Bearer {token}", "If-None-Match": etag})
                elapsed = (time.perf_counter() - started) * 1000
                if answer.status_code != 304:
                    raise RuntimeError(f"{name}: {answer.status_code}")
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run, fewer readings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gateways", type=int, default=1000)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack stops what it started
    n = 10_000 if args.quick else 30_000
    scratch = output_root() / ".bench"
    scratch.mkdir(parents=True, exist_ok=True)
    without, with_shadow = [], []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=scratch) as tmp:
        folder = Path(tmp)
        live = Scorer(load())
        shadow = Scorer(load(derive_package(folder / "candidate", "1.0.1-bench")))
        readings = stream(n)
        ingest_rate(folder, live, shadow, stream(2_000))  # warm up: onnxruntime's first runs, the disk cache
        for r in range(repeats):
            order = (None, shadow) if r % 2 == 0 else (shadow, None)
            for candidate in order:
                rate = ingest_rate(folder, live, candidate, [RawReading(x.machine_id, x.ts, dict(x.fields),
                                                                        x.source, x.received_at, payload="{}")
                                                             for x in readings])
                (with_shadow if candidate is not None else without).append(rate)
            print(f"without {without[-1]:,.0f}/s, with shadow {with_shadow[-1]:,.0f}/s", file=sys.stderr)
    ratios = [s / w for s, w in zip(with_shadow, without, strict=True)]

    with ExitStack() as stack:
        url, where = bench_database(stack, prefix="pdm_bench_fleet")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        process, base = start_server(url, workdir)
        stack.callback(lambda: (process.terminate(), process.wait(20)))
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            gateways = [(f"poll-{i:05d}", auth.add_gateway(conn, f"poll-{i:05d}")) for i in range(args.gateways)]
        count, status, size = downlink_round(base, *gateways[0])
        poll_all(base, gateways[:50])  # warm the pool and the connections
        latencies = poll_all(base, gateways)
    rows = [
        (f"ingest without shadow ({n:,} readings, {MACHINES} machines)", median_spread(without) + " readings/s", ""),
        ("ingest with a shadow model", median_spread(with_shadow) + " readings/s", ""),
        ("shadow / without", median_spread(ratios, "{:.2f}"), "≥ 0.6"),
        ("downlink, nothing changed: requests per sync round", f"{count} (GET /desired → {status})", ""),
        ("downlink, nothing changed: bytes of central's answer", f"{size} B (status line and headers)", ""),
        (f"{len(latencies):,} gateways polling /desired (If-None-Match), {CLIENTS} at once: p50 / p99",
         f"{percentile(latencies, 50):.1f} / {percentile(latencies, 99):.1f} ms", ""),
        ("the same: mean rate", f"{len(latencies) / (sum(latencies) / 1000 / CLIENTS):,.0f} polls/s", ""),
    ]
    body = table(rows) + (
        f"\n\n{repeats} run(s){' (--quick)' if args.quick else ''} of ingest, alternating which goes first, each into "
        "a new SQLite database on the checkout's disk (synchronous = FULL); the shadow model is the shipped graph "
        "under another version, so it costs what the live model costs. Downlink on "
        f"{where}, `pdm-central serve` (one uvicorn process) on loopback sharing the 2 cores with PostgreSQL and the "
        f"{CLIENTS} client threads; each poll checks the token in the database (one index probe) and reads the "
        "gateway's desired state (one more), then answers 304 without a body. An agent asks at each sync round "
        "(every central.sync_interval_s, 30 s by default) and at least every central.poll_s (60 s).")
    write_section("fleet", "python -m bench.bench_fleet" + (" --quick" if args.quick else ""), body,
                  ("onnxruntime", "fastapi", "uvicorn", "psycopg"))
    print(body)


if __name__ == "__main__":
    main()
