"""Signed model bundles (model/bundle.py): what a gateway accepts, and the clear refusal of everything else —
tampered, unsigned, signed by an unknown key, and hostile tars (fuzzed with hypothesis)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.bundle import (
    MAX_BUNDLE_BYTES,
    BundleError,
    key_id,
    load_private_key,
    load_public_key,
    make_bundle,
    new_key_pair,
    pack,
    read_bundle,
)
from model.package import SHIPPED


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    new_key_pair(folder / "ops.key", folder / "ops.pub")
    new_key_pair(folder / "other.key", folder / "other.pub")
    ops = load_public_key(folder / "ops.pub")
    return folder, {key_id(ops): ops}


@pytest.fixture(scope="module")
def bundle_bytes(keys):
    folder, _ = keys
    return make_bundle(SHIPPED, load_private_key(folder / "ops.key"), "ops team")


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_a_bundle_signed_by_a_trusted_key_reads_back_as_the_shipped_package(keys, bundle_bytes):
    _, trusted = keys
    bundle = read_bundle(bundle_bytes, trusted)
    assert (bundle.name, bundle.version) == ("ai4i-failure", "1.0.0")
    assert bundle.manifest_bytes == (SHIPPED / "manifest.json").read_bytes()
    assert bundle.onnx_bytes == (SHIPPED / "model.onnx").read_bytes()
    assert bundle.signature.signer == "ops team" and bundle.signature.key_id in trusted


def test_the_private_key_is_for_its_owner_only_and_never_overwritten(keys):
    folder, _ = keys
    assert (folder / "ops.key").stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        new_key_pair(folder / "ops.key", folder / "ops2.pub")


def test_a_changed_manifest_a_changed_graph_no_signature_and_an_unknown_key_are_refused(keys, bundle_bytes):
    folder, trusted = keys
    files = members(bundle_bytes)
    manifest = json.loads(files["manifest.json"])
    manifest["thresholds"]["alarm"] = 0.99  # the thresholds are the model as much as the graph
    tampered = pack({**files, "manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(BundleError, match="does not match manifest.json"):
        read_bundle(tampered, trusted)
    graph = bytearray(files["model.onnx"])
    graph[-1] ^= 1
    with pytest.raises(BundleError, match="model.onnx does not have the sha256"):
        read_bundle(pack({**files, "model.onnx": bytes(graph)}), trusted)
    with pytest.raises(BundleError, match="unsigned"):
        read_bundle(pack({k: v for k, v in files.items() if k != "signature.json"}), trusted)
    stranger = make_bundle(SHIPPED, load_private_key(folder / "other.key"), "someone")
    with pytest.raises(BundleError, match="does not trust"):
        read_bundle(stranger, trusted)


def tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return out.getvalue()


@pytest.mark.parametrize("name,kind,message", [
    ("../manifest.json", tarfile.REGTYPE, "unexpected member"),
    ("/etc/passwd", tarfile.REGTYPE, "unexpected member"),
    ("models/manifest.json", tarfile.REGTYPE, "unexpected member"),
    ("model.onnx", tarfile.SYMTYPE, "not a regular file"),
    ("manifest.json", tarfile.LNKTYPE, "not a regular file"),
    ("signature.json", tarfile.CHRTYPE, "not a regular file"),
])
def test_path_tricks_links_and_devices_in_the_tar_are_refused(keys, name, kind, message):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/shadow" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    with pytest.raises(BundleError, match=message):
        read_bundle(tar_with(member, b"{}"), keys[1])


def test_oversized_and_duplicated_members_are_refused(keys, bundle_bytes):
    with pytest.raises(BundleError, match="more than"):
        read_bundle(b"\0" * (MAX_BUNDLE_BYTES + 1), keys[1])
    big = tarfile.TarInfo("signature.json")
    big.size = 10_000
    with pytest.raises(BundleError, match="larger than"):
        read_bundle(tar_with(big, b"x" * 10_000), keys[1])
    files = members(bundle_bytes)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in ("manifest.json", "model.onnx", "signature.json", "manifest.json"):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    with pytest.raises(BundleError, match="appears twice"):
        read_bundle(out.getvalue(), keys[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0), flips=st.lists(st.integers(min_value=0), max_size=4))
def test_a_truncated_or_corrupted_bundle_is_refused_in_one_line_never_a_crash(keys, bundle_bytes, cut, flips):
    data = bytearray(bundle_bytes[: cut % (len(bundle_bytes) + 1)])
    for position in flips:
        if data:
            data[position % len(data)] ^= 0x41
    try:
        bundle = read_bundle(bytes(data), keys[1])
    except BundleError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(("refused bundle", "the bundle"))
    else:  # a flip in padding or the tar's own metadata may leave every signed byte intact
        assert bundle.manifest_bytes == (SHIPPED / "manifest.json").read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_refused(keys, data):
    with pytest.raises(BundleError):
        read_bundle(data, keys[1])
