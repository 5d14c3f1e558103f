"""The model's inputs and the derived features, defined once.

The derived features are an ONNX graph. Training runs that same graph through onnxruntime to build its feature
matrix, so the features a model was trained on are bit-identical to the ones the shipped graph computes on the
gateway (MODEL_NOTES: float64 training features against float32 graph features disagreed on rows at the rule
boundaries). Each derived feature is rounded to the resolution of the sensors it comes from, so a reading that sits
exactly on a rule's boundary (a temperature difference of 8.6 K) is treated the same everywhere.

Building the graph needs the `onnx` package (extra `train`); the gateway only loads the exported file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

MACHINE_TYPES = ("L", "M", "H")
MACHINE_TYPE_INPUT = "machine_type"


@dataclass(frozen=True)
class InputSpec:
    name: str
    unit: str
    source_column: str  # the AI4I 2020 column it is read from
    resolution: float
    physical_range: tuple[float, float]  # outside it a reading is impossible: rejected
    description: str


INPUTS = (
    InputSpec("air_temperature", "K", "Air temperature [K]", 0.1, (233.15, 353.15),
              "ambient air temperature (-40 to 80 degC is physically plausible)"),
    InputSpec("process_temperature", "K", "Process temperature [K]", 0.1, (233.15, 423.15),
              "process temperature (-40 to 150 degC is physically plausible)"),
    InputSpec("rotational_speed", "rpm", "Rotational speed [rpm]", 1.0, (0.0, 10_000.0),
              "spindle speed"),
    InputSpec("torque", "Nm", "Torque [Nm]", 0.1, (0.0, 200.0), "spindle torque"),
    InputSpec("tool_wear", "min", "Tool wear [min]", 1.0, (0.0, 1_000.0), "minutes of use of the current tool"),
)
INPUT_NAMES = tuple(i.name for i in INPUTS)

# Overstrain limits of the data set's generating rules: tool wear x torque above 11,000 / 12,000 / 13,000 min*Nm
# for L / M / H. The graph computes the limit as OSF_LIMIT_BASE + OSF_LIMIT_STEP * type code.
OSF_LIMIT_BASE = 11_000.0
OSF_LIMIT_STEP = 1_000.0

DERIVED_FEATURES = (
    ("temperature_difference", "K", "process - air temperature, at 0.1 K"),
    ("power", "W", "torque x speed x 2 pi / 60, at 1 W"),
    ("strain", "min*Nm", "tool wear x torque, at 0.1 min*Nm"),
    ("strain_margin", "min*Nm", "strain minus the overstrain limit of the machine type"),
)
FEATURE_NAMES = ("machine_type_code", *INPUT_NAMES, *(name for name, _, _ in DERIVED_FEATURES))

READINGS = "readings"  # graph input: float32 [N, len(INPUTS)], columns in INPUTS order
FEATURES = "features"  # float32 [N, len(FEATURE_NAMES)]
OPSET = {"": 17, "ai.onnx.ml": 3}


def feature_graph() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto]]:
    """The nodes, constants and graph inputs that turn raw readings into FEATURES."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)

    constants = [
        const("ten", 10.0),
        const("rad_per_s", 2 * math.pi / 60),
        const("osf_base", OSF_LIMIT_BASE),
        const("osf_step", OSF_LIMIT_STEP),
        numpy_helper.from_array(np.ones(len(INPUTS), dtype=np.int64), "split_sizes"),
    ]
    air, process, speed, torque, wear = INPUT_NAMES
    node = helper.make_node
    nodes = [
        node("LabelEncoder", [MACHINE_TYPE_INPUT], ["type_code"], domain="ai.onnx.ml",
             keys_strings=list(MACHINE_TYPES), values_floats=[float(i) for i in range(len(MACHINE_TYPES))],
             default_float=-1.0),
        node("Split", [READINGS, "split_sizes"], list(INPUT_NAMES), axis=1),
        # temperature_difference = round((process - air) * 10) / 10
        node("Sub", [process, air], ["dt_raw"]),
        node("Mul", ["dt_raw", "ten"], ["dt_x10"]),
        node("Round", ["dt_x10"], ["dt_round"]),
        node("Div", ["dt_round", "ten"], ["temperature_difference"]),
        # power = round(torque * speed * 2 pi / 60)
        node("Mul", [torque, speed], ["torque_speed"]),
        node("Mul", ["torque_speed", "rad_per_s"], ["power_raw"]),
        node("Round", ["power_raw"], ["power"]),
        # strain = round(wear * torque * 10) / 10; strain_margin = strain - (base + step * type code)
        node("Mul", [wear, torque], ["strain_raw"]),
        node("Mul", ["strain_raw", "ten"], ["strain_x10"]),
        node("Round", ["strain_x10"], ["strain_round"]),
        node("Div", ["strain_round", "ten"], ["strain"]),
        node("Mul", ["type_code", "osf_step"], ["osf_step_type"]),
        node("Add", ["osf_step_type", "osf_base"], ["osf_limit"]),
        node("Sub", ["strain", "osf_limit"], ["strain_margin"]),
        node("Concat", ["type_code", READINGS, "temperature_difference", "power", "strain", "strain_margin"],
             [FEATURES], axis=1),
    ]
    inputs = [
        helper.make_tensor_value_info(READINGS, TensorProto.FLOAT, [None, len(INPUTS)]),
        helper.make_tensor_value_info(MACHINE_TYPE_INPUT, TensorProto.STRING, [None, 1]),
    ]
    return nodes, constants, inputs


def feature_model() -> onnx.ModelProto:
    """A standalone ONNX model that outputs FEATURES: what training runs to build its feature matrix."""
    from onnx import TensorProto, checker, helper

    nodes, constants, inputs = feature_graph()
    output = helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [None, len(FEATURE_NAMES)])
    graph = helper.make_graph(nodes, "pdm_features", inputs, [output], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSET.items()])
    checker.check_model(model, full_check=True)
    return model
