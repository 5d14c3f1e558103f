"""Load a model package: read its files once, verify the ONNX bytes against the manifest, run them with onnxruntime.

What is verified is exactly what runs: each file is opened once (a plain file name in the package folder, never
through a symlink), read into memory, hashed, and those same bytes are parsed (the manifest) or handed to
onnxruntime (the graph). Nothing is reopened by path after it was hashed, so a file swapped meanwhile cannot slip in.

The package digest names the package as a whole, manifest included (thresholds, health map, input ranges are as much
the model as the graph): sha256(sha256(manifest.json's bytes) || sha256(the ONNX file's bytes)), hex, over the two
32-byte digests. The agent reports it in /api/v1/status and in every summary and event it sends; signatures over the
manifest bytes (`Model.manifest_bytes`) can build on the same read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.manifest import MANIFEST_FILE, Described, Manifest, PackageError

if TYPE_CHECKING:
    from onnxruntime import InferenceSession  # untyped: Any to mypy

SHIPPED = Path(__file__).resolve().parent / "shipped"
MAX_FILE_BYTES = 512 * 2**20  # a package file read into memory; the shipped graph is well under 1 MiB


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_digest(manifest_bytes: bytes, onnx_bytes: bytes) -> str:
    """The package digest (see the module docstring)."""
    parts = hashlib.sha256(manifest_bytes).digest() + hashlib.sha256(onnx_bytes).digest()
    return hashlib.sha256(parts).hexdigest()


def read_package_file(package: Path, name: str) -> bytes:
    """The bytes of the regular file `name` in `package`, read once; PackageError for a path, a symlink or
    anything but a regular file."""
    path = package / name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise PackageError(f"{name!r} is not a plain file name in {package}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise PackageError(f"{path} is missing") from exc
        if exc.errno == errno.ELOOP:
            raise PackageError(f"{path} is a symlink: a package holds its files itself") from exc
        raise PackageError(f"cannot read {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PackageError(f"{path} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise PackageError(f"{path} is {info.st_size} bytes, more than a package file may be "
                               f"({MAX_FILE_BYTES} bytes)")
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise PackageError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise PackageError(f"{path} grew past {MAX_FILE_BYTES} bytes while it was read")
    return data


class Model(Described):
    """A verified model package and its onnxruntime session. predict() is safe to call from one thread at a time."""

    def __init__(self, package: Path, manifest: Manifest, session: InferenceSession, manifest_bytes: bytes = b"",
                 package_digest: str = "") -> None:
        self.package = package
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes  # exactly what was parsed and hashed: what a signature will cover
        self.package_digest = package_digest
        self._session = session
        self._outputs = [manifest.outputs.p_failure, manifest.outputs.p_mode]
        self._readings_input = manifest.onnx.inputs.readings
        self._type_input = manifest.onnx.inputs.machine_type

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
    manifest_bytes = read_package_file(package, MANIFEST_FILE)
    manifest = Manifest.parse(manifest_bytes, package / MANIFEST_FILE)
    onnx_path = package / manifest.onnx.file
    onnx_bytes = read_package_file(package, manifest.onnx.file)
    actual = hashlib.sha256(onnx_bytes).hexdigest()
    if actual != manifest.onnx.sha256:
        raise PackageError(
            f"{onnx_path} has sha256 {actual}, but the manifest says {manifest.onnx.sha256}: "
            "the file was changed or belongs to another package"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:  # the verified bytes, not the path: what runs is what was hashed
        session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for unloadable graphs
        raise PackageError(f"onnxruntime cannot load {onnx_path}: {exc}") from exc
    _check_graph(session, manifest, onnx_path)
    return Model(package, manifest, session, manifest_bytes, package_digest(manifest_bytes, onnx_bytes))
def _check_graph(session: InferenceSession, manifest: Manifest, onnx_path: Path) -> None:
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
