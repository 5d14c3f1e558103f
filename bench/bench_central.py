"""Central ingest benchmark: summaries through `POST /api/v1/ingest` against a raw INSERT of the same rows.

Run: python -m bench.bench_central [--quick] [--repeats N]   (writes the `central` section of BENCHMARKS.md)

PostgreSQL: the machine's own on 127.0.0.1:5432 when it lets `postgres` in without a password, else a throwaway
server (testkit/postgres.py); either way a new database, dropped at the end. Each run uses a new gateway, so every row
is new. The same summaries, in batches of BATCH (the agent's default batch size):
  - raw: central's own `INSERT INTO summaries (...) SELECT ... FROM jsonb_to_recordset(<the batch as JSON>) ON
    CONFLICT DO NOTHING`, alone, one per batch, one transaction each, the JSON built before the clock starts: the
    database's cost of these rows (indexes and triggers included), the floor of any ingest;
  - central: `pdm-central serve` (one uvicorn process) on 127.0.0.1; one client posts the gzipped JSON bodies (built
    before the clock starts) one after another and waits for each answer: HTTP, gunzip, validation, token lookup,
    the insert, the machines' latest state and the gateway's status;
  - central, 4 clients: 4 gateways posting at once;
  - resend: the same batches again, all duplicates.
The goal is central / raw >= 0.5.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import psycopg
import requests

from bench.report import median_spread, write_section
from central import auth, db
from testkit import batches
from testkit.net import LOCALHOST, free_port
from testkit.postgres import (
    POSTGRES_PORT,
    Postgres,
    ThrowawayPostgres,
    create_database,
    drop_database,
    postgres_answers,
)

BATCH = 500
RAW_INSERT = """
INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                       model_sha256, readings, rejected, out_of_distribution, health_min, health_mean, health_last,
                       p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
SELECT %(gateway_id)s, s.summary_id, s.machine_id, s.window_start, s.window_end, s.model->>'name',
       s.model->>'version', s.model->>'sha256', s.readings, s.rejected, s.out_of_distribution, s.health_min,
       s.health_mean, s.health_last, s.p_failure_max, s.p_failure_mean, s.worst_state, s.mode_risk_max, s.inputs,
       %(batch_id)s
FROM jsonb_to_recordset(%(rows)s::jsonb) AS s(
    summary_id uuid, machine_id text, window_start timestamptz, window_end timestamptz, model jsonb,
    readings integer, rejected integer, out_of_distribution integer, health_min double precision,
    health_mean double precision, health_last double precision, p_failure_max double precision,
    p_failure_mean double precision, worst_state text, mode_risk_max jsonb, inputs jsonb)
ON CONFLICT DO NOTHING
"""


def summaries(gateway: str, machines: int, windows: int) -> list[dict]:
    return batches.many(gateway, machines, windows)


def bodies(gateway: str, rows: list[dict]) -> list[bytes]:
    return [gzip.compress(json.dumps(batches.batch(gateway, summaries=rows[i:i + BATCH], events=[])).encode(), 5)
            for i in range(0, len(rows), BATCH)]


def add_gateway(url: str, name: str) -> tuple[int, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        token = auth.add_gateway(conn, name)
        return conn.execute("SELECT id FROM gateways WHERE name = %s", [name]).fetchone()[0], token


def run_raw(url: str, rows: list[dict], batch: int = BATCH) -> float:
    gateway_id, _ = add_gateway(url, f"raw-{uuid.uuid4().hex[:8]}")
    # The statement central's ingest runs for the summaries (one per batch, the rows as one JSON parameter), alone:
    # the database's own cost of these rows, triggers included, without HTTP, validation or the token lookup.
    batch_id = uuid.uuid4()
    params = [{"gateway_id": gateway_id, "batch_id": batch_id, "rows": json.dumps(rows[i:i + batch])}
              for i in range(0, len(rows), batch)]
    with psycopg.connect(url) as conn:
        for moment in {row["window_start"][:10] for row in rows}:  # their partitions, as ingest ensures them first
            for parent in ("summaries", "summaries_hourly"):
                conn.execute("SELECT pdm_ensure_partition(%s, %s::timestamptz)", [parent, moment + "T00:00Z"])
        conn.commit()
        start = time.perf_counter()
        for batch_params in params:
            with conn.transaction():
                conn.execute(RAW_INSERT, batch_params)
        elapsed = time.perf_counter() - start
    return len(rows) / elapsed


def post_all(base: str, token: str, payloads: list[bytes]) -> dict:
    totals = {"accepted": 0, "duplicates": 0}
    with requests.Session() as session:
        session.headers.update({"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                                "Content-Encoding": "gzip"})
        for payload in payloads:
            response = session.post(base + "/api/v1/ingest", data=payload, timeout=60)
            if response.status_code != 200:
                raise RuntimeError(f"central answered {response.status_code}: {response.text[:300]}")
            result = response.json()
            totals["accepted"] += result["accepted"]["summaries"]
            totals["duplicates"] += result["duplicates"]["summaries"]
    return totals


def run_central(url: str, base: str, machines: int, windows: int, clients: int = 1) -> tuple[float, float]:
    """(rows/s of new rows, rows/s of the same batches sent again)."""
    work = []
    for _ in range(clients):
        name = f"bench-{uuid.uuid4().hex[:8]}"
        _, token = add_gateway(url, name)
        work.append((token, bodies(name, summaries(name, machines, windows))))
    total = clients * machines * windows

    def run_all() -> float:
        results, threads = [], []
        for token, payloads in work:
            threads.append(threading.Thread(target=lambda t=token, p=payloads: results.append(post_all(base, t, p))))
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if len(results) != clients:
            raise RuntimeError("a client failed")
        return elapsed, results

    elapsed, results = run_all()
    if sum(r["accepted"] for r in results) != total:
        raise RuntimeError(f"accepted {results}, expected {total}")
    again, results = run_all()
    if sum(r["duplicates"] for r in results) != total:
        raise RuntimeError(f"duplicates {results}, expected {total}")
    return total / elapsed, total / again


def bench_database(stack: ExitStack, prefix: str = "pdm_bench") -> tuple[str, str]:
    """A fresh migrated database for one bench, dropped when `stack` closes: on the machine's PostgreSQL when it lets
    `postgres` in, else on a throwaway server. Returns its URL and where it is, in words for the report."""
    if postgres_answers(LOCALHOST, POSTGRES_PORT):
        server, where = Postgres(LOCALHOST, POSTGRES_PORT), "the machine's PostgreSQL on 127.0.0.1:5432"
    else:
        server, where = stack.enter_context(ThrowawayPostgres.create()), "a throwaway PostgreSQL (fsync off)"
    name = create_database(server, prefix=prefix)
    stack.callback(drop_database, server, name)
    url = server.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        db.migrate(conn)
    return url, where


def start_server(url: str, workdir: Path, port: int | None = None, **settings: str) -> tuple[subprocess.Popen, str]:
    """`pdm-central serve` on `url`, with PDM_CENTRAL_<NAME> = value for each of `settings`; returns its base URL
    once /readyz answers. No partition maintenance task unless `settings` asks for one: the benches' data has fixed
    dates, which retention would drop under them (bench_central_scale measures retention on its own)."""
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDM_CENTRAL_")}
    env.update({"PDM_CENTRAL_DATABASE_URL": url, "PDM_CENTRAL_LOG_LEVEL": "WARNING",
                "PDM_CENTRAL_MAINTENANCE_INTERVAL_S": "0"})
    env.update({f"PDM_CENTRAL_{name.upper()}": value for name, value in settings.items()})
    log = (workdir / "central.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "central.cli", "serve", "--port", str(port)], env=env,
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    base = f"http://{LOCALHOST}:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pdm-central serve exited: {(workdir / 'central.log').read_text()}")
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                return process, base
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("pdm-central serve was not ready within 30 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows, one run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    machines, windows = (20, 50) if args.quick else (50, 200)
    repeats = 1 if args.quick else args.repeats
    rows = machines * windows
    with ExitStack() as stack:
        url, where = bench_database(stack)
        with psycopg.connect(url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            fsync = conn.execute("SHOW fsync").fetchone()[0]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        process, base = start_server(url, workdir)

        def stop() -> None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)

        stack.callback(stop)
        post_all(base, add_gateway(url, "warmup")[1], bodies("warmup", summaries("warmup", 5, 20)))
        raw, central, resend, parallel = [], [], [], []
        for _ in range(repeats):
            raw.append(run_raw(url, summaries(f"raw-{uuid.uuid4().hex[:6]}", machines, windows)))
            new, again = run_central(url, base, machines, windows)
            central.append(new)
            resend.append(again)
            parallel.append(run_central(url, base, machines, windows // 4, clients=4)[0])
            print(f"raw {raw[-1]:,.0f} rows/s, central {central[-1]:,.0f} rows/s (ratio {central[-1] / raw[-1]:.2f}), "
                  f"resend {resend[-1]:,.0f}, 4 clients {parallel[-1]:,.0f}", file=sys.stderr)
    ratios = [c / r for c, r in zip(central, raw, strict=True)]
    body = f"""| figure | median (min–max) | goal |
|---|---|---|
| raw INSERT … ON CONFLICT DO NOTHING (one statement of {BATCH} rows per transaction) | {median_spread(raw)} rows/s | |
| central ingest, 1 client, gzip, {BATCH} summaries per batch | {median_spread(central)} rows/s | |
| central / raw | {median_spread(ratios, "{:.2f}")} | ≥ 0.5 |
| central ingest, 4 clients at once | {median_spread(parallel)} rows/s | |
| the same batches again (all duplicates) | {median_spread(resend)} rows/s | |

{repeats} runs of {rows:,} summaries each ({machines} machines × {windows} one-minute windows, 2 inputs), on {where}
(PostgreSQL {version}, fsync {fsync}). Central is `pdm-central serve`: one uvicorn process, pool of 10; the client
posts pre-built gzipped bodies over HTTP on loopback and shares the 2 cores with the server and PostgreSQL. Both sides
write the same table with the same indexes; central also keeps `machines` (latest state) and the gateway's status
in the same transaction, and checks the pooled connection before use."""
    print(body)
    write_section("central", "python -m bench.bench_central" + (" --quick" if args.quick else ""), body,
                  ("fastapi", "uvicorn", "psycopg", "psycopg-pool", "pydantic"))


if __name__ == "__main__":
    main()
