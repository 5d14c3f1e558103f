"""Signed model bundles (SPEC §9): a model package plus `signature.json`, moved from central to gateways as one tar.

A bundle is an uncompressed tar of exactly three regular files: `manifest.json`, the ONNX file the manifest names
(`model.onnx`) and `signature.json`:
    {"algorithm": "ed25519", "key_id": "<16 hex>", "signer": "<who>", "signature": "<base64, 64 bytes>"}
The signature is Ed25519 over the exact bytes of manifest.json, which holds the ONNX file's sha256: one signature
covers the whole package. A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key.

Keys are PEM files: the private key PKCS#8 (mode 0600, kept by whoever uploads models), the public key
SubjectPublicKeyInfo (copied to gateways, listed in `[model] trusted_keys`). `new_key_pair` makes both.

`read_bundle` takes untrusted bytes and either returns a verified `Bundle` or raises `BundleError` with one line
saying why: too large, not a tar, a member that is not a plain regular file (links, devices, paths, `..`), missing
or extra members, a signature by a key not trusted, a signature that does not verify, an ONNX file whose sha256 is
not the manifest's. Nothing is written to disk here; `write_package` writes a verified bundle as a package folder.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from model.manifest import MANIFEST_FILE, Described, Manifest, PackageError
from model.package import read_package_file

# cryptography is imported where a key is made, read or used: the agent imports this module at start, and
# cryptography's bindings cost it 9 MB of RSS on a gateway that has no trusted keys (BENCHMARKS: ingest, RSS).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FILE = "signature.json"
ONNX_FILE = "model.onnx"
MAX_BUNDLE_BYTES = 64 * 2**20  # the shipped package is well under 1 MiB
MAX_MANIFEST_BYTES = 2**20
MAX_SIGNATURE_BYTES = 4096


class BundleError(PackageError):
    """A bundle that must not be used; the message says why in one line."""


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
    signer: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,200}$")]
    signature: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/=]{1,200}$")]


@dataclass(frozen=True)
class Bundle(Described):
    """A verified bundle: exactly the bytes that were checked."""

    manifest: Manifest
    manifest_bytes: bytes
    onnx_bytes: bytes
    signature: Signature
    signature_bytes: bytes


def key_id(public_key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def new_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 key pair (the private key 0600, never overwriting a file); its key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    with open(public_path, "xb") as f:
        f.write(public)
    return key_id(private.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise BundleError(f"cannot read the signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError, binascii.Error):
        raise BundleError(f"{path} is not an unencrypted PEM private key (make one with "
                          "`pdm-central keys new`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise BundleError(f"cannot read the public key {path}: {exc.strerror}") from None
    except (ValueError, TypeError, binascii.Error):
        raise BundleError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} is not an Ed25519 public key")
    return key


def trusted_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key, from the files of `[model] trusted_keys`; BundleError for a file that is no key."""
    return {key_id(key): key for key in (load_public_key(path) for path in paths)}


def sign(manifest_bytes: bytes, private_key: Ed25519PrivateKey, signer: str) -> Signature:
    raw = private_key.sign(manifest_bytes)
    return Signature(key_id=key_id(private_key.public_key()), signer=signer,
                     signature=base64.b64encode(raw).decode())


def make_bundle(package: Path, private_key: Ed25519PrivateKey, signer: str) -> bytes:
    """The bundle of a package folder, signed: tar bytes. PackageError when the package is not one."""
    manifest_bytes = read_package_file(package, MANIFEST_FILE)
    manifest = Manifest.parse(manifest_bytes, package / MANIFEST_FILE)
    if manifest.onnx.file != ONNX_FILE:
        raise BundleError(f"the manifest names the ONNX file {manifest.onnx.file!r}; a bundle holds {ONNX_FILE}")
    onnx_bytes = read_package_file(package, ONNX_FILE)
    if hashlib.sha256(onnx_bytes).hexdigest() != manifest.onnx.sha256:
        raise BundleError(f"{package / ONNX_FILE} does not have the sha256 its manifest names")
    signature = sign(manifest_bytes, private_key, signer).model_dump_json(indent=2).encode()
    return pack({MANIFEST_FILE: manifest_bytes, ONNX_FILE: onnx_bytes, SIGNATURE_FILE: signature})


def pack(files: Mapping[str, bytes]) -> bytes:
    """A plain tar of `files` (name -> bytes), in order, with fixed metadata (the same bytes for the same files)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def read_bundle(data: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> Bundle:
    """A verified bundle from untrusted bytes; BundleError (one line) for anything else."""
    from cryptography.exceptions import InvalidSignature

    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"the bundle is {len(data):,} bytes, more than {MAX_BUNDLE_BYTES:,}")
    files = _members(data)
    missing = [name for name in (MANIFEST_FILE, ONNX_FILE, SIGNATURE_FILE) if name not in files]
    if missing:
        what = "unsigned: no signature.json" if missing == [SIGNATURE_FILE] else f"{', '.join(missing)} missing"
        raise BundleError(f"refused bundle: {what}")
    manifest_bytes, onnx_bytes = files[MANIFEST_FILE], files[ONNX_FILE]
    signature = _signature(files[SIGNATURE_FILE])
    key = trusted.get(signature.key_id)
    if key is None:
        raise BundleError(f"refused bundle: signed by key {signature.key_id} ({signature.signer}), which this "
                          "gateway does not trust (model.trusted_keys)")
    try:
        raw = base64.b64decode(signature.signature, validate=True)
        key.verify(raw, manifest_bytes)
    except (InvalidSignature, binascii.Error, ValueError):
        raise BundleError(f"refused bundle: the signature by key {signature.key_id} does not match manifest.json "
                          "(tampered or corrupted)") from None
    try:
        manifest = Manifest.parse(manifest_bytes, Path(MANIFEST_FILE))
    except PackageError as exc:
        raise BundleError(f"refused bundle: {exc}") from None
    if manifest.onnx.file != ONNX_FILE:
        raise BundleError(f"refused bundle: the manifest names the ONNX file {manifest.onnx.file!r}, not {ONNX_FILE}")
    if hashlib.sha256(onnx_bytes).hexdigest() != manifest.onnx.sha256:
        raise BundleError("refused bundle: model.onnx does not have the sha256 the signed manifest names "
                          "(tampered or corrupted)")
    return Bundle(manifest, manifest_bytes, onnx_bytes, signature, files[SIGNATURE_FILE])


def _members(data: bytes) -> dict[str, bytes]:
    limits = {MANIFEST_FILE: MAX_MANIFEST_BYTES, ONNX_FILE: MAX_BUNDLE_BYTES, SIGNATURE_FILE: MAX_SIGNATURE_BYTES}
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name not in limits:
                    raise BundleError(f"refused bundle: unexpected member {member.name[:80]!r} (a bundle holds "
                                      f"{', '.join(limits)} only)")
                if not member.isreg():
                    raise BundleError(f"refused bundle: {member.name} is not a regular file")
                if member.name in files:
                    raise BundleError(f"refused bundle: {member.name} appears twice")
                if member.size > limits[member.name]:
                    raise BundleError(f"refused bundle: {member.name} is larger than {limits[member.name]:,} bytes")
                extracted = tar.extractfile(member)
                content = extracted.read() if extracted is not None else b""
                if len(content) != member.size:
                    raise BundleError(f"refused bundle: {member.name} is truncated")
                files[member.name] = content
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError) as exc:
        raise BundleError(f"refused bundle: not a readable tar ({type(exc).__name__})") from None
    return files


def _signature(data: bytes) -> Signature:
    try:
        return Signature.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "signature.json"
        raise BundleError(f"refused bundle: signature.json is not valid ({where}: {first['msg']})") from None


def write_package(bundle: Bundle, folder: Path) -> None:
    """Write the verified bundle's files into `folder` (which must exist and be empty), each fsynced."""
    files = {MANIFEST_FILE: bundle.manifest_bytes, ONNX_FILE: bundle.onnx_bytes,
             SIGNATURE_FILE: bundle.signature_bytes}
    for name, content in files.items():
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())


def verify_installed(folder: Path, trusted: Mapping[str, Ed25519PublicKey]) -> None:
    """Check again the signature of a package written by `write_package` (after a restart); BundleError if not."""
    files = {name: read_package_file(folder, name) for name in (MANIFEST_FILE, ONNX_FILE, SIGNATURE_FILE)}
    read_bundle(pack(files), trusted)


def manifest_json(data: bytes) -> dict[str, object]:
    """The manifest's JSON object, for listing (central); BundleError when it is not one."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise BundleError("manifest.json is not JSON") from None
    if not isinstance(value, dict):
        raise BundleError("manifest.json is not a JSON object")
    return value
