"""Load a model package: verify the ONNX file against its manifest, then run it with onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from model.manifest import Manifest, PackageError

SHIPPED = Path(__file__).resolve().parent / "shipped"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Model:
    """A verified model package and its onnxruntime session. predict() is safe to call from one thread at a time."""

    def __init__(self, package: Path, manifest: Manifest, session) -> None:
        self.package = package
        self.manifest = manifest
        self._session = session
        self._outputs = [manifest.outputs.p_failure, manifest.outputs.p_mode]
        self._readings_input = manifest.onnx.inputs.readings
        self._type_input = manifest.onnx.inputs.machine_type

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.onnx.sha256

    def predict(self, readings: np.ndarray, machine_types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """readings float32 [N, inputs], machine_types object [N, 1] -> (p_failure [N], p_mode [N, modes])."""
        p_failure, p_mode = self._session.run(
            self._outputs, {self._readings_input: readings, self._type_input: machine_types}
        )
        return p_failure, p_mode


def load(package: Path = SHIPPED, threads: int = 1) -> Model:
    """Verify and load a package; PackageError says what is wrong with it."""
    import onnxruntime as ort

    package = Path(package)
    manifest = Manifest.load(package)
    onnx_path = package / manifest.onnx.file
    if not onnx_path.is_file():
        raise PackageError(f"{onnx_path} is missing")
    actual = sha256_of(onnx_path)
    if actual != manifest.onnx.sha256:
        raise PackageError(
            f"{onnx_path} has sha256 {actual}, but the manifest says {manifest.onnx.sha256}: "
            "the file was changed or belongs to another package"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for unloadable graphs
        raise PackageError(f"onnxruntime cannot load {onnx_path}: {exc}") from exc
    _check_graph(session, manifest, onnx_path)
    return Model(package, manifest, session)


def _check_graph(session, manifest: Manifest, onnx_path: Path) -> None:
    expected_inputs = {
        manifest.onnx.inputs.readings: ("tensor(float)", len(manifest.inputs)),
        manifest.onnx.inputs.machine_type: ("tensor(string)", 1),
    }
    actual_inputs = {i.name: (i.type, i.shape[-1] if i.shape else None) for i in session.get_inputs()}
    if actual_inputs != expected_inputs:
        raise PackageError(f"{onnx_path} takes inputs {actual_inputs}, but the manifest declares {expected_inputs}")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    want = {manifest.outputs.p_failure: 1, manifest.outputs.p_mode: 2}
    if {name: len(shape) for name, shape in outputs.items() if name in want} != want:
        raise PackageError(f"{onnx_path} has outputs {outputs}, but the manifest declares {sorted(want)}")
    if outputs[manifest.outputs.p_mode][-1] not in (len(manifest.outputs.modes), None):
        raise PackageError(f"{onnx_path} outputs risks of {outputs[manifest.outputs.p_mode][-1]} modes, "
                           f"the manifest names {len(manifest.outputs.modes)}")
