"""The query and path parameters the ops routes and the dashboard share: what FastAPI validates before a handler
runs, so that no value PostgreSQL would refuse (a NUL byte, a time beyond its range) ever reaches it as a 500."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AwareDatetime, BeforeValidator

NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"  # gateway and machine ids: what the ingest body (sync.protocol) allows
Name = Annotated[str, Query(pattern=NAME_PATTERN)]
NameInPath = Annotated[str, Path(pattern=NAME_PATTERN)]  # what no gateway or machine is named: 422
Mode = Annotated[str, Query(pattern=r"^[A-Za-z0-9_]{1,32}$")]
Limit = Annotated[int, Query(ge=1, le=10_000)]


def _iso_only(value: object) -> object:
    """pydantic also reads a number as epoch seconds (or milliseconds): the document promises ISO 8601 only."""
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return value
    raise ValueError("expected an ISO 8601 time with its UTC offset, e.g. 2026-03-01T08:00:00Z")


Time = Annotated[AwareDatetime, BeforeValidator(_iso_only)]
