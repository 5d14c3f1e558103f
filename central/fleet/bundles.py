"""Signed model bundles in central: `pdm-central model upload|list`, and the bytes gateways download.

Upload signs the package's manifest with the operator's private key (model/bundle.py), then checks the bundle as a
gateway would (with the matching public key) before storing it: what is stored is exactly what gateways verify.
A name and version are uploaded once; a different package under the same name and version is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from model.bundle import BundleError, key_id, load_private_key, make_bundle, read_bundle

INSERT = """
INSERT INTO model_bundles (name, version, sha256, key_id, signer, bundle) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (name, version) DO NOTHING RETURNING 1
"""


@dataclass(frozen=True)
class StoredBundle:
    name: str
    version: str
    sha256: str
    key_id: str
    signer: str
    size: int
    uploaded_at: datetime


def upload(conn: psycopg.Connection[Any], package: Path, signing_key: Path, signer: str) -> StoredBundle:
    """Sign and store `package`; BundleError (PackageError) when it cannot be."""
    key = load_private_key(signing_key)
    data = make_bundle(package, key, signer)
    bundle = read_bundle(data, {key_id(key.public_key()): key.public_key()})
    with conn.transaction():
        stored = conn.execute(INSERT, [bundle.name, bundle.version, bundle.sha256, bundle.signature.key_id,
                                       bundle.signature.signer, data]).fetchone()
        if stored is None:
            row = conn.execute("SELECT sha256 FROM model_bundles WHERE name = %s AND version = %s",
                               [bundle.name, bundle.version]).fetchone()
            if row is None or row[0] != bundle.sha256:
                raise BundleError(f"{bundle.name} {bundle.version} is already uploaded with another model; give "
                                  "the new one its own version")
    return next(b for b in list_bundles(conn) if (b.name, b.version) == (bundle.name, bundle.version))


def list_bundles(conn: psycopg.Connection[Any]) -> list[StoredBundle]:
    rows = conn.execute("SELECT name, version, sha256, key_id, signer, length(bundle), uploaded_at FROM model_bundles "
                        "ORDER BY uploaded_at, name, version").fetchall()
    return [StoredBundle(*row) for row in rows]


async def bundle_bytes(conn: psycopg.AsyncConnection[Any], name: str, version: str) -> bytes | None:
    cursor = await conn.execute("SELECT bundle FROM model_bundles WHERE name = %s AND version = %s", [name, version])
    row = await cursor.fetchone()
    return bytes(row[0]) if row is not None else None
