"""Train the failure model on AI4I 2020 and export a model package (extra `train`).

One calibrated classifier per target: machine failure (random forest) and each failure mode TWF, HDF, PWF, OSF
(gradient boosting), all on the derived features of model.features, exported as one ONNX graph that takes raw
readings. Every threshold is chosen on out-of-fold predictions of the training part; the test part is touched
only to report the metrics.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np

from model import data, ensemble, evaluate, features
from model.features import FEATURE_NAMES, FEATURES, INPUTS, MACHINE_TYPE_INPUT, OPSET, READINGS
from model.manifest import (
    Dataset,
    GraphInputs,
    Health,
    Input,
    MachineType,
    Manifest,
    OnnxFile,
    Outputs,
    Range,
    Thresholds,
    Training,
)
from model.modes import MODES
from model.package import load, sha256_of
from model.precision import THRESHOLD_DIGITS, threshold_above, threshold_at_or_below

NAME = "ai4i-failure"
VERSION = "1.0.0"
SEED = 42  # of the split, the folds and the estimators; `pdm-edge train --seed` picks another
TREES = 30  # of the failure forest, each mode half as many; `pdm-edge train --trees` another (fewer: quicker, weaker)
FOLDS = 5
ALARM_MIN_PRECISION = 0.90  # on out-of-fold predictions: at most one false alarm in ten
MODE_MIN_PRECISION = 0.50  # a mode's risk flag: at least one flagged reading in two really fails that way
MODE_BETA = 2.0  # a missed failure mode costs more than an inspection: weigh recall higher for mode flags
WARNING_MAX_HEALTHY = 0.02  # share of healthy out-of-fold readings allowed at or above the warning threshold
HEALTH_AT_WARNING = 70.0
HEALTH_AT_ALARM = 40.0
P_FAILURE, P_MODE = "p_failure", "p_mode"
TRAINING_PACKAGES = ("scikit-learn", "onnx", "onnxruntime", "numpy", "scipy")  # recorded in the manifest


def mode_trees(trees: int) -> int:
    """Trees of each mode's gradient boosting for a failure forest of `trees`: half as many. Out of fold (2026-12-07),
    15 against 30 trees: the same mode flags (PWF and OSF F1 0.994 both; HDF 0.920 against 0.925, PR-AUC 0.985
    against 0.990) at half the mode trees' share of the graph's scoring time."""
    return max(1, trees // 2)


def estimators(trees: int = TREES) -> dict[str, str]:
    """What `estimator` makes per target, as the manifest records it."""
    return {
        "failure": f"RandomForestClassifier(n_estimators={trees}, max_depth=12, min_samples_leaf=10), "
                   "sigmoid-calibrated",
        **{m: f"GradientBoostingClassifier(n_estimators={mode_trees(trees)}, max_depth=4, learning_rate=0.15, "
              "min_samples_leaf=20), sigmoid-calibrated" for m in MODES},
    }


def estimator(target: str, seed: int = SEED, trees: int = TREES) -> Any:  # an unfitted scikit-learn classifier
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

    if target == "failure":
        # Sizes chosen on out-of-fold ROC-AUC and scoring speed (BENCHMARKS.md), never on the test part: 30 trees
        # with leaves of at least 10 readings (and 30-tree mode models, since halved: mode_trees) reach 0.983 out of
        # fold where 60 trees with leaves of 1 reached 0.978, at twice the rows per second. Those leaves also grade
        # the risk of a machine drifting towards a rule's boundary (warning before alarm, tests/test_demo.py), which
        # 30 trees with single-reading leaves did not, nor gradient boosting (as good out of fold, but from ok
        # straight to alarm). One job: a parallel predict_proba adds the trees' votes in whatever order the threads
        # finish, so the last bits of the calibration (and the shipped ONNX) changed from run to run on a busy machine.
        return RandomForestClassifier(n_estimators=trees, max_depth=12, min_samples_leaf=10, random_state=seed,
                                      n_jobs=1)
    # Leaves of at least 20 readings: the HDF labels of readings exactly at the rule's 8.6 K boundary are float
    # rounding noise of the data's generator, which a small leaf would learn (MODEL_NOTES).
    return GradientBoostingClassifier(n_estimators=mode_trees(trees), max_depth=4, learning_rate=0.15,
                                      min_samples_leaf=20, random_state=seed)


def compute_features(readings: np.ndarray, machine_types: np.ndarray) -> np.ndarray:
    """The feature matrix, computed by the very graph that ships (see model.features)."""
    import onnxruntime as ort

    session = ort.InferenceSession(features.feature_model().SerializeToString(), providers=["CPUExecutionProvider"])
    (x,) = session.run([FEATURES], {READINGS: readings, MACHINE_TYPE_INPUT: machine_types})
    return np.asarray(x)


def fit_calibrated(base: Any, x: np.ndarray, y: np.ndarray, seed: int = SEED) -> tuple[Any, np.ndarray]:
    """(base fitted on all of x and sigmoid-calibrated on out-of-fold scores, those out-of-fold probabilities)."""
    from sklearn.base import clone
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    model = CalibratedClassifierCV(base, method="sigmoid", cv=folds, ensemble=False).fit(x, y)
    # The same folds and seed as the calibration's own cross-validation, so these are the scores it was fitted on.
    method = "decision_function" if hasattr(base, "decision_function") else "predict_proba"
    raw = cross_val_predict(clone(base), x, y, cv=folds, method=method)
    raw = raw[:, 1] if raw.ndim == 2 else raw
    return model, model.calibrated_classifiers_[0].calibrators[0].predict(raw)


def best_threshold(y: np.ndarray, p: np.ndarray, min_precision: float, beta: float = 1.0,
                   above: float = -np.inf) -> float:
    """The threshold of best F-beta among those above `above` with precision >= min_precision (if none has, of best
    F-beta above `above`), at the manifest's precision (model.precision): it flags the same out-of-fold readings as
    the exact one."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]
    b2 = beta * beta
    f = (1 + b2) * precision * recall / np.maximum(b2 * precision + recall, 1e-12)
    high = thresholds > above
    if not high.any():
        raise ValueError(f"no out-of-fold probability above {above}: the model separates nothing")
    allowed = high & (precision >= min_precision)
    chosen = float(thresholds[np.argmax(np.where(allowed if allowed.any() else high, f, -1.0))])
    unflagged = p[p < chosen]
    return threshold_at_or_below(chosen, float(unflagged.max()) if unflagged.size else 0.0)


def warning_threshold(y: np.ndarray, p: np.ndarray, max_healthy: float = WARNING_MAX_HEALTHY) -> float:
    """The lowest threshold at the manifest's precision that puts at most max_healthy of the healthy readings at or
    above it (and flags the same out-of-fold readings as the lowest exact one)."""
    healthy = np.sort(p[y == 0])
    allowed = int(np.floor(max_healthy * len(healthy)))
    highest_unflagged = float(healthy[len(healthy) - allowed - 1])
    flagged = p[p > highest_unflagged]
    return threshold_above(highest_unflagged, float(flagged.min()) if flagged.size else 1.0)


def export(models: dict[str, Any], version: str = VERSION) -> bytes:
    """One ONNX graph: raw readings -> features -> every calibrated classifier in one tree-ensemble node (see
    model.ensemble) -> p_failure, p_mode."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, constants, inputs = features.feature_graph()
    constants += [numpy_helper.from_array(np.array(0, dtype=np.int64), "failure_column"),
                  numpy_helper.from_array(np.array([1], dtype=np.int64), "modes_start"),
                  numpy_helper.from_array(np.array([1 + len(MODES)], dtype=np.int64), "modes_end"),
                  numpy_helper.from_array(np.array([1], dtype=np.int64), "column_axis")]
    targets = ["failure", *MODES]
    nodes += [
        ensemble.ensemble_node([models[t] for t in targets], FEATURES, "probabilities", len(FEATURE_NAMES)),
        helper.make_node("Gather", ["probabilities", "failure_column"], [P_FAILURE], axis=1),
        helper.make_node("Slice", ["probabilities", "modes_start", "modes_end", "column_axis"], [P_MODE]),
    ]
    outputs = [
        helper.make_tensor_value_info(P_FAILURE, TensorProto.FLOAT, [None]),
        helper.make_tensor_value_info(P_MODE, TensorProto.FLOAT, [None, len(MODES)]),
    ]
    graph = helper.make_graph(nodes, NAME, inputs, outputs, constants)
    graph.doc_string = f"p_failure and the risk of {', '.join(MODES)} from raw AI4I-style readings"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(OPSET.items())],
                              producer_name="pdm-edge", model_version=1)
    helper.set_model_props(model, {"name": NAME, "version": version})
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


@dataclass(frozen=True)
class Fitted:
    dataset: data.Dataset
    features: np.ndarray  # of every row of the data set
    train_idx: np.ndarray
    test_idx: np.ndarray
    models: dict[str, Any]  # target -> calibrated classifier
    out_of_fold: dict[str, np.ndarray]  # target -> calibrated out-of-fold probabilities on the training part
    thresholds: Thresholds
    seed: int  # of the split, the folds and the estimators
    trees: int  # of the failure forest (each mode: mode_trees)


def fit(dataset: data.Dataset, log: Callable[[str], object] = print, *, seed: int = SEED,
        trees: int = TREES) -> Fitted:
    """Fit one calibrated classifier per target on the training part and choose the thresholds. The defaults make
    the shipped package; another seed or size makes another model of the same kind (a candidate to roll out)."""
    x = compute_features(dataset.readings, dataset.machine_types)
    train_idx, test_idx = data.split(dataset, seed)
    models, out_of_fold = {}, {}
    for target in data.TARGETS:
        y = dataset.labels[target][train_idx]
        models[target], out_of_fold[target] = fit_calibrated(estimator(target, seed, trees), x[train_idx], y, seed)
        log(f"trained {target}: {int(y.sum())} positives in {len(y)} training rows")
    labels = {target: dataset.labels[target][train_idx] for target in data.TARGETS}
    return Fitted(dataset, x, train_idx, test_idx, models, out_of_fold, choose_thresholds(labels, out_of_fold),
                  seed, trees)


def choose_thresholds(labels: dict[str, np.ndarray], out_of_fold: dict[str, np.ndarray]) -> Thresholds:
    """The warning, alarm and mode thresholds from the training part's labels and out-of-fold probabilities. The
    alarm is above the warning threshold: it always is for a model that reaches the alarm's precision; one that
    learned little (trained on shuffled labels, say) has its best F1 lower, and that is no alarm."""
    y, p = labels["failure"], out_of_fold["failure"]
    warning = warning_threshold(y, p)
    alarm = best_threshold(y, p, ALARM_MIN_PRECISION, above=warning)
    modes = {m: best_threshold(labels[m], out_of_fold[m], MODE_MIN_PRECISION, MODE_BETA) for m in MODES}
    short = [m for m in MODES if _precision(labels[m], out_of_fold[m], modes[m]) < MODE_MIN_PRECISION]
    return Thresholds(warning=warning, alarm=alarm, modes=modes,
                      method=_method(_precision(y, p, alarm) < ALARM_MIN_PRECISION, short))


def _precision(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    flagged = y[p >= threshold]
    return float(flagged.mean()) if flagged.size else 0.0


def _method(alarm_short: bool, modes_short: list[str]) -> str:
    """How the thresholds were chosen, and which of them could not reach their precision."""
    alarm = " (it reaches none: best F1 above the warning threshold)" if alarm_short else ""
    modes = f" ({', '.join(modes_short)} reach{'es' if len(modes_short) == 1 else ''} none: best " \
            f"F{MODE_BETA:g})" if modes_short else ""
    return (
        f"On out-of-fold ({FOLDS}-fold) calibrated probabilities of the training part only. alarm: best F1 "
        f"among thresholds with precision >= {ALARM_MIN_PRECISION}{alarm}; warning: the lowest threshold with at "
        f"most {WARNING_MAX_HEALTHY:.0%} of healthy readings at or above it; each mode: best F{MODE_BETA:g} among "
        f"thresholds with precision >= {MODE_MIN_PRECISION}{modes}. Each at {THRESHOLD_DIGITS} significant digits, "
        f"rounded so that it flags the same out-of-fold readings."
    )


def train(data_path: Path, out_dir: Path, command: str, log: Callable[[str], object] = print, *, seed: int = SEED,
          trees: int = TREES, version: str = VERSION) -> Manifest:
    """Train, export and evaluate; writes out_dir/model.onnx and out_dir/manifest.json."""
    fitted = fit(data.load(data_path), log, seed=seed, trees=trees)
    write_package(fitted, Path(out_dir), command, version)
    return Manifest.load(out_dir)


def write_package(fitted: Fitted, out_dir: Path, command: str, version: str = VERSION) -> None:
    """Export the ONNX graph, evaluate it on the test part, write both files (the folder never holds a mix)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".train-", dir=out_dir.parent))
    try:
        (stage / "model.onnx").write_bytes(export(fitted.models, version))
        manifest = _manifest(fitted, command, sha256_of(stage / "model.onnx"), version)
        manifest.write(stage)
        y_failure = fitted.dataset.labels["failure"][fitted.train_idx]
        metrics = {
            "split": {"train_rows": len(fitted.train_idx), "test_rows": len(fitted.test_idx)},
            "out_of_fold": evaluate.out_of_fold_summary(y_failure, fitted.out_of_fold["failure"], fitted.thresholds),
            "test": evaluate.evaluate(load(stage), fitted.dataset, fitted.test_idx),
        }
        manifest.model_copy(update={"metrics": metrics}).write(stage)
        for name in ("model.onnx", "manifest.json"):
            (stage / name).replace(out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _manifest(fitted: Fitted, command: str, onnx_sha256: str, version: str) -> Manifest:
    columns = {name: i for i, name in enumerate(FEATURE_NAMES)}
    x_train, thresholds, dataset = fitted.features[fitted.train_idx], fitted.thresholds, fitted.dataset
    return Manifest(
        name=NAME,
        version=version,
        description=(
            "Probability of machine failure within the AI4I 2020 failure modes, and the risk of each mode "
            "(TWF tool wear, HDF heat dissipation, PWF power, OSF overstrain), from one reading of a milling machine."
        ),
        onnx=OnnxFile(file="model.onnx", sha256=onnx_sha256,
                      inputs=GraphInputs(readings=READINGS, machine_type=MACHINE_TYPE_INPUT), opset=OPSET),
        inputs=tuple(
            Input(
                name=i.name, unit=i.unit, source_column=i.source_column, resolution=i.resolution,
                physical_range=Range(min=i.physical_range[0], max=i.physical_range[1]),
                training_range=Range(min=float(x_train[:, columns[i.name]].min()),
                                     max=float(x_train[:, columns[i.name]].max())),
                description=i.description,
            )
            for i in INPUTS
        ),
        machine_type=MachineType(name=MACHINE_TYPE_INPUT, values=features.MACHINE_TYPES,
                                 source_column=data.TYPE_COLUMN),
        outputs=Outputs(p_failure=P_FAILURE, p_mode=P_MODE, modes=MODES),
        thresholds=thresholds,
        health=Health(
            points=((0.0, 100.0), (thresholds.warning, HEALTH_AT_WARNING), (thresholds.alarm, HEALTH_AT_ALARM),
                    (1.0, 0.0)),
            description=(
                f"Linear between the points: 100 at p_failure 0, {HEALTH_AT_WARNING:.0f} at the warning threshold, "
                f"{HEALTH_AT_ALARM:.0f} at the alarm threshold, 0 at 1; so health below {HEALTH_AT_WARNING:.0f} "
                f"always means warning and below {HEALTH_AT_ALARM:.0f} always means alarm."
            ),
        ),
        metrics={},
        dataset=Dataset(name=data.NAME, sha256=dataset.sha256, rows=len(dataset), license=data.LICENSE,
                        source=data.SOURCE),
        training=Training(
            command=command,
            seed=fitted.seed,
            split=f"stratified on machine failure, 80/20, random_state={fitted.seed}",
            estimators=estimators(fitted.trees),
            derived_features={name: text for name, _, text in features.DERIVED_FEATURES},
            versions={"python": platform.python_version(), **{p: installed_version(p) for p in TRAINING_PACKAGES}},
        ),
    )
