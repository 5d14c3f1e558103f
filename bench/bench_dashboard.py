"""Fleet dashboard benchmark: the fleet view and a 30-day machine view with 1,000 gateways × 100 machines of history.

Run: python -m bench.bench_dashboard [--quick] [--repeats N]   (writes the `dashboard` section of BENCHMARKS.md)

PostgreSQL: the machine's own on 127.0.0.1:5432 when it lets `postgres` in without a password, else a throwaway
server (testkit/postgres.py); either way a new database, dropped at the end. The data is bulk-loaded inside PostgreSQL
(INSERT … SELECT over generate_series, no HTTP; the hourly roll-up's trigger runs as for ingest): 1,000 gateways ×
100 machines, each with 60 one-minute windows of summaries ending now, about 1 % of the machines in alarm and 4 % in
warning with their events, some gateways silent with a backlog; plus 10 tracked machines with 30 days of one-minute
windows (43,200 each). Then VACUUM ANALYZE (what autovacuum does to an insert-only table), and the plans of the
dashboard's queries are EXPLAINed and checked for the indexes central/dashboard.py names: the run fails when a plan
does not use them.

Timed: `pdm-central serve` (one uvicorn process) on loopback, signed in with a session cookie as the page is; one
client, one keep-alive connection, requests one after another. Each request's time is the client's round trip:
server time plus a loopback HTTP exchange (an upper bound of the server time).
  - fleet: GET /api/v1/dashboard/fleet as the page opens it, and with a filter (state, failure mode, gateway);
  - machine 30 d: GET /api/v1/dashboard/gateways/G/machines/M?since=now-30d&until=now&points=400 of a tracked machine;
  - machine 24 h: the same over 24 hours, of random machines.
The goal is p99 ≤ 200 ms for the fleet view and the 30-day machine view.
"""

from __future__ import annotations

import argparse
import random
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import requests

from bench.bench_central import bench_database, start_server
from bench.report import median_spread, write_section
from central import dashboard
from testkit.central import OPS_TOKEN

TRACKED_DAYS = 30
INPUTS = ('{"air_temperature": {"min": 298.1, "mean": 298.4, "max": 298.9}, '
          '"process_temperature": {"min": 308.2, "mean": 308.6, "max": 309.0}, '
          '"rotational_speed": {"min": 1380, "mean": 1410, "max": 1450}, '
          '"torque": {"min": 38.5, "mean": 40.1, "max": 44.75}, "tool_wear": {"min": 120, "mean": 121, "max": 122}}')

GATEWAYS = """
INSERT INTO gateways (name, token_hash, last_seen_at, agent_version, last_status)
SELECT format('gw-%%s', lpad(g::text, 4, '0')), sha256(convert_to('bench-token-' || g, 'UTF8')),
       CASE WHEN g %% 97 = 0 THEN now() - interval '3 hours' ELSE now() - (g %% 30) * interval '1 second' END,
       '0.1.0',
       jsonb_build_object('buffer_pending', CASE WHEN g %% 97 = 0 THEN 5000 + g ELSE g %% 7 END,
                          'dropped_total', CASE WHEN g %% 193 = 0 THEN g ELSE 0 END, 'uptime_s', 86400)
FROM generate_series(1, %(gateways)s::integer) AS g
"""

# A machine's state, health and risks are a function of (gateway, machine): about 1 % alarm, 4 % warning.
MACHINE_STATE = """
    CASE WHEN (g.id * 131 + m) %% 100 = 0 THEN 'alarm' WHEN (g.id * 131 + m) %% 25 = 0 THEN 'warning' ELSE 'ok' END
"""

SUMMARIES = f"""
INSERT INTO summaries (gateway_id, summary_id, machine_id, window_start, window_end, model_name, model_version,
                       model_sha256, readings, rejected, out_of_distribution, health_min, health_mean, health_last,
                       p_failure_max, p_failure_mean, worst_state, mode_risk_max, inputs, batch_id)
SELECT x.gateway_id, md5(x.gateway_id || '/' || x.machine_id || '/' || x.w)::uuid, x.machine_id, x.start,
       x.start + interval '1 minute', 'ai4i-failure', '1.0.0', repeat('ab', 32), 60, 0, 0,
       x.health - 2, x.health, x.health, x.p, x.p / 2, x.state,
       jsonb_build_object('TWF', round((x.p * (x.k %% 4 = 0)::int + random() * 0.01)::numeric, 4),
                          'HDF', round((x.p * (x.k %% 4 = 1)::int + random() * 0.01)::numeric, 4),
                          'PWF', round((x.p * (x.k %% 4 = 2)::int + random() * 0.01)::numeric, 4),
                          'OSF', round((x.p * (x.k %% 4 = 3)::int + random() * 0.01)::numeric, 4)),
       %(inputs)s::jsonb, md5(x.gateway_id || '/' || x.w)::uuid
FROM (
    SELECT g.id AS gateway_id, format('m-%%s', lpad(m::text, 3, '0')) AS machine_id, w, g.id * 131 + m AS k,
           %(now)s::timestamptz - w * interval '1 minute' AS start,
           s.state, CASE s.state WHEN 'alarm' THEN 25.0 WHEN 'warning' THEN 60.0 ELSE 90.0 END
                    + ((g.id * 7 + m * 13 + w) %% 10) AS health,
           CASE s.state WHEN 'alarm' THEN 0.8 WHEN 'warning' THEN 0.2 ELSE 0.005 END AS p
    FROM gateways g, generate_series(0, %(machines)s::integer - 1) AS m, generate_series(%(first)s::integer, %(last)s::integer) AS w,
         LATERAL (SELECT {MACHINE_STATE} AS state) s
    WHERE g.id BETWEEN %(gw_from)s::integer AND %(gw_to)s::integer AND m BETWEEN %(m_from)s::integer AND %(m_to)s::integer
    ORDER BY w DESC, g.id, m  -- as ingest writes them: window after window, all machines of a batch together
) x
"""

MACHINES = """
INSERT INTO machines (gateway_id, machine_id, first_seen_at, summary_id, window_start, window_end, worst_state,
                      health_last, p_failure_max, mode_risk_max, model_name, model_version, dominant_mode)
SELECT s.gateway_id, s.machine_id, now() - interval '30 days', s.summary_id, s.window_start, s.window_end,
       s.worst_state, s.health_last, s.p_failure_max, s.mode_risk_max, s.model_name, s.model_version,
       (SELECT key FROM jsonb_each(s.mode_risk_max) WHERE jsonb_typeof(value) = 'number'
        ORDER BY value::double precision DESC, key LIMIT 1)  -- as ingest writes it (central/ingest.py)
FROM summaries s
WHERE s.window_start = %(now)s
"""

EVENTS = """
INSERT INTO events (gateway_id, event_id, machine_id, ts, from_state, to_state, p_failure, health, dominant_mode,
                    mode_risk, reading, model_name, model_version, model_sha256, batch_id)
SELECT m.gateway_id, md5(m.gateway_id || '/' || m.machine_id || '/' || k)::uuid, m.machine_id,
       now() - k * interval '7 hours' - interval '90 seconds',
       CASE WHEN k %% 2 = 1 THEN 'ok' ELSE x.state END, CASE WHEN k %% 2 = 1 THEN x.state ELSE 'ok' END,
       m.p_failure_max, m.health_last, m.dominant_mode, m.mode_risk_max, '{}'::jsonb, 'ai4i-failure', '1.0.0',
       repeat('ab', 32), md5(m.gateway_id::text)::uuid
FROM machines m, LATERAL (SELECT CASE m.worst_state WHEN 'ok' THEN 'warning' ELSE m.worst_state END AS state) x,
     generate_series(1, CASE WHEN m.machine_id IN (SELECT unnest(%(tracked)s::text[]))
                                           AND m.gateway_id = 1 THEN 99 ELSE 1 END) AS k
WHERE m.worst_state <> 'ok' OR (m.gateway_id = 1 AND m.machine_id = ANY(%(tracked)s::text[]))
"""


# Written straight into the tables: their days' partitions first (ingest would create them itself).
PARTITIONS = """
SELECT pdm_ensure_partition(p, d) FROM unnest(ARRAY['summaries', 'summaries_hourly', 'events']) AS p,
    generate_series(%(now)s - %(days)s * interval '1 day', %(now)s + interval '1 day', interval '1 day') AS d
"""


def load(url: str, gateways: int, machines: int, history: int, tracked: int) -> dict:
    """Fill the database; return row counts and how long each part took."""
    timings, counts = {}, {}
    tracked_ids = [f"m-{m:03d}" for m in range(tracked)]
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        start = time.perf_counter()
        conn.execute(GATEWAYS, {"gateways": gateways})
        conn.execute(PARTITIONS, {"now": now, "days": TRACKED_DAYS + 2})
        step = max(1, gateways // 20)
        for gw_from in range(1, gateways + 1, step):  # in slices: progress, and no giant sort
            conn.execute(SUMMARIES, {"now": now, "machines": machines, "first": 0, "last": history - 1, "inputs": INPUTS,
                                     "gw_from": gw_from, "gw_to": gw_from + step - 1, "m_from": 0,
                                     "m_to": machines - 1})
            print(f"  summaries: gateways {gw_from}-{gw_from + step - 1}", file=sys.stderr)
        last = TRACKED_DAYS * 24 * 60 - 1
        for first in range(history, last + 1, 5 * 24 * 60):  # the tracked machines' month, five days at a time
            conn.execute(SUMMARIES, {"now": now, "machines": machines, "first": first, "last": min(last, first + 5 * 24 * 60 - 1),
                                     "inputs": INPUTS, "gw_from": 1, "gw_to": 1, "m_from": 0, "m_to": tracked - 1})
        conn.execute(MACHINES, {"now": now})
        conn.execute(EVENTS, {"tracked": tracked_ids})
        timings["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        timings["vacuum_s"] = time.perf_counter() - start
        for table in ("gateways", "machines", "summaries", "events"):
            counts[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        counts["size"] = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
    return {**timings, **counts, "tracked": tracked_ids}


# --- plans ------------------------------------------------------------------------------------------------------------

def plan(conn: psycopg.Connection, sql: str, params: dict) -> str:
    rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF, SUMMARY ON) " + sql, params).fetchall()
    return "\n".join(row[0] for row in rows)


# The index of a partition is named after it (migration 0006): events_p202612_gateway_id_machine_id_ts_idx is
# events_machine_ts's, summaries_p20261205_gateway_id_machine_id_window_start_heal_idx summaries_machine_chart's.
EVENTS_MACHINE_TS = "_gateway_id_machine_id_ts_idx"


def check_plans(url: str, tracked: str, gateway: str, strict: bool) -> list[tuple[str, str, str]]:
    """(query, the plan's lines that show the access paths, its execution time); ValueError when an index the
    dashboard relies on is not used (`strict`; --quick's small tables may rightly be read whole)."""
    now = datetime.now(UTC)
    span = dashboard.machine_range(now - timedelta(days=TRACKED_DAYS), now, 400)
    day = dashboard.machine_range(now - timedelta(days=1), now, 400)
    fleet = dashboard.fleet_queries(None, None, None, 200)
    # Each entry after the parameters: the plan must name one of these.
    cases = [
        ("fleet page", *fleet["page"], ["machines_fleet_order"], [EVENTS_MACHINE_TS]),
        ("fleet page, mode=OSF", *dashboard.fleet_queries(None, None, "OSF", 200)["page"], ["machines_mode_order"]),
        ("fleet page, state=alarm", *dashboard.fleet_queries(None, "alarm", None, 200)["page"],
         ["machines_fleet_order"]),
        ("fleet page, gateway", *dashboard.fleet_queries(gateway, None, None, 200)["page"],
         ["Index Cond: (gateway_id = $0)"]),
        ("fleet counts", *fleet["counts"], ["machine_states"]),
        ("fleet counts, mode=OSF", *dashboard.fleet_queries(None, None, "OSF", 200)["counts"],
         ["machines_mode_order", "Seq Scan on machines"]),  # a quarter of the machines: either may be cheaper
        ("gateways", *fleet["gateways"], ["machine_states"]),
        ("machine chart, 30 d", dashboard.series_query(span["hourly"]),
         {"gateway_id": 1, "machine_id": tracked, **span}, ["_pkey on summaries_hourly_p"]),
        ("machine chart, 24 h", dashboard.series_query(day["hourly"]), {"gateway_id": 1, "machine_id": tracked, **day},
         ["Index Only Scan using summaries_p"]),
        ("machine events, 30 d", dashboard.EVENTS, {"gateway_id": 1, "machine_id": tracked, "limit": 500, **span},
         [EVENTS_MACHINE_TS]),
    ]
    found, problems = [], []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        for name, sql, params, *expected in cases:
            text = plan(conn, sql, params)
            missing = [" or ".join(anyof) for anyof in expected if not any(path in text for path in anyof)]
            if missing:
                problems.append(f"{name}: the plan uses none of {missing}:\n{text}")
            paths = sorted({line.strip().removeprefix("-> ").split(" (")[0]
                            for line in text.splitlines() if "Scan" in line and " on " in line})
            fetches = [line.strip() for line in text.splitlines() if "Heap Fetches" in line]
            took = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "Execution Time" in line)
            found.append((name, "; ".join(paths) + (f" ({fetches[0]})" if fetches else ""), took))
    if problems and strict:
        raise ValueError("\n\n".join(problems))
    return found


# --- timing -----------------------------------------------------------------------------------------------------------

def signed_in(base: str) -> requests.Session:
    session = requests.Session()
    response = session.post(base + "/login", data={"token": OPS_TOKEN}, headers={"Origin": base},
                            allow_redirects=False, timeout=10)
    if response.status_code != 303 or "pdm-session" not in session.cookies:
        raise RuntimeError(f"sign-in failed: {response.status_code} {response.text[:200]}")
    return session


def timed(session: requests.Session, url: str, params: dict | None = None) -> float:
    start = time.perf_counter()
    response = session.get(url, params=params, timeout=30)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{url} answered {response.status_code}: {response.text[:300]}")
    return elapsed * 1000


def percentiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), cuts[98]


def run(base: str, requests_per_view: int, gateways: int, machines: int, tracked: list[str],
        rng: random.Random) -> dict[str, tuple[float, float]]:
    session = signed_in(base)
    fleet_url = base + "/api/v1/dashboard/fleet"
    filters = [{"state": "alarm"}, {"state": "warning"}, {"mode": "OSF"}, {"mode": "HDF"},
               {"gateway": f"gw-{gateways // 2:04d}"}, {"state": "ok", "mode": "TWF"}]
    for _ in range(5):  # warm-up: connections of the pool, plans, caches
        timed(session, fleet_url)
    samples: dict[str, list[float]] = {"fleet": [], "fleet, filtered": [], "machine 30 d": [], "machine 24 h": []}
    for i in range(requests_per_view):
        now = datetime.now(UTC)
        samples["fleet"].append(timed(session, fleet_url))
        samples["fleet, filtered"].append(timed(session, fleet_url, filters[i % len(filters)]))
        month = {"since": (now - timedelta(days=TRACKED_DAYS)).isoformat(), "until": now.isoformat(), "points": 400}
        samples["machine 30 d"].append(timed(
            session, f"{base}/api/v1/dashboard/gateways/gw-0001/machines/{tracked[i % len(tracked)]}", month))
        day = {"since": (now - timedelta(days=1)).isoformat(), "until": now.isoformat(), "points": 400}
        gateway, machine = rng.randrange(1, gateways + 1), rng.randrange(machines)
        samples["machine 24 h"].append(timed(
            session, f"{base}/api/v1/dashboard/gateways/gw-{gateway:04d}/machines/m-{machine:03d}", day))
    return {name: percentiles(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 gateways, fewer requests, one run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gateways, machines, history, tracked = (100, 100, 10, 2) if args.quick else (1000, 100, 60, 10)
    requests_per_view = 40 if args.quick else 300
    repeats = 1 if args.quick else args.repeats
    rng = random.Random(7)
    with ExitStack() as stack:
        url, where = bench_database(stack, "pdm_bench_dashboard")
        with psycopg.connect(url, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        loaded = load(url, gateways, machines, history, tracked)
        print(f"loaded {loaded}", file=sys.stderr)
        plans = check_plans(url, loaded["tracked"][0], f"gw-{gateways // 2:04d}", not args.quick)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        process, base = start_server(url, workdir, ops_token=OPS_TOKEN, session_cookie_secure="false")

        def stop() -> None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)

        stack.callback(stop)
        results = []
        for _ in range(repeats):
            results.append(run(base, requests_per_view, gateways, machines, loaded["tracked"], rng))
            print({k: f"p50 {v[0]:.1f} ms, p99 {v[1]:.1f} ms" for k, v in results[-1].items()}, file=sys.stderr)
    goal = {"fleet": "≤ 200", "machine 30 d": "≤ 200"}
    rows = []
    for view in results[0]:
        p50s, p99s = [r[view][0] for r in results], [r[view][1] for r in results]
        rows.append(f"| {view}, p50 | {median_spread(p50s, '{:.1f}')} ms | |")
        rows.append(f"| {view}, p99 | {median_spread(p99s, '{:.1f}')} ms | {goal.get(view, '')} |")
    plan_rows = "\n".join(f"| {name} | {paths} | {took} |" for name, paths, took in plans)
    body = f"""| figure | median (min–max) | goal |
|---|---|---|
{chr(10).join(rows)}

{repeats} runs of {requests_per_view} requests per view: one client, keep-alive, signed in with the session cookie;
time = the client's round trip on loopback (an upper bound of the server time); `pdm-central serve` (one uvicorn
process) on {where} (PostgreSQL {version}, shared_buffers {shared_buffers}); the 2 cores shared with other work.

Data, bulk-loaded with INSERT … SELECT over generate_series in {loaded['load_s']:.0f} s (+ VACUUM ANALYZE
{loaded['vacuum_s']:.0f} s): {gateways:,} gateways × {machines} machines = {loaded['machines']:,} machines (1 % alarm,
4 % warning), {loaded['summaries']:,} summaries ({history} one-minute windows per machine, and 30 days = 43,200
windows for each of {tracked} tracked machines), {loaded['events']:,} events; database {loaded['size']}.
The fleet view returns the first 200 machines, the counts and all {gateways:,} gateways; filtered, it cycles through
state=alarm, state=warning, mode=OSF, mode=HDF, one gateway, state=ok+mode=TWF. The 30-day machine view draws 360
two-hour buckets from the hourly roll-up (720 rows) and about 100 events; the 24-hour view 400 buckets of the
windows themselves (index-only scan).

Query plans (EXPLAIN ANALYZE, checked by the run: it fails when these indexes are not used):

| query | access paths | execution time |
|---|---|---|
{plan_rows}"""
    print(body)
    write_section("dashboard", "python -m bench.bench_dashboard" + (" --quick" if args.quick else ""), body,
                  ("fastapi", "uvicorn", "psycopg", "psycopg-pool"))


if __name__ == "__main__":
    main()
