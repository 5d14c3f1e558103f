"""Store benchmark: the agent's `Store.write()` against raw SQLite inserts of the same rows in the same transaction
sizes, on the same disk, with the same schema and pragmas (WAL, synchronous = FULL, the agent's default).

Run: python -m bench.bench_store [--quick] [--repeats N]   (writes the `store` section of BENCHMARKS.md)

Raw: `BEGIN IMMEDIATE; executemany(INSERT … ON CONFLICT DO NOTHING, rows already serialised); COMMIT` on a file
created by `Store.open()` (so the schema and indexes are the agent's) through a plain sqlite3 connection; the INSERT
and the rows (values, risk and ood as JSON, as the store keeps them) are written here, as a user of plain SQLite
would write them, not taken from the store. Store:
`Store.write(batch)`, which also serialises each reading (json.dumps of values, risk and ood) and updates the
counters in the same transaction. Each run writes into new files.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from agent.store import Store, StoredReading
from bench.report import median_spread, output_root, table, write_section

SIZES = (1, 50, 500)  # readings per transaction; 500 is the pipeline's batch_max
MACHINES = 20
RAW_INSERT = (
    'INSERT INTO readings (machine_id, ts, "values", machine_type, p_failure, risk, health, state, ood, '
    "model_version, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
)


def readings(n: int) -> list[StoredReading]:
    values = {"air_temperature": 300.1, "process_temperature": 310.2, "rotational_speed": 1538.0, "torque": 40.3,
              "tool_wear": 108.0}
    risk = {"TWF": 0.01, "HDF": 0.002, "PWF": 0.001, "OSF": 0.003}
    return [StoredReading(f"m{i % MACHINES:02d}", 1_790_000_000 + i // MACHINES, values, "M", 0.02, risk, 97.5, "ok",
                          (), "1.0.0", time.time()) for i in range(n)]


def raw_row(r: StoredReading) -> tuple:
    return (r.machine_id, r.ts, json.dumps(r.values), r.machine_type, r.p_failure, json.dumps(r.risk), r.health,
            r.state, json.dumps(r.ood), r.model_version, r.received_at)


def raw_rate(path: Path, rows: list[tuple], size: int) -> float:
    Store.open(path, synchronous="FULL").close()
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    start = time.perf_counter()
    for i in range(0, len(rows), size):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(RAW_INSERT, rows[i:i + size])
        connection.execute("COMMIT")
    elapsed = time.perf_counter() - start
    stored = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    connection.close()
    if stored != len(rows):
        raise RuntimeError(f"raw stored {stored} of {len(rows)}")
    return len(rows) / elapsed


def store_rate(path: Path, batch: list[StoredReading], size: int) -> float:
    with Store.open(path, synchronous="FULL") as store:
        start = time.perf_counter()
        for i in range(0, len(batch), size):
            store.write(batch[i:i + size], [])
        elapsed = time.perf_counter() - start
        if store.counters().readings_accepted != len(batch):
            raise RuntimeError(f"the store accepted {store.counters()} of {len(batch)}")
    return len(batch) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, fewer rows")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    counts = {1: 500 if args.quick else 1_000, 50: 5_000 if args.quick else 20_000,
              500: 10_000 if args.quick else 50_000}
    raw, ours = {s: [] for s in SIZES}, {s: [] for s in SIZES}
    scratch = output_root() / ".bench"  # the disk the figures are about, not /tmp (often tmpfs)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=scratch) as tmp:
        for r in range(repeats):
            for size in SIZES:
                batch = readings(counts[size])
                rows = [raw_row(reading) for reading in batch]
                # Alternate which goes first, so neither always gets the warmer disk cache.
                order = ("raw", "store") if r % 2 == 0 else ("store", "raw")
                for name in order:
                    path = Path(tmp) / f"{name}-{r}-{size}.db"
                    if name == "raw":
                        raw[size].append(raw_rate(path, rows, size))
                    else:
                        ours[size].append(store_rate(path, batch, size))
    rows = []
    for size in SIZES:
        ratios = [o / w for o, w in zip(ours[size], raw[size], strict=True)]
        rows += [(f"raw SQLite INSERT, {size} per transaction", median_spread(raw[size]) + " rows/s", ""),
                 (f"Store.write, {size} per transaction", median_spread(ours[size]) + " readings/s", ""),
                 (f"store / raw, {size} per transaction", median_spread(ratios, "{:.2f}"), "")]
    body = table(rows) + (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''}; {', '.join(f'{counts[s]:,}' for s in SIZES)} "
        f"readings for {', '.join(map(str, SIZES))} per transaction, on the disk of the checkout (see the machine "
        "table for its fsync rate: one transaction of synchronous = FULL costs about one fsync). Both write the "
        "agent's schema (readings with UNIQUE (machine_id, ts) and the ts index) in WAL mode, synchronous = FULL; "
        "the raw side inserts rows serialised beforehand, the store serialises each reading (json.dumps of values, "
        "risk and ood) and updates its counters in the same transaction. The pipeline commits up to 500 readings or "
        "100 ms per transaction.")
    write_section("store", "python -m bench.bench_store" + (" --quick" if args.quick else ""), body, ())
    print(body)


if __name__ == "__main__":
    main()
