"""Metrics of a model package on AI4I 2020, recomputed from the ONNX file itself (extra `train`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from model.data import Dataset
from model.manifest import Thresholds
from model.package import Model
from model.precision import METRIC_DECIMALS

MAX_FALSE_POSITIVE_RATE = 0.01


def _r(value: float) -> float:
    return round(float(value), METRIC_DECIMALS)


def _at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    from sklearn.metrics import f1_score, precision_score, recall_score

    flagged = p >= threshold
    return {
        "threshold": threshold,
        "precision": _r(precision_score(y, flagged, zero_division=0)),
        "recall": _r(recall_score(y, flagged, zero_division=0)),
        "f1": _r(f1_score(y, flagged, zero_division=0)),
        "false_positive_rate": _r(flagged[y == 0].mean()),
    }


def _ranking(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    return {
        "roc_auc": _r(roc_auc_score(y, p)),
        "pr_auc": _r(average_precision_score(y, p)),
        "recall_at_1pct_fpr": _r(tpr[fpr <= MAX_FALSE_POSITIVE_RATE].max()),
    }


def evaluate(model: Model, dataset: Dataset, index: np.ndarray) -> dict[str, Any]:
    """Ranking and threshold metrics of machine failure and of each mode on dataset rows `index`."""
    p_failure, p_mode = model.predict(dataset.readings[index], dataset.machine_types[index])
    thresholds = model.manifest.thresholds
    y = dataset.labels["failure"][index]
    modes = {}
    for column, mode in enumerate(model.manifest.outputs.modes):
        y_mode = dataset.labels[mode][index]
        modes[mode] = {"positives": int(y_mode.sum()), **_ranking(y_mode, p_mode[:, column]),
                       "at_threshold": _at_threshold(y_mode, p_mode[:, column], thresholds.modes[mode])}
    return {
        "rows": len(index),
        "failures": int(y.sum()),
        "failure": {
            **_ranking(y, p_failure),
            "alarm": _at_threshold(y, p_failure, thresholds.alarm),
            "healthy_in_warning_or_alarm": _r((p_failure[y == 0] >= thresholds.warning).mean()),
        },
        "modes": modes,
    }


def out_of_fold_summary(y: np.ndarray, p: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """What the thresholds were chosen on: their precision and reach on out-of-fold training predictions."""
    return {
        "rows": len(y),
        "failures": int(y.sum()),
        **_ranking(y, p),
        "alarm": _at_threshold(y, p, thresholds.alarm),
        "healthy_in_warning_or_alarm": _r((p[y == 0] >= thresholds.warning).mean()),
    }
