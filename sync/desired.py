"""The downlink (SPEC §9): what central wants a gateway to run, and what the gateway reports it runs.

`GET /api/v1/gateways/{id}/desired` answers a `DesiredState` (or 304 when the gateway's If-None-Match is current);
every ingest's `gateway` object carries `Applied`. Both ends use these models, so a field added here is one
contract. Central never connects to a gateway: a gateway that was offline catches up at its next request.

Central-side actions travelling down (SPEC §10): `acknowledgements` lists the gateway's open alarm episodes that are
acknowledged, each named by the event that opened it (as the gateway names it: agent/actions.py). They change
without a new revision (an acknowledgement is not something to apply or report), so the ETag covers them too
(`etag`): a gateway's conditional GET sees a new list at once, and the sync client hands every list it gets to the
agent's action log, which keeps it for the technician's page.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, StringConstraints

from sync.protocol import Applied, Name, Revision, Sha256, Text

MAX_ACKNOWLEDGEMENTS = 1000
MAX_OVERRIDES = 32
BUNDLE_PATH = r"^/api/v1/models/[A-Za-z0-9._-]{1,64}/[A-Za-z0-9._-]{1,64}/bundle$"



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BundleRef(_Strict):
    """A model central wants run: where its signed bundle is (a path on central: the token never goes elsewhere)."""

    name: Name
    version: Name
    sha256: Sha256  # the ONNX file's, as in the signed manifest
    role: Literal["live", "shadow"]
    bundle_url: Annotated[str, StringConstraints(pattern=BUNDLE_PATH)]


class ConfigState(_Strict):
    revision: Revision = 0
    # Dotted keys of the remotely configurable subset (sync/remote.py) -> values; checked by the agent, which
    # reports what it refuses, so a bad override never blocks a model change.
    overrides: Annotated[dict[Annotated[str, StringConstraints(max_length=64)], JsonValue],
                         Field(max_length=MAX_OVERRIDES)] = {}


class Acknowledgement(BaseModel):
    """An open alarm episode of the gateway, acknowledged (at central, or at the gateway and known to central)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)  # a newer central may say more

    episode_id: uuid.UUID  # the event_id of the event that opened the episode
    machine_id: Name
    acknowledged_at: AwareDatetime
    acknowledged_by: Text | None = None  # as central records it: "<name> (<credential or gateway>)"


class DesiredState(_Strict):
    # Fields a newer central adds are ignored, not refused: an older agent keeps applying what it knows.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    revision: Revision
    model: BundleRef | None = None  # None: the model of the gateway's own configuration
    shadow: BundleRef | None = None  # None: no shadow scoring
    config: ConfigState = ConfigState()
    acknowledgements: Annotated[list[Acknowledgement], Field(max_length=MAX_ACKNOWLEDGEMENTS)] = []


NOTHING = DesiredState(revision=0)


def etag(revision: int, acknowledgements: Sequence[Acknowledgement] = ()) -> str:
    """`"desired-<revision>"`, and a digest of the acknowledgements when there are any."""
    if not acknowledgements:
        return f'"desired-{revision}"'
    listed = "\n".join(a.model_dump_json() for a in acknowledgements).encode()
    return f'"desired-{revision}-{hashlib.sha256(listed).hexdigest()[:16]}"'


__all__ = ["NOTHING", "Acknowledgement", "Applied", "BundleRef", "ConfigState", "DesiredState", "etag"]

