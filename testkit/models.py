"""Candidate model packages for fleet tests and benchmarks.

- `derive_package`: the shipped package copied in a moment, the same ONNX graph under another version, optionally
  with other thresholds (a "worse" one: thresholds so low that nearly every reading is an alarm). For tests that
  need a bundle's bytes (signatures, tampering, kill -9 during a swap) or a unit-level shadow model.
- `train_package`: a really trained one, by `pdm-edge train` with few trees (seconds, not the shipped model's
  minute): another graph, whose states differ from the live model's on some readings. With `shuffled_labels`, trained
  on the data set with its label columns permuted: a model that learned nothing, the honest "worse" candidate.
  Needs the AI4I 2020 data set (the `ai4i_path` fixture) and the extra `train`.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from model.data import TARGETS
from model.package import SHIPPED

WORSE_THRESHOLDS = (0.00005, 0.0001)  # warning, alarm: nearly every reading alarms
CANDIDATE_TREES = 12  # of the failure forest (6 per mode): seconds of training (the shipped model has 30)
LABEL_COLUMNS = (*TARGETS.values(), "RNF")  # every failure label of the AI4I 2020 CSV, permuted together
SHUFFLE_SEED = 2020


def derive_package(folder: Path, version: str, thresholds: tuple[float, float] | None = None) -> Path:
    """A copy of the shipped package in `folder` with `version` and, if given, (warning, alarm) thresholds."""
    shutil.copytree(SHIPPED, folder)
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    manifest["version"] = version
    if thresholds is not None:
        warning, alarm = thresholds
        manifest["thresholds"] = dict(manifest["thresholds"], warning=warning, alarm=alarm)
        manifest["health"] = dict(manifest["health"], points=[[0.0, 100.0], [warning, 70.0], [alarm, 40.0],
                                                              [1.0, 0.0]])
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def train_package(folder: Path, version: str, data_path: Path, *, seed: int, trees: int = CANDIDATE_TREES,
                  shuffled_labels: bool = False) -> Path:
    """`pdm-edge train` of a package `folder`/package with `version`, `seed` and `trees`; with `shuffled_labels`,
    on `folder`/shuffled-labels.csv (written here, a scratch copy of the data set: never commit it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shuffled_labels:
        data_path = shuffle_labels(data_path, folder / "shuffled-labels.csv")
    out = folder / "package"
    pdm_edge = Path(sys.executable).with_name("pdm-edge")
    done = subprocess.run([str(pdm_edge), "train", "--data", str(data_path), "--out", str(out), "--seed", str(seed),
                           "--trees", str(trees), "--model-version", version],
                          capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"pdm-edge train failed ({done.returncode}): {done.stderr[-2000:]}")
    return out


def shuffle_labels(source: Path, target: Path, seed: int = SHUFFLE_SEED) -> Path:
    """A copy of the AI4I CSV whose rows keep their readings but get the labels of another row (one permutation of
    all label columns together, so each row's labels stay consistent: a mode implies a machine failure)."""
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    fieldnames = list(rows[0])
    labels = [{c: row[c] for c in LABEL_COLUMNS} for row in rows]
    random.Random(seed).shuffle(labels)
    with open(target, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, **label} for row, label in zip(rows, labels, strict=True))
    return target
