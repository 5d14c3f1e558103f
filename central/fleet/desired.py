"""Each gateway's desired state (SPEC §9) as central keeps it (table gateway_desired), read by the gateway's
conditional GET, written by rollouts and by `pdm-central config|pin`.

Every change takes a new revision from one sequence, so the ETag `"desired-<revision>"` changes with any change and
a gateway's If-None-Match costs one indexed read and a 304. Who writes: the rollout engine (central/fleet/rollout.py)
and the CLI, each in its own transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import psycopg

from sync.desired import NOTHING, BundleRef, ConfigState, DesiredState
from sync.remote import OverrideError, problems

READ = """
SELECT revision, model, shadow, config_revision, overrides FROM gateway_desired WHERE gateway_id = %s
"""
# Upserts touch only the columns given; the rest keep their values (a new row: the defaults).
SET_MODELS = """
INSERT INTO gateway_desired (gateway_id, revision, model, shadow) VALUES (%s, nextval('desired_revision'), %s, %s)
ON CONFLICT (gateway_id) DO UPDATE SET revision = excluded.revision, model = excluded.model,
    shadow = excluded.shadow, updated_at = now()
"""
SET_CONFIG = """
INSERT INTO gateway_desired (gateway_id, revision, config_revision, overrides)
VALUES (%s, nextval('desired_revision'), 1, %s)
ON CONFLICT (gateway_id) DO UPDATE SET revision = excluded.revision,
    config_revision = gateway_desired.config_revision + 1, overrides = excluded.overrides, updated_at = now()
RETURNING config_revision
"""
SET_PINNED = """
INSERT INTO gateway_desired (gateway_id, revision, pinned) VALUES (%s, nextval('desired_revision'), %s)
ON CONFLICT (gateway_id) DO UPDATE SET pinned = excluded.pinned, updated_at = now()
"""


def bundle_ref(model: Mapping[str, Any] | None, role: str) -> BundleRef | None:
    if model is None:
        return None
    return BundleRef(name=model["name"], version=model["version"], sha256=model["sha256"], role=role,  # type: ignore[arg-type]
                     bundle_url=f"/api/v1/models/{model['name']}/{model['version']}/bundle")


def from_row(row: tuple[Any, ...] | None) -> DesiredState:
    """The desired state of a gateway_desired row. Extension point for the alarm workflow: central's
    acknowledgements going down belong in `acknowledgements=` here (sync/desired.py), and whatever writes them must
    take a new revision (nextval('desired_revision')) so the gateway's If-None-Match no longer matches."""
    if row is None:
        return NOTHING
    revision, model, shadow, config_revision, overrides = row
    return DesiredState(revision=revision, model=bundle_ref(model, "live"), shadow=bundle_ref(shadow, "shadow"),
                        config=ConfigState(revision=config_revision, overrides=overrides))


async def read(conn: psycopg.AsyncConnection[Any], gateway_id: int) -> DesiredState:
    row = await (await conn.execute(READ, [gateway_id])).fetchone()
    return from_row(row)


def model_json(model: Mapping[str, Any] | None) -> str | None:
    return None if model is None else json.dumps({k: model[k] for k in ("name", "version", "sha256")})


async def set_models(conn: psycopg.AsyncConnection[Any], gateway_id: int, model: Mapping[str, Any] | None,
                     shadow: Mapping[str, Any] | None) -> None:
    await conn.execute(SET_MODELS, [gateway_id, model_json(model), model_json(shadow)])


def set_overrides(conn: psycopg.Connection[Any], gateway_id: int, overrides: Mapping[str, Any]) -> int:
    """Replace the gateway's overrides; the new config revision. OverrideError when they are not valid."""
    found = problems(overrides)
    if found:
        raise OverrideError(found)
    row = conn.execute(SET_CONFIG, [gateway_id, json.dumps(dict(overrides))]).fetchone()
    assert row is not None
    return int(row[0])


def set_pinned(conn: psycopg.Connection[Any], gateway_id: int, pinned: bool) -> None:
    conn.execute(SET_PINNED, [gateway_id, pinned])
