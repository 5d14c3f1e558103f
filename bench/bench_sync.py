"""Sync catch-up benchmark: a backlog of summaries in the agent's outbox, synced by the real SyncClient to a real
`pdm-central serve` on PostgreSQL.

Run: python -m bench.bench_sync [--quick] [--repeats N] [--batch-size N]   (writes the `sync` section of BENCHMARKS.md)

PostgreSQL: the machine's own on 127.0.0.1:5432 when it lets `postgres` in without a password, else a throwaway
server (testkit/postgres.py); either way a new database, migrated with `pdm-central migrate`, dropped at the end.
Each run: a new gateway and a new agent store whose outbox holds BACKLOG summaries (50 machines, one-minute windows,
the protocol's Summary JSON as the agent writes it, written with Store.write before the clock starts); the clock
covers `SyncClient.sync_once()` until the outbox is empty: reading the outbox, building and gzipping the batches,
HTTP, central's validation and insert, and marking the records synced in SQLite. The goal is >= 10,000 summaries/s.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import psycopg

from agent.store import OutboxRecord, Store
from bench.bench_central import add_gateway, bench_database, run_raw, start_server
from bench.report import median_spread, table, write_section
from sync.client import SyncClient
from sync.config import CentralConfig
from sync.outbox import Outcome
from sync.protocol import GatewayStatus, Summary
from testkit import batches

BACKLOG = 100_000
MACHINES = 50
BATCH = 2_000  # records per post; the protocol allows 5,000


def fill_outbox(store: Store, gateway: str, count: int) -> None:
    """`count` summaries, as the agent's Machines would write them (validated Summary JSON)."""
    records = []
    now = time.time()
    for item in batches.many(gateway, MACHINES, count // MACHINES):
        summary = Summary.model_validate(item)
        records.append(OutboxRecord("summary", str(summary.summary_id), summary.machine_id,
                                    summary.window_start.timestamp(), summary.model_dump_json(), now))
    for i in range(0, len(records), 5_000):
        store.write([], [], records[i:i + 5_000])


def run_once(url: str, base: str, workdir: Path, count: int, batch_size: int) -> float:
    """Summaries/s of one catch-up; checks that central has every one of them."""
    name = f"sync-{uuid.uuid4().hex[:8]}"
    gateway_id, token = add_gateway(url, name)
    with Store.open(workdir / f"{name}.db", synchronous="FULL") as store:
        fill_outbox(store, name, count)
        config = CentralConfig(url=base, token=token, batch_size=batch_size, timeout_s=60)
        status = GatewayStatus(buffer_pending=count, dropped_total=0, uptime_s=1.0)
        client = SyncClient(config, name, "bench", store, lambda: status)
        start = time.perf_counter()
        result = client.sync_once()
        elapsed = time.perf_counter() - start
        client.close()
        if result.outcome is not Outcome.SYNCED or result.sent != count or store.outbox_backlog()[0]:
            raise RuntimeError(f"the catch-up did not finish: {result}")
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT count(*) FROM summaries WHERE gateway_id = %s", [gateway_id]).fetchone()[0]
    if stored != count:
        raise RuntimeError(f"central has {stored} summaries of {count}")
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller backlog, one run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    args = parser.parse_args()
    count = 10_000 if args.quick else BACKLOG
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack stops what it started
    repeats = 1 if args.quick else args.repeats
    with ExitStack() as stack:
        url, where = bench_database(stack)
        with psycopg.connect(url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            fsync = conn.execute("SHOW fsync").fetchone()[0]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        process, base = start_server(url, workdir)

        def stop() -> None:
            process.terminate()
            process.wait(20)

        stack.callback(stop)
        run_once(url, base, workdir, 2_000, args.batch_size)  # warm-up: connections, caches
        rates, raw = [], []
        for _ in range(repeats):
            raw.append(run_raw(url, batches.many(f"raw-{uuid.uuid4().hex[:6]}", MACHINES, count // MACHINES),
                               args.batch_size))
            rates.append(run_once(url, base, workdir, count, args.batch_size))
            print(f"{rates[-1]:,.0f} summaries/s, raw {raw[-1]:,.0f} rows/s", file=sys.stderr)
    ratios = [a / b for a, b in zip(rates, raw, strict=True)]
    body = table([
        (f"catch-up of {count:,} summaries, agent outbox -> central -> PostgreSQL, {args.batch_size:,} per batch",
         f"{median_spread(rates)} summaries/s", "≥ 10,000"),
        (f"raw INSERT … ON CONFLICT DO NOTHING of the same rows, {args.batch_size:,} per transaction",
         f"{median_spread(raw)} rows/s", ""),
        ("catch-up / raw", median_spread(ratios, "{:.2f}"), ""),
    ]) + f"""

{repeats} runs, each a new gateway whose outbox (SQLite, synchronous FULL) holds {count:,} summaries of {MACHINES}
machines, synced by `SyncClient.sync_once()` (one keep-alive session, gzip level 5, {args.batch_size:,} records per
POST, each batch marked synced in SQLite after central's 200) to `pdm-central serve` (one uvicorn process) on
{where} (PostgreSQL {version}, fsync {fsync}), all on 127.0.0.1 sharing the machine's cores. Central's ingest
rate against a raw INSERT is also in the `central` section (`python -m bench.bench_central`). Raw: central's
own INSERT … SELECT FROM jsonb_to_recordset(…) ON CONFLICT DO NOTHING of the same summaries, alone, one per
{args.batch_size:,}, each its own transaction, in the same run."""
    print(body)
    write_section("sync", "python -m bench.bench_sync" + (" --quick" if args.quick else ""), body,
                  ("fastapi", "uvicorn", "psycopg", "psycopg-pool", "pydantic", "requests"))


if __name__ == "__main__":
    main()
