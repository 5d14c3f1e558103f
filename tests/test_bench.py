"""The benchmark suite: `python -m bench --quick` regenerates a whole BENCHMARKS.md — the machine, the goals met or
missed, the plots, and every bench's section with each figure next to the limit it is measured against."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, suite
from tests.scale import need_slow

ROOT = Path(__file__).resolve().parent.parent
# Every ratio the suite promises, by section: (figure of the limit, figure of the ratio).
RATIOS = {
    "model": ("raw onnxruntime session.run, same batch of 1,024", "ONNX throughput / raw onnxruntime"),
    "store": ("raw SQLite INSERT, 500 per transaction", "store / raw, 500 per transaction"),
    "startup": ("bare: import onnxruntime + InferenceSession", "agent RSS / bare"),
    "ingest": ("bare paho subscriber", "agent / bare subscriber"),
    "modbus": ("rate: bare AsyncModbusTcpClient loop", "rate: driver / bare"),
    "central": ("raw INSERT … ON CONFLICT DO NOTHING", "central / raw"),
    "sync": ("raw INSERT … ON CONFLICT DO NOTHING of the same rows", "catch-up / raw"),
    "notify": ("ingest, notifications off", "notifications on / off"),
}


def rows(section: str) -> dict[str, str]:
    """figure -> median (min–max), of the section's three-column table."""
    found = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) >= 2 and cells[0] not in ("figure", "---"):
            found[cells[0]] = cells[1]
    return found


def value(section: str, prefix: str) -> str:
    matches = [median for figure, median in rows(section).items() if figure.startswith(prefix)]
    assert matches, f"no row starting with {prefix!r} in:\n{section}"
    return matches[0]


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    need_slow("every benchmark in --quick, about 3 min")
    output = tmp_path_factory.mktemp("bench")
    committed = (ROOT / "BENCHMARKS.md").read_bytes()
    env = {**os.environ, report.OUTPUT_ENV: str(output)}
    run = subprocess.run([sys.executable, "-m", "bench", "--quick"], check=False, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert (ROOT / "BENCHMARKS.md").read_bytes() == committed, "--quick with PDM_BENCH_OUTPUT touched BENCHMARKS.md"
    return run, output


@pytest.mark.timeout(660)
def test_quick_suite_writes_every_section_with_its_limit_and_ratio(quick_suite):
    run, output = quick_suite
    assert run.returncode == 0, run.stderr[-4000:]
    found = report.sections((output / "BENCHMARKS.md").read_text())
    assert list(found)[:3] == ["machine", "goals", "plots"]
    assert [name for name in found if name in suite.MODULES] == list(suite.MODULES)
    for name, (limit, ratio) in RATIOS.items():
        assert re.match(r"[\d,.]+ \(", value(found[name], limit)), f"{name}: {limit}"
        assert re.match(r"\d+\.\d\d \(\d+\.\d\d–\d+\.\d\d\)", value(found[name], ratio)), f"{name}: {ratio}"
    assert re.match(r"\d\.\d\d \(", value(found["startup"], "start-up to ready"))


def test_the_header_names_the_machine_and_the_goals_table_every_goal(quick_suite):
    _, output = quick_suite
    found = report.sections((output / "BENCHMARKS.md").read_text())
    machine = found["machine"]
    for field in ("| CPU |", "| cores |", "| memory |", "| disk (the work folder) |", "| fsync of 4 KiB",
                  "| versions | Python 3."):
        assert field in machine
    assert re.search(r"commit [0-9a-f]{7,}", machine)
    goals = found["goals"]
    for goal in suite.GOALS:
        line = next((line for line in goals.splitlines() if line.startswith(f"| {goal.name} |")), None)
        assert line is not None, goal.name
        assert line.endswith(("| met |", "| **missed** |")), line  # its bench ran and its row was found
        if line.endswith("| **missed** |"):
            assert f"- **{goal.name}**: " in goals  # where the time goes


def test_the_peer_runs_side_by_side_and_the_plots_are_drawn_and_linked(quick_suite):
    _, output = quick_suite
    text = (output / "BENCHMARKS.md").read_text()
    peer = report.sections(text)["peer"]
    header = next(line for line in peer.splitlines() if line.startswith("| figure |"))
    if (report.ROOT / ".bench" / "peer-venv" / "bin" / "thingsboard-gateway").exists():
        assert "ThingsBoard IoT Gateway" in header
    else:
        assert ".bench/peer-venv does not exist" in peer
    assert "pdm-edge" in header
    for figure in ("sustained readings/s without loss", "CPU per reading", "RSS over the whole run",
                   "uplink down", "kill -9"):
        assert figure in peer
    for name, _ in suite.PLOTS:
        png = output / "bench" / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(bench/plots/{name})" in text


def test_a_goal_below_its_limit_is_missed_and_one_not_measured_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(report.OUTPUT_ENV, str(tmp_path))
    report.write_section("sync", "python -m bench.bench_sync", report.table([
        ("catch-up of 100 summaries", "9,500 (9,000–9,900) summaries/s", "≥ 10,000")]), ())
    report.write_section("startup", "python -m bench.bench_startup", report.table([
        ("start-up to ready (spawn → sd_notify READY=1)", "0.62 (0.60–0.64) s", "≤ 1.5")]), ())
    missed = suite.assemble(quick=True, durations={})
    goals = report.sections(report.benchmarks_path().read_text())["goals"]
    assert [goal.name for goal in missed] == ["sync catch-up"]
    assert "| sync catch-up | 5 | ≥ 10,000 summaries/s | 9,500 summaries/s ([sync](#sync)) | **missed** |" in goals
    assert "| start-up to ready | 9 | ≤ 1.5 s | 0.62 s ([startup](#startup)) | met |" in goals
    assert "| central ingest / raw INSERT | 5 | ≥ 0.5 | not measured | — |" in goals


def test_putting_the_file_together_keeps_notes_and_other_blocks_where_they_stood(tmp_path, monkeypatch):
    monkeypatch.setenv(report.OUTPUT_ENV, str(tmp_path))
    report.write_section("central", "python -m bench.bench_central", "central figures", ())
    report.write_section("sync", "python -m bench.bench_sync", "sync figures", ())
    suite.assemble(quick=True, durations={})
    path = report.benchmarks_path()
    text = path.read_text()
    note = "## Issue 20: what changed\n\nA hand-written note."
    deploy = "<!-- deploy:figures -->\n## deployment\n\nimage sizes\n<!-- /deploy:figures -->"
    text = text.replace("<!-- /bench:goals -->", f"<!-- /bench:goals -->\n\n{note}")
    path.write_text(text.replace("<!-- /bench:central -->", f"<!-- /bench:central -->\n\n{deploy}"))
    suite.assemble(quick=True, durations={})
    once = path.read_text()
    suite.assemble(quick=True, durations={})
    assert path.read_text().count(note) == 1 and path.read_text().count(deploy) == 1
    assert once.index("<!-- /bench:goals -->") < once.index(note) < once.index("<!-- bench:plots -->")
    assert once.index("<!-- /bench:central -->") < once.index(deploy) < once.index("<!-- bench:sync -->")


def test_every_bench_module_is_in_the_suite():
    files = {path.stem.removeprefix("bench_") for path in (ROOT / "bench").glob("bench_*.py")}
    assert files == set(suite.MODULES)
