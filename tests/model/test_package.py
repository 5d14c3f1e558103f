"""The model package: the agent refuses a package whose hash, manifest or graph does not match."""

from __future__ import annotations

import json
import shutil

import pytest

from model.manifest import PackageError
from model.package import SHIPPED, load


@pytest.fixture
def package(tmp_path):
    copy = tmp_path / "package"
    shutil.copytree(SHIPPED, copy)
    return copy


def edit_manifest(package, change):
    path = package / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_the_shipped_package_verifies_and_declares_what_spec_4_requires(shipped_model):
    manifest = shipped_model.manifest
    assert [i.name for i in manifest.inputs] == [
        "air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear"]
    assert all(i.unit and i.dtype == "float32" for i in manifest.inputs)
    assert all(i.training_range.min >= i.physical_range.min and i.training_range.max <= i.physical_range.max
               for i in manifest.inputs)
    assert manifest.outputs.modes == ("TWF", "HDF", "PWF", "OSF")
    assert 0 < manifest.thresholds.warning < manifest.thresholds.alarm < 1
    assert manifest.dataset.sha256 == "ec4ed737b27c4e65730e3b875626ddb4db005d79733f0fc1f59d72db467cd670"
    assert manifest.training.command.startswith("pdm-edge train")
    assert {"scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "python"} <= set(manifest.training.versions)
    assert manifest.metrics["test"]["failure"]["roc_auc"] > 0.5


def test_a_changed_onnx_file_is_refused_with_both_hashes(package):
    onnx = package / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="has sha256 [0-9a-f]{64}, but the manifest says"):
        load(package)


def test_a_missing_onnx_file_is_refused(package):
    (package / "model.onnx").unlink()
    with pytest.raises(PackageError, match="model.onnx is missing"):
        load(package)


def test_a_manifest_that_is_not_json_is_refused(package):
    (package / "manifest.json").write_text("{not json")
    with pytest.raises(PackageError, match="is not a valid manifest"):
        load(package)


def test_a_manifest_with_unknown_keys_is_refused(package):
    edit_manifest(package, lambda m: m.update(surprise=1))
    with pytest.raises(PackageError, match="surprise"):
        load(package)


def test_a_manifest_that_declares_other_inputs_than_the_graph_is_refused(package):
    edit_manifest(package, lambda m: m["inputs"].pop())
    with pytest.raises(PackageError, match="takes inputs .* but the manifest declares"):
        load(package)


def test_a_manifest_with_other_modes_than_the_graph_is_refused(package):
    def drop_mode(m):
        m["outputs"]["modes"] = m["outputs"]["modes"][:3]
        m["thresholds"]["modes"].pop("OSF")

    edit_manifest(package, drop_mode)
    with pytest.raises(PackageError, match="risks of 4 modes, the manifest names 3"):
        load(package)


def test_thresholds_out_of_order_are_refused(package):
    edit_manifest(package, lambda m: m["thresholds"].update(warning=0.9, alarm=0.5))
    with pytest.raises(PackageError, match="warning threshold 0.9 must be below alarm threshold 0.5"):
        load(package)
