"""BENCHMARKS.md: one section per benchmark, each rewritten in place by its own command, with the machine it ran on.

Where it goes: the checkout by default (BENCHMARKS.md, bench/plots/, .bench/results/); under the folder named by
$PDM_BENCH_OUTPUT when set (the same layout below it), so a test or a trial run leaves the committed files alone.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_ENV = "PDM_BENCH_OUTPUT"
HEADER = "# Benchmarks\n\nEach section is written by the command it names; figures are medians of several runs.\n"
SECTION = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->.*?<!-- /bench:(?P=name) -->", re.DOTALL)


def output_root() -> Path:
    return Path(os.environ.get(OUTPUT_ENV) or ROOT)


def benchmarks_path() -> Path:
    return output_root() / "BENCHMARKS.md"


def plots_dir() -> Path:
    return output_root() / "bench" / "plots"


def results_dir() -> Path:
    """Raw samples a bench keeps for the plots (git-ignored under the checkout)."""
    return output_root() / ".bench" / "results"


def save_results(name: str, data: dict) -> None:
    results_dir().mkdir(parents=True, exist_ok=True)
    (results_dir() / f"{name}.json").write_text(json.dumps(data))


def load_results(name: str) -> dict | None:
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor() or "unknown CPU")


def memory_gib() -> float:
    return next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")) / 2**20


def machine() -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB, "
            f"{platform.system()} {platform.release()}")


def filesystem(path: Path) -> str:
    """Type, device and size of the filesystem holding `path` (the longest mount point above it)."""
    path = path.resolve()
    best = ("?", "?", "/")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, kind = line.split()[:3]
        if path.is_relative_to(mount) and len(mount) >= len(best[2]):
            best = (device, kind, mount)
    stat = os.statvfs(path)
    size, free = stat.f_blocks * stat.f_frsize / 2**30, stat.f_bavail * stat.f_frsize / 2**30
    return f"{best[1]} on {best[0]} mounted at {best[2]}, {size:,.0f} GiB ({free:,.0f} GiB free)"


def fsync_rate(folder: Path, seconds: float = 0.5) -> float:
    """4 KiB write + fsync per round, in `folder`: what bounds every synchronous=FULL commit."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fsync-probe-{os.getpid()}"
    block = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            done += 1
        return done / elapsed
    finally:
        os.close(fd)
        path.unlink()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], check=False, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def versions(*packages: str) -> str:
    found = []
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            pass
    return ", ".join([f"Python {platform.python_version()}", *found])


def median_spread(samples: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(samples))} ({fmt.format(min(samples))}–{fmt.format(max(samples))})"


def table(rows: list[tuple[str, str, str]]) -> str:
    """The three-column figure table every section uses: figure, median (min–max), goal."""
    return "| figure | median (min–max) | goal |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)


def replace_section(text: str, name: str, section: str) -> str:
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    return pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section


def write_block(name: str, body: str) -> None:
    """Replace (or append) the block `name` of BENCHMARKS.md: no heading of its own (the suite's header parts)."""
    path = benchmarks_path()
    text = path.read_text() if path.exists() else HEADER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, name, f"<!-- bench:{name} -->\n{body.strip()}\n<!-- /bench:{name} -->")
                    .rstrip() + "\n")


def write_section(name: str, command: str, body: str, packages: tuple[str, ...]) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    write_block(name, f"## {name}\n\n`{command}` — {stamp}\n\nMachine: {machine()}  \n"
                      f"Versions: {versions(*packages)}\n\n{body.strip()}")


def sections(text: str) -> dict[str, str]:
    """Every `<!-- bench:NAME -->` block of a BENCHMARKS.md text, by name, markers included."""
    return {match["name"]: match[0] for match in SECTION.finditer(text)}


def trailers(text: str) -> dict[str, str]:
    """What follows each block up to the next one (hand-written notes, other tools' blocks), by the block's name:
    the suite rewrites the blocks and keeps these where they stood."""
    matches = list(SECTION.finditer(text))
    ends = [m.start() for m in matches[1:]] + [len(text)]
    return {m["name"]: tail for m, end in zip(matches, ends, strict=True) if (tail := text[m.end():end].strip())}


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: [1] is the parent, [11:15] the CPU times in clock ticks."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, all its threads."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        return proc_stat(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None  # exited meanwhile: its time is in its parent's children's time once reaped


def live_processes() -> dict[int, list[str]]:
    """Every process alive now, by pid: its proc_stat fields."""
    return {int(p.name): stat for p in Path("/proc").iterdir() if p.name.isdigit()
            if (stat := _stat(int(p.name))) is not None}


def tree_cpu_seconds(root: int) -> float:
    """CPU time used so far by a process and all its descendants, live or exited and reaped (a server's workers and
    backends). Over an interval, a child alive at the start and reaped before the end counts whole."""
    parents = live_processes()
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, stat in parents.items() if int(stat[1]) == parent]
        tree.update(children)
        frontier.extend(children)
    return sum(sum(int(parents[pid][i]) for i in (11, 12, 13, 14)) for pid in tree if pid in parents) / os.sysconf(
        "SC_CLK_TCK")


def busy_cpu_seconds() -> float:
    """CPU time this machine's cores have spent busy (anything but idle and I/O wait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
