"""Every calibrated tree classifier of the package as one ONNX TreeEnsembleRegressor node (extra `train`).

A sigmoid-calibrated classifier's probability is 1 / (1 + exp(a·s + b)), where s is the trees' score: for gradient
boosting its initial log-odds plus the learning rate times the sum of its trees' leaf values, for a random forest
the mean of its trees' leaf probabilities. A sum over trees followed by a logistic function is what
TreeEnsembleRegressor computes with post_transform LOGISTIC, so each leaf weight becomes -a times the leaf's share of
s, the base value -(a·s0 + b), and each classifier one output column of the same node. Converted one by one
(skl2onnx, used until 2026-12), each classifier and its calibration took a dozen small nodes, which dominated small
batches; skl2onnx is no longer a dependency.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class Tree:
    """One fitted scikit-learn tree and how much each of its leaves adds to the target's score."""

    structure: Any  # sklearn.tree._tree.Tree
    leaf_score: np.ndarray  # float64 [nodes]: the leaf's share of the score s (unused for split nodes)


def trees_and_base(calibrated: Any, n_features: int) -> tuple[list[Tree], float, float, float]:
    """(trees, s0, a, b) of a fitted CalibratedClassifierCV(method="sigmoid", ensemble=False) of a binary
    GradientBoostingClassifier or RandomForestClassifier: its probability is 1 / (1 + exp(a·(s0 + Σ leaf) + b))."""
    (fitted,) = calibrated.calibrated_classifiers_
    (calibrator,) = fitted.calibrators
    model = fitted.estimator
    if hasattr(model, "learning_rate"):  # gradient boosting: s = init log-odds + learning rate x sum of leaf values
        trees = [Tree(t.tree_, model.learning_rate * t.tree_.value[:, 0, 0]) for t in model.estimators_[:, 0]]
        zero = np.zeros((1, n_features), dtype=np.float32)
        base = float(model.decision_function(zero)[0]) - sum(float(t.predict(zero)[0]) for t in model.estimators_[:, 0]
                                                           ) * model.learning_rate
    else:  # random forest: s = mean over trees of the leaf's share of the positive class
        count = len(model.estimators_)
        trees = [Tree(t.tree_, _positive_share(t.tree_.value) / count) for t in model.estimators_]
        base = 0.0
    # a and b at float32, as a calibration graph holds them: the optimiser that fits them ends a few units of the 9th
    # digit apart on another BLAS kernel, which would move the last bit of hundreds of leaf weights (and the file's
    # sha256); rounded first, the leaf weights move only if a or b itself crosses a float32 boundary.
    return trees, base, float(np.float32(calibrator.a_)), float(np.float32(calibrator.b_))


def _positive_share(value: np.ndarray) -> np.ndarray:
    totals = value[:, 0, :].sum(axis=1)
    return np.asarray(np.divide(value[:, 0, 1], totals, out=np.zeros_like(totals), where=totals > 0))


def _at_or_below(threshold: float) -> np.float32:
    """The largest float32 at or below a float64 split threshold: for a float32 feature x, x <= it exactly when
    x <= the threshold, so the graph takes every branch scikit-learn takes."""
    rounded = np.float32(threshold)
    return rounded if float(rounded) <= threshold else np.nextafter(rounded, np.float32(-np.inf))


def ensemble_node(classifiers: list[Any], features: str, output: str, n_features: int) -> onnx.NodeProto:
    """One TreeEnsembleRegressor: features float32 [N, n_features] -> output float32 [N, len(classifiers)], column j
    the calibrated probability of classifiers[j]."""
    from onnx import helper

    nodes: dict[str, list[Any]] = defaultdict(list)
    targets: dict[str, list[Any]] = defaultdict(list)
    bases = []
    tree_id = 0
    for column, calibrated in enumerate(classifiers):
        trees, base, a, b = trees_and_base(calibrated, n_features)
        bases.append(-(a * base + b))
        for tree in trees:
            _add_tree(nodes, targets, tree, tree_id, column, -a)
            tree_id += 1
    attributes: dict[str, Any] = {"n_targets": len(classifiers), "aggregate_function": "SUM",
                                  "post_transform": "LOGISTIC", "base_values": bases, **nodes, **targets}
    return helper.make_node("TreeEnsembleRegressor", [features], [output], domain="ai.onnx.ml", **attributes)


def _add_tree(nodes: dict[str, list[Any]], targets: dict[str, list[Any]], tree: Tree, tree_id: int, column: int,
              scale: float) -> None:
    t = tree.structure
    for node in range(t.node_count):
        leaf = t.children_left[node] == -1
        nodes["nodes_treeids"].append(tree_id)
        nodes["nodes_nodeids"].append(node)
        nodes["nodes_modes"].append("LEAF" if leaf else "BRANCH_LEQ")
        nodes["nodes_featureids"].append(0 if leaf else int(t.feature[node]))
        nodes["nodes_values"].append(0.0 if leaf else float(_at_or_below(float(t.threshold[node]))))
        nodes["nodes_truenodeids"].append(0 if leaf else int(t.children_left[node]))
        nodes["nodes_falsenodeids"].append(0 if leaf else int(t.children_right[node]))
        if leaf:
            targets["target_treeids"].append(tree_id)
            targets["target_nodeids"].append(node)
            targets["target_ids"].append(column)
            targets["target_weights"].append(scale * float(tree.leaf_score[node]))
