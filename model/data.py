"""The AI4I 2020 predictive-maintenance data set (UCI, CC BY 4.0), read from a path; never shipped."""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.features import INPUTS
from model.modes import MODES

NAME = "AI4I 2020 Predictive Maintenance Dataset"
SHA256 = "ec4ed737b27c4e65730e3b875626ddb4db005d79733f0fc1f59d72db467cd670"
LICENSE = "CC BY 4.0"
SOURCE = "https://archive.ics.uci.edu/dataset/601"
FILE_NAME = "ai4i2020.csv"
PUBLISHER = "the UCI Machine Learning Repository"
TYPE_COLUMN = "Type"
TARGETS = {"failure": "Machine failure", **{mode: mode for mode in MODES}}  # label -> its column
DATA_ENV = "PDM_AI4I_CSV"
DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ai4i2020.csv"


@dataclass(frozen=True)
class Dataset:
    readings: np.ndarray  # float32 [N, len(INPUTS)]
    machine_types: np.ndarray  # object [N, 1] of "L" | "M" | "H"
    labels: dict[str, np.ndarray]  # int8 [N] per TARGETS key
    sha256: str

    def __len__(self) -> int:
        return len(self.readings)


def default_path() -> Path:
    """The data set's path: $PDM_AI4I_CSV, else ../shared/data/ai4i2020.csv beside the checkout."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_PATH)


def where_to_get_it() -> str:
    """One sentence for a user without the file: what it is, where it is published, how to check it."""
    return (f'the "{NAME}" from {PUBLISHER}, file {FILE_NAME} ({LICENSE}, sha256 {SHA256}); put it at '
            f"../shared/data/{FILE_NAME} beside the checkout or set {DATA_ENV} to its path")


def load(path: Path) -> Dataset:
    raw = Path(path).read_bytes()
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    missing = {i.source_column for i in INPUTS} | {TYPE_COLUMN, *TARGETS.values()}
    missing -= set(rows[0]) if rows else set()
    if missing:
        raise ValueError(f"{path} lacks the AI4I 2020 columns {sorted(missing)}")
    readings = np.array([[float(r[i.source_column]) for i in INPUTS] for r in rows], dtype=np.float32)
    machine_types = np.array([[r[TYPE_COLUMN]] for r in rows], dtype=object)
    labels = {key: np.array([int(r[column]) for r in rows], dtype=np.int8) for key, column in TARGETS.items()}
    return Dataset(readings, machine_types, labels, hashlib.sha256(raw).hexdigest())


def split(dataset: Dataset, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The stratified 80/20 split every figure is measured on: (train indices, test indices)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(dataset))
    train, test = train_test_split(index, test_size=0.2, stratify=dataset.labels["failure"], random_state=seed)
    return np.sort(train), np.sort(test)
