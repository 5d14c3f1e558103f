"""The model package's manifest (SPEC §4): what the ONNX file expects, promises and was measured to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION: Final = 1


class PackageError(Exception):
    """A model package that cannot be used: missing files, bad manifest, hash or graph mismatch."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min <= self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self

    def __contains__(self, value: float) -> bool:
        return self.min <= value <= self.max


class Input(_Strict):
    name: str
    unit: str
    dtype: Literal["float32"] = "float32"
    source_column: str
    resolution: float
    physical_range: Range
    training_range: Range
    description: str = ""


class MachineType(_Strict):
    name: str
    values: tuple[str, ...]
    source_column: str


class Outputs(_Strict):
    p_failure: str
    p_mode: str
    modes: tuple[str, ...]


class Thresholds(_Strict):
    warning: float = Field(gt=0, lt=1)
    alarm: float = Field(gt=0, lt=1)
    modes: dict[str, float]
    method: str

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if not self.warning < self.alarm:
            raise ValueError(f"warning threshold {self.warning} must be below alarm threshold {self.alarm}")
        return self


class Health(_Strict):
    """Piecewise-linear map from p_failure to a 0-100 health score, through (p, health) points."""

    points: tuple[tuple[float, float], ...]
    description: str = ""

    @model_validator(mode="after")
    def _monotone(self) -> Health:
        ps = [p for p, _ in self.points]
        if len(ps) < 2 or ps[0] != 0.0 or ps[-1] != 1.0 or ps != sorted(ps):
            raise ValueError("health points must start at p=0, end at p=1 and be sorted by p")
        return self


class GraphInputs(_Strict):
    readings: str  # float32 [N, len(inputs)], columns in the manifest's input order
    machine_type: str  # string [N, 1]


class OnnxFile(_Strict):
    file: str  # a plain file name in the package folder
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: GraphInputs
    opset: dict[str, int]

    @field_validator("file")
    @classmethod
    def _plain_name(cls, file: str) -> str:
        if not file or file in (".", "..") or any(c in file for c in "/\\\x00"):
            raise ValueError("must be a plain file name in the package folder (no folder, no absolute path)")
        return file


class Dataset(_Strict):
    name: str
    sha256: str
    rows: int
    license: str
    source: str


class Training(_Strict):
    command: str
    seed: int
    split: str
    estimators: dict[str, str]
    derived_features: dict[str, str]
    versions: dict[str, str]


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    description: str
    onnx: OnnxFile
    inputs: tuple[Input, ...]
    machine_type: MachineType
    outputs: Outputs
    thresholds: Thresholds
    health: Health
    metrics: dict[str, Any]
    dataset: Dataset
    training: Training

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if set(self.thresholds.modes) != set(self.outputs.modes):
            raise ValueError("thresholds.modes must name exactly the outputs' modes")
        at = {p for p, _ in self.health.points}  # the agent reads the health bands of the states at these points
        missing = [f"{name} ({p})" for name, p in (("warning", self.thresholds.warning),
                                                   ("alarm", self.thresholds.alarm)) if p not in at]
        if missing:
            raise ValueError(f"health.points must have a point at the {' and '.join(missing)} threshold")
        return self

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @classmethod
    def load(cls, package: Path) -> Manifest:
        path = Path(package) / MANIFEST_FILE
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PackageError(f"cannot read {path}: {exc.strerror}") from exc
        return cls.parse(raw, path)

    @classmethod
    def parse(cls, raw: bytes, path: Path) -> Manifest:
        """The manifest in `raw` (read from `path`, named in errors)."""
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors())
            raise PackageError(f"{path} is not a valid manifest: {problems}") from exc

    def write(self, package: Path) -> None:
        (Path(package) / MANIFEST_FILE).write_text(self.model_dump_json(indent=2) + "\n")


class Described:
    """A package's name, version and ONNX digest as its manifest states them: the loaded model's and a bundle's."""

    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def sha256(self) -> str:
        return self.manifest.onnx.sha256
