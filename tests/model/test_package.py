"""The model package: the agent refuses a package whose hash, manifest or graph does not match."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnxruntime
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
    assert {"scikit-learn", "onnx", "onnxruntime", "numpy", "python"} <= set(manifest.training.versions)
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


# --- issue 22 item 8: authenticity, not only integrity ---------------------------------------------------------------

def move_alarm(manifest, p=0.999):
    manifest["thresholds"]["alarm"] = p
    manifest["health"]["points"][2][0] = p


def test_a_changed_manifest_changes_the_package_digest_though_not_the_onnx_sha256(package):
    """Moving the alarm threshold 0.584 -> 0.999 (alarm suppression) kept every reported hash the same."""
    before = load(package)
    edit_manifest(package, move_alarm)
    after = load(package)
    assert after.manifest.thresholds.alarm == 0.999 and after.sha256 == before.sha256
    assert after.package_digest != before.package_digest


def test_the_package_digest_is_the_documented_one(package):
    manifest, onnx = (package / "manifest.json").read_bytes(), (package / "model.onnx").read_bytes()
    documented = hashlib.sha256(hashlib.sha256(manifest).digest() + hashlib.sha256(onnx).digest()).hexdigest()
    model = load(package)
    assert model.package_digest == documented and model.manifest_bytes == manifest


def test_a_threshold_without_its_health_point_is_refused(package):
    """A manifest whose alarm threshold is no health point loaded, then /api/v1/status answered 500 (the health
    bands are read at the thresholds' points, by the machines' alarms too)."""
    edit_manifest(package, lambda m: m["thresholds"].update(alarm=0.999))
    with pytest.raises(PackageError, match=r"health.points must have a point at the alarm \(0.999\) threshold"):
        load(package)


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/hostname", "sub/model.onnx", "..", "a\\b.onnx"])
def test_an_onnx_file_name_that_is_not_a_plain_name_in_the_package_is_refused(package, tmp_path, name):
    """The ONNX file name accepted `../` and absolute paths: a manifest could point the agent at any file."""
    outside = tmp_path / "model.onnx"
    shutil.copy(package / "model.onnx", outside)
    (package / "sub").mkdir()
    shutil.copy(package / "model.onnx", package / "sub" / "model.onnx")
    edit_manifest(package, lambda m: m["onnx"].update(file=name))
    with pytest.raises(PackageError, match="onnx.file: .*must be a plain file name in the package folder"):
        load(package)


def test_an_onnx_file_that_is_a_symlink_is_refused(package, tmp_path):
    """A symlink with the right hash was followed out of the package."""
    elsewhere = tmp_path / "elsewhere.onnx"
    (package / "model.onnx").rename(elsewhere)
    (package / "model.onnx").symlink_to(elsewhere)
    with pytest.raises(PackageError, match="model.onnx is a symlink"):
        load(package)


def test_the_bytes_hashed_are_the_bytes_that_run(package, monkeypatch):
    """The file was hashed, then reopened by path: a file swapped in between ran unverified. Fault injected: the
    file is replaced by garbage just as onnxruntime is asked to load the graph."""
    real = onnxruntime.InferenceSession

    def swap_then_load(model, *args, **kwargs):
        (package / "model.onnx").write_bytes(b"not the verified graph")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", swap_then_load)
    model = load(package)  # the old load handed onnxruntime the path, and the garbage behind it
    p_failure, _ = model.predict(np.array([[300.0, 310.0, 1500.0, 40.0, 10.0]], dtype=np.float32),
                                 np.array([["M"]], dtype=object))
    assert 0.0 <= p_failure[0] <= 1.0
