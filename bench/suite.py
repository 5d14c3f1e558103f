"""The whole benchmark suite: every bench module in turn, then BENCHMARKS.md put together with the machine, the goals
and the plots at the top.

Run: python -m bench [--quick] [--only NAME ...]   (or ./scripts/bench.sh, which makes .venv first)

Each module runs in its own process (`python -m bench.bench_NAME [--quick]`) and writes its own section; a module
that fails is reported and the others still run (its previous section, if any, stays, with its old date), and the
suite exits 1. --quick: one run of each, smaller workloads, a 10 s outage for the peer (a few minutes in all).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import report

# In the order of BENCHMARKS.md. Each is bench/bench_NAME.py, run as a module.
MODULES = ("model", "store", "startup", "ingest", "modbus", "opcua", "central", "sync", "status", "dashboard",
           "central_scale", "fleet", "notify", "peer")
PACKAGES = ("onnxruntime", "numpy", "pydantic", "paho-mqtt", "pymodbus", "fastapi", "uvicorn", "psycopg",
            "requests", "matplotlib")
PLOTS = (("ingest-throughput.png", "Throughput against offered load (MQTT ingest, pdm-edge and the peer)"),
         ("ingest-latency.png", "Latency percentiles, publish → committed, at several offered loads"),
         ("rss-soak.png", "RSS of the agent over a soak under load"))


@dataclass(frozen=True)
class Goal:
    """A goal of an earlier issue: the row of `section` whose figure matches `row`, its median against `limit`."""

    name: str
    issue: int
    section: str
    row: str  # a regular expression searched in the figure column
    op: str  # ">=" or "<="
    limit: float
    unit: str
    profile: str = ""  # where the time goes, for a missed goal
    quote: str = ""  # better: the section's own `Profile: QUOTE…` line of this run, when it has one


GOALS = (
    Goal("ONNX throughput, batch 1,024, one thread", 2, "model", r"^ONNX throughput, batch 1,024", ">=", 300_000,
         "rows/s", "onnxruntime profile: the one TreeEnsembleRegressor node takes over 90 % of the graph (90 trees: "
         "failure forest 30, each mode 15) — the graph itself; compare the raw onnxruntime row of the model section",
         "onnxruntime profile"),
    Goal("validate + score, batch 256", 2, "model", r"^validate \+ score", ">=", 100_000, "readings/s",
         quote="cProfile of validate + score"),
    Goal("RSS after loading the model", 2, "model", r"^RSS after loading", "<=", 80, "MB",
         "`import onnxruntime` alone is about 50 MB on top of numpy (LIBRARY_NOTES)"),
    Goal("MQTT ingest / bare paho QoS 1 subscriber", 3, "ingest", r"^agent / bare subscriber", ">=", 0.8, "",
         "CPU per reading (2026-12-06 night, 20,000-message QoS 1 floods, 4 interleaved A/B pairs): agent 79.5 µs "
         "(was 94.0) against the bare subscriber's 33.3: paho's network thread 55–60 µs (the same MQTT 5 parsing and "
         "socket reads the bare subscriber pays, plus our decode, about 7.5), the pipeline's commit about 27 µs "
         "(json.dumps of values and risk about 7, summaries and alarms about 6). At 8,400 readings/s that is two "
         "thirds of a core, on 2 cores shared with the broker and the publisher: the agent's rate stays near 8,300/s "
         "while the ratio moves with the bare figure"),
    Goal("latency publish → committed at 5,000/s, p99", 3, "ingest", r"committed \(upper bound\), p99", "<=", 250,
         "ms"),
    Goal("agent RSS under load (median)", 3, "ingest", r"^agent RSS during the paced run, median", "<=", 100, "MB",
         "import cost: onnxruntime + numpy + the model ≈ the `bare` row of the startup section; the status server "
         "(FastAPI, uvicorn) and pydantic add the rest (compare startup: agent RSS / bare)"),
    Goal("Modbus driver / bare pymodbus loop", 4, "modbus", r"^rate: driver / bare", ">=", 0.7, "",
         "CPU per reading (2026-12-07 night, AMD EPYC): driver 54 µs against bare 38, on 2 cores shared with the one "
         "server process that answers every device (94–98 % of a core): the driver's coroutine layers (_schedule, "
         "_poll, _read_all, _read, read_timed), the decode and the hand-off to the sink"),
    Goal("Modbus poll-time jitter at 1 Hz, 200 devices, p99", 4, "modbus", r"jitter\), p99", "<=", 50, "ms"),
    Goal("OPC UA agent / bare asyncua client", 19, "opcua", r"^rate: agent / bare", ">=", 0.7, ""),
    Goal("OPC UA 10,000 monitored items at 1 Hz: agent RSS max", 19, "opcua", r"^scale: agent RSS, max", "<=", 150,
         "MB", "in-process harness (2026-12-06): 20 machines 133 MB, 2,000 machines (10,000 items) 175 MB; Python's "
         "allocator holds 75 MB of live objects, little fragmentation (malloc_trim frees nothing); the 2,000 machines' "
         "share: the config's pydantic models about 10 MB at start-up (5.6 MB stay), per-machine dicts and sets 10 MB, "
         "asyncua's per item Node/NodeId/SubscriptionItemData 3 MB, one publish's notifications held by asyncua's "
         "publish loop while it awaits the next 3.7 MB; asyncua's server ignores MaxNotificationsPerPublish"),
    Goal("central ingest / raw INSERT", 5, "central", r"^central / raw", ">=", 0.5, "",
         "the database statement equals raw; the gap is pydantic validation (6.5 ms per 500 summaries) and "
         "re-serialisation (2026-11-26)"),
    Goal("sync catch-up", 5, "sync", r"^catch-up of", ">=", 10_000, "summaries/s"),
    Goal("status API: GET /api/v1/machines p99", 6, "status", r"^GET /api/v1/machines \(.*, p99$", "<=", 50, "ms"),
    Goal("status API: GET / (the page) p99", 6, "status", r"^GET / \(the page\), p99", "<=", 50, "ms"),
    Goal("ingest with the page polled / not polled", 6, "status", r"^ingest polled / not polled", ">=", 0.95, "",
         "the polling's own CPU (2026-12-07): /api/v1/status about 1.1 ms, /api/v1/machines about 15 ms with all 500 "
         "rows changed since the previous poll, about 2 % of the agent's CPU at 10,000 readings/s; the per-run ratio "
         "spreads wider than that (0.86-1.14), so several runs' median decides"),
    Goal("dashboard fleet view p99", 10, "dashboard", r"^fleet, p99", "<=", 200, "ms"),
    Goal("dashboard 30-day machine view p99", 10, "dashboard", r"^machine 30 d, p99", "<=", 200, "ms"),
    Goal("start-up to ready", 9, "startup", r"^start-up to ready", "<=", 1.5, "s"),
    Goal("ingest with a shadow model / without", 17, "fleet", r"^shadow / without", ">=", 0.6, ""),
    Goal("notification latency, ingest → webhook request, p99", 18, "notify", r"→ webhook request, p99$", "<=",
         2000, "ms"),
    Goal("pdm-edge / the peer: sustained MQTT readings/s", 20, "peer", r"^pdm-edge's sustained rate / the peer's",
         ">=", 5, ""),
    Goal("central at fleet scale: summaries accepted per second", 21, "central_scale", r"^ingest kept up", ">=",
         16_700, "summaries/s", quote="CPU per summary accepted"),
    Goal("central at fleet scale: ingest p99 from the batch's scheduled time", 21, "central_scale",
         r"^ingest latency p99, from the batch's scheduled time", "<=", 500, "ms", quote="CPU per summary accepted"),
    Goal("central at fleet scale: fleet view p99", 21, "central_scale", r"^fleet view p99", "<=", 200, "ms",
         quote="CPU per summary accepted"),
    Goal("central at fleet scale: slowest ingest request during a partition drop", 21, "central_scale",
         r"^slowest ingest request during the partition drop", "<=", 1000, "ms", quote="CPU per summary accepted"),
    Goal("central at fleet scale, summaries on change (the default): accepted / offered", 21, "central_scale",
         r"^on change: ingest kept up: accepted / offered", ">=", 0.999, "", quote="CPU per summary accepted"),
    Goal("central at fleet scale, summaries on change: ingest p99 from the batch's scheduled time", 21,
         "central_scale", r"^on change: ingest latency p99, from the batch's scheduled time", "<=", 500, "ms",
         quote="CPU per summary accepted"),
    Goal("central at fleet scale, summaries on change: fleet view p99", 21, "central_scale",
         r"^on change: fleet view p99", "<=", 200, "ms", quote="CPU per summary accepted"),
    Goal("central at fleet scale, summaries on change: slowest ingest request during a partition drop", 21,
         "central_scale", r"^on change: slowest ingest request during the partition drop", "<=", 1000, "ms",
         quote="CPU per summary accepted"),
    Goal("ingest with notifications on / off", 18, "notify", r"^notifications on / off", ">=", 0.9, "",
         "cProfile of the API's main thread by CPU (2026-12-06, 302 batches of 500 summaries, 4 deliveries each): "
         "with the worker in the API process, its rounds (claim, mark, digests) and sends took about 2.1 of 24.8 s, "
         "the outbox rows in the ingest transaction 0.3 s; production now runs the worker in its own process "
         "(`pdm-central notify`), where it costs about 3.6 ms of CPU per batch outside the API"),
)
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def run_module(name: str, quick: bool) -> tuple[bool, float]:
    """Run bench.bench_NAME; (it succeeded, seconds)."""
    path = Path(__file__).resolve().parent / f"bench_{name}.py"
    if not path.exists():
        print(f"== bench {name}: {path.name} does not exist", file=sys.stderr)
        return False, 0.0
    print(f"== bench {name}{' --quick' if quick else ''}", file=sys.stderr, flush=True)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", f"bench.bench_{name}", *(["--quick"] if quick else [])],
                          check=False, cwd=report.ROOT, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    print(f"== bench {name}: {'ok' if done.returncode == 0 else f'FAILED (exit {done.returncode})'} in "
          f"{elapsed:.0f} s", file=sys.stderr, flush=True)
    return done.returncode == 0, elapsed


def row_median(section: str, pattern: str) -> float | None:
    """The median (first number of the second column) of the first table row whose figure matches `pattern`."""
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.search(pattern, cells[0]) and (number := NUMBER.search(cells[1])):
            return float(number[0].replace(",", ""))
    return None


def profile(goal: Goal, section: str) -> str:
    if goal.quote:
        for line in section.splitlines():
            if line.startswith(f"Profile: {goal.quote}"):
                return line.removeprefix("Profile: ").strip() + " (this run)"
    return goal.profile or "no profile recorded: see the section's figures"


def goals_block(found: dict[str, str]) -> tuple[str, list[Goal]]:
    rows, missed = [], []
    for goal in GOALS:
        value = row_median(found.get(goal.section, ""), goal.row)
        limit = f"{'≥' if goal.op == '>=' else '≤'} {goal.limit:,g} {goal.unit}".strip()
        if value is None:
            rows.append(f"| {goal.name} | {goal.issue} | {limit} | not measured | — |")
            continue
        met = value >= goal.limit if goal.op == ">=" else value <= goal.limit
        if not met:
            missed.append(goal)
        measured = f"{value:,g} {goal.unit}".strip()
        rows.append(f"| {goal.name} | {goal.issue} | {limit} | {measured} ([{goal.section}](#{goal.section})) | "
                    f"{'met' if met else '**missed**'} |")
    body = ("## Goals\n\nEvery benchmark goal of the issues, against the median of this file's run.\n\n"
            "| goal | issue | limit | measured | |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if missed:
        body += "\n\nWhere the time goes, for each missed goal:\n\n" + "\n".join(
            f"- **{goal.name}**: {profile(goal, found.get(goal.section, ''))}" for goal in missed)
    return body, missed


def machine_block(quick: bool, durations: dict[str, float], load: tuple[float, ...]) -> str:
    root = report.output_root()
    disk = report.filesystem(root)
    fsync = report.fsync_rate(root / ".bench" / "probe")
    timing = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in durations.items())
    only = f" --only {' '.join(durations)}" if len(durations) < len(MODULES) else ""
    return (f"Suite: `python -m bench{' --quick' if quick else ''}{only}` (`./scripts/bench.sh`), "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}, commit {report.git_commit()}"
            f"{'; the other sections are from earlier runs, each with its date' if only else ''}"
            f"{' — quick mode: one run each, small workloads; not figures to quote' if quick else ''}.\n\n"
            f"| machine | |\n|---|---|\n| CPU | {report.cpu_model()} |\n| cores | {os.cpu_count()} |\n"
            f"| memory | {report.memory_gib():.1f} GiB |\n| disk (the work folder) | {disk} |\n"
            f"| fsync of 4 KiB, same disk | {fsync:,.0f} /s |\n| versions | {report.versions(*PACKAGES)} |\n"
            f"| run time per bench | {timing or '—'} |\n"
            f"| load average (1 min), start / end of the suite | {' / '.join(f'{x:.2f}' for x in load)} on "
            f"{os.cpu_count()} cores |")


def plots_block() -> str:
    lines = [f"- [{title}](bench/plots/{name})" for name, title in PLOTS if (report.plots_dir() / name).exists()]
    return "## Plots\n\n" + ("\n".join(lines) if lines else "No plots yet: run `./scripts/bench.sh`.")


def assemble(quick: bool, durations: dict[str, float], load_at_start: float | None = None) -> list[Goal]:
    """Rewrite BENCHMARKS.md: title, machine, goals, plots, then every section in MODULES order (others after);
    what follows a block that is not a block of its own (notes, other tools' figures) stays after it."""
    path = report.benchmarks_path()
    text = path.read_text() if path.exists() else ""
    found, notes = report.sections(text), report.trailers(text)
    goals, missed = goals_block(found)
    load = (*([load_at_start] if load_at_start is not None else []), os.getloadavg()[0])
    head = {"machine": machine_block(quick, durations, load), "goals": goals, "plots": plots_block()}
    found |= {name: f"<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->" for name, body in head.items()}
    others = [name for name in found if name not in MODULES and name not in head]
    order = [*head, *(name for name in MODULES if name in found), *others]
    parts = ["\n\n".join(filter(None, (found[name], notes.get(name)))) for name in order]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.HEADER + "\n" + "\n\n".join(parts) + "\n")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run each, small workloads (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=MODULES, metavar="NAME",
                        help=f"run only these ({', '.join(MODULES)}); the file is still put together")
    args = parser.parse_args()
    durations, failed, load_at_start = {}, [], os.getloadavg()[0]
    for name in args.only or MODULES:
        ok, durations[name] = run_module(name, args.quick)
        if not ok:
            failed.append(name)
    from bench import plots  # matplotlib: only once the benches are done

    plots.draw()
    missed = assemble(args.quick, durations, load_at_start)
    print(f"== {report.benchmarks_path()}: {len(missed)} of {len(GOALS)} goals missed: "
          f"{'; '.join(g.name for g in missed) or 'none'}", file=sys.stderr)
    if failed:
        print(f"== FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
