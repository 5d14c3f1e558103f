"""BENCHMARKS.md: one section per benchmark, each rewritten in place by its own command, with the machine it ran on."""

from __future__ import annotations

import os
import platform
import re
import statistics
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the command it names; figures are medians of several runs.\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {memory_kb / 2**20:.0f} GiB, {platform.system()} {platform.release()}"


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


def write_section(name: str, command: str, body: str, packages: tuple[str, ...]) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"<!-- bench:{name} -->\n## {name}\n\n`{command}` — {stamp}\n\n"
               f"Machine: {machine()}  \nVersions: {versions(*packages)}\n\n{body.strip()}\n<!-- /bench:{name} -->")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text.rstrip() + "\n")
