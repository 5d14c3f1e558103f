"""Staged rollouts (issue 17): a candidate model goes cohort by cohort, shadowing first, live once its gates pass.

For each cohort, in order:
  shadow  the cohort's gateways are told to score the candidate in shadow; their shadow figures are cleared, then
          summed from the summaries they send (central/ingest.py). When every gateway of the cohort reports the
          shadow model applied, has at least `min_readings` shadow readings and `min_minutes` have passed, the gates
          are checked per gateway:
            agreement     share of readings where the candidate's state is the live model's  >= min_agreement
            alarm rate    |candidate's alarm rate - live model's alarm rate|                  <= max_alarm_rate_change
          all pass: the cohort goes live.
  live    the cohort's gateways are told to run the candidate live (no shadow). When every one reports it, the next
          cohort starts shadowing; after the last, the rollout is completed.
At any time, a gateway of the rollout that reports an error applying its desired state (Applied.error for the
revision central sent), or a gate that fails, stops the rollout: every gateway it reached is sent back to the model
it ran before (`previous`, null: its own configured model), with the reason kept (status API and CLI).
`promote` skips the current cohort's wait and gates; `abort` rolls back as a failure does, by the operator.

Central down (or the database) pauses a rollout: its state is in the database and advances only when
`advance()` runs (the API's task every PDM_CENTRAL_ROLLOUT_INTERVAL_S, and `pdm-central rollout status`); gateways
keep what they last applied, and their summaries wait in their outboxes. Every step runs in one transaction with
the rollout's row locked, so two API workers never advance the same rollout twice.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from central.fleet import desired

log = logging.getLogger("central.rollout")


class RolloutError(Exception):
    """A rollout command that cannot be done; the message says why."""


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_readings: int = Field(500, ge=1)  # shadow readings per gateway before the gates are judged
    min_minutes: float = Field(0.0, ge=0)  # and at least this long in shadow
    min_agreement: float = Field(0.95, ge=0, le=1)
    max_alarm_rate_change: float = Field(0.02, ge=0, le=1)  # absolute, in share of readings


class GatewayFigures(BaseModel):
    """One gateway of a rollout as central sees it."""

    gateway: str
    cohort: int
    revoked: bool  # revoked since the rollout started: it no longer holds the rollout back
    applied_revision: int | None
    desired_revision: int | None
    live_model: str | None  # "name version"
    shadow_model: str | None
    error: str | None
    readings: int = 0  # shadow readings counted since its cohort started shadowing
    agreement: float | None = None
    live_alarm_rate: float | None = None
    alarm_rate: float | None = None
    live_warning_rate: float | None = None
    warning_rate: float | None = None
    ood_rate: float | None = None
    shadow_ms_per_reading: float | None = None


class RolloutStatus(BaseModel):
    id: int
    model: str  # "name version"
    state: str  # running | completed | rolled_back | aborted
    cohort: int  # index, from 0
    cohorts: list[list[str]]
    phase: str  # shadow | live | done
    gates: Gates
    reason: str | None
    started_at: str
    updated_at: str
    gateways: list[GatewayFigures]


ROLLOUT = """
SELECT id, name, version, sha256, state, cohorts, cohort, phase, gates, previous, reason, started_at, updated_at,
       extract(epoch FROM now() - phase_started_at) / 60
FROM rollouts {where} ORDER BY id DESC LIMIT 1 {lock}
"""
GATEWAYS = """
SELECT g.name, g.revoked_at IS NOT NULL, g.last_status->'applied', d.revision, d.model, d.pinned,
       f.readings, f.agreed, f.live_warning, f.live_alarm, f.warning, f.alarm, f.out_of_distribution, f.score_s
FROM gateways g
LEFT JOIN gateway_desired d ON d.gateway_id = g.id
LEFT JOIN shadow_figures f ON f.gateway_id = g.id AND f.name = %(name)s AND f.version = %(version)s
WHERE g.name = ANY(%(names)s)
"""


class _Rollout:
    def __init__(self, row: tuple[Any, ...]) -> None:
        (self.id, self.name, self.version, self.sha256, self.state, self.cohorts, self.cohort, self.phase, gates,
         self.previous, self.reason, self.started_at, self.updated_at, minutes) = row
        self.gates = Gates.model_validate(gates)
        self.minutes = float(minutes)

    @property
    def model(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def reached(self) -> list[str]:
        return [name for cohort in self.cohorts[: self.cohort + 1] for name in cohort]


async def _one(conn: psycopg.AsyncConnection[Any], query: str, params: Any = None) -> tuple[Any, ...] | None:
    return await (await conn.execute(query, params)).fetchone()


async def start(conn: psycopg.AsyncConnection[Any], name: str, version: str, cohort_specs: list[str],
                gates: Gates) -> RolloutStatus:
    """Start a rollout of an uploaded bundle; RolloutError when it cannot start."""
    async with conn.transaction():
        bundle = await _one(conn, "SELECT sha256 FROM model_bundles WHERE name = %s AND version = %s", [name, version])
        if bundle is None:
            raise RolloutError(f"no uploaded bundle {name} {version}: `pdm-central model upload` it first")
        if await _one(conn, "SELECT id FROM rollouts WHERE state = 'running' FOR UPDATE") is not None:
            raise RolloutError("a rollout is already running: promote or abort it first")
        rows = await (await conn.execute(
            "SELECT g.name, g.id, d.model, coalesce(d.pinned, false) FROM gateways g "
            "LEFT JOIN gateway_desired d ON d.gateway_id = g.id WHERE g.revoked_at IS NULL ORDER BY g.name"
        )).fetchall()
        cohorts = _cohorts(cohort_specs, [r[0] for r in rows if not r[3]], {r[0] for r in rows if r[3]})
        previous = {r[0]: r[2] for r in rows if any(r[0] in c for c in cohorts)}
        row = await _one(conn, "INSERT INTO rollouts (name, version, sha256, state, cohorts, phase, gates, previous) "
                               "VALUES (%s, %s, %s, 'running', %s, 'shadow', %s, %s) RETURNING id",
                         [name, version, bundle[0], json.dumps(cohorts), gates.model_dump_json(), json.dumps(previous)])
        assert row is not None
        rollout = await _running(conn)
        assert rollout is not None
        await _shadow_cohort(conn, rollout)
    log.info("rollout %d of %s %s started: %d cohort(s)", row[0], name, version, len(cohorts))
    started = await status(conn)
    assert started is not None
    return started


def _cohorts(specs: list[str], available: list[str], pinned: set[str]) -> list[list[str]]:
    """Cohorts from specs: "gw-a,gw-b" (names), "25%" (of the active, unpinned gateways not yet in a cohort),
    "rest" (all of those)."""
    if not specs:
        raise RolloutError("name at least one cohort (--cohort gw-a,gw-b, --cohort 25%, --cohort rest)")
    left = list(available)
    cohorts: list[list[str]] = []
    for spec in specs:
        spec = spec.strip()
        if spec == "rest":
            chosen = list(left)
        elif spec.endswith("%"):
            try:
                share = float(spec[:-1])
            except ValueError:
                raise RolloutError(f"cohort {spec!r}: not a percentage") from None
            if not 0 < share <= 100:
                raise RolloutError(f"cohort {spec!r}: a percentage above 0 and at most 100")
            chosen = left[: math.ceil(len(available) * share / 100)]
        else:
            chosen = [name.strip() for name in spec.split(",") if name.strip()]
            for name in chosen:
                if name in pinned:
                    raise RolloutError(f"gateway {name} is pinned (`pdm-central pin {name} --off` to release it)")
                if name not in left:
                    raise RolloutError(f"gateway {name}: not an active gateway, or already in an earlier cohort")
        if not chosen:
            raise RolloutError(f"cohort {spec!r} has no gateway")
        left = [name for name in left if name not in chosen]
        cohorts.append(chosen)
    return cohorts


async def _running(conn: psycopg.AsyncConnection[Any], lock: bool = True) -> _Rollout | None:
    row = await _one(conn, ROLLOUT.format(where="WHERE state = 'running'", lock="FOR UPDATE" if lock else ""))
    return _Rollout(row) if row is not None else None


async def _set(conn: psycopg.AsyncConnection[Any], rollout: _Rollout, **values: Any) -> None:
    assignments = ", ".join(f"{key} = %({key})s" for key in values)
    phase_moved = ", phase_started_at = now()" if "phase" in values or "cohort" in values else ""
    await conn.execute(f"UPDATE rollouts SET {assignments}, updated_at = now(){phase_moved} WHERE id = %(id)s",
                       {**values, "id": rollout.id})


async def _ids(conn: psycopg.AsyncConnection[Any], names: list[str]) -> dict[str, int]:
    rows = await (await conn.execute("SELECT name, id FROM gateways WHERE name = ANY(%s)", [names])).fetchall()
    return dict(rows)


async def _shadow_cohort(conn: psycopg.AsyncConnection[Any], rollout: _Rollout) -> None:
    ids = await _ids(conn, rollout.cohorts[rollout.cohort])
    await conn.execute("DELETE FROM shadow_figures WHERE gateway_id = ANY(%s) AND name = %s AND version = %s",
                       [list(ids.values()), rollout.name, rollout.version])
    for name, gateway_id in ids.items():
        await desired.set_models(conn, gateway_id, rollout.previous.get(name), rollout.model)


async def _go_live(conn: psycopg.AsyncConnection[Any], rollout: _Rollout) -> None:
    for gateway_id in (await _ids(conn, rollout.cohorts[rollout.cohort])).values():
        await desired.set_models(conn, gateway_id, rollout.model, None)
    await _set(conn, rollout, phase="live")


async def _roll_back(conn: psycopg.AsyncConnection[Any], rollout: _Rollout, state: str, reason: str) -> None:
    for name, gateway_id in (await _ids(conn, rollout.reached())).items():
        await desired.set_models(conn, gateway_id, rollout.previous.get(name), None)
    await _set(conn, rollout, state=state, reason=reason[:1000], phase="done")
    log.warning("rollout %d of %s %s %s: %s; its gateways are sent back to their previous model", rollout.id,
                rollout.name, rollout.version, state.replace("_", " "), reason)


def _applied_name(applied: dict[str, Any] | None, key: str) -> str | None:
    model = (applied or {}).get(key)
    return None if model is None else f"{model['name']} {model['version']}"


def _runs(applied: dict[str, Any] | None, key: str, rollout: _Rollout) -> bool:
    model = (applied or {}).get(key)
    return model is not None and (model["name"], model["version"], model["sha256"]) == \
        (rollout.name, rollout.version, rollout.sha256)


async def _gateways(conn: psycopg.AsyncConnection[Any], rollout: _Rollout) -> list[GatewayFigures]:
    names = [name for cohort in rollout.cohorts for name in cohort]
    rows = {row[0]: row for row in await (await conn.execute(
        GATEWAYS, {"name": rollout.name, "version": rollout.version, "names": names})).fetchall()}
    figures = []
    for index, cohort in enumerate(rollout.cohorts):
        for name in cohort:
            row = rows.get(name)
            if row is None:
                continue
            _, revoked, applied, revision, _, _, readings, agreed, live_warning, live_alarm, warning, alarm, ood, score_s = row
            n = readings or 0
            figures.append(GatewayFigures(
                gateway=name, cohort=index, revoked=revoked, applied_revision=(applied or {}).get("revision"),
                desired_revision=revision, live_model=_applied_name(applied, "live_model"),
                shadow_model=_applied_name(applied, "shadow_model"), error=(applied or {}).get("error"),
                readings=n, agreement=agreed / n if n else None, live_alarm_rate=live_alarm / n if n else None,
                alarm_rate=alarm / n if n else None, live_warning_rate=live_warning / n if n else None,
                warning_rate=warning / n if n else None, ood_rate=ood / n if n else None,
                shadow_ms_per_reading=1000 * score_s / n if n else None))
    return figures


async def advance(conn: psycopg.AsyncConnection[Any]) -> RolloutStatus | None:
    """One step of the running rollout, if any; the status after it (None: no rollout ever)."""
    async with conn.transaction():
        rollout = await _running(conn)
        if rollout is not None:
            await _step(conn, rollout)
    return await status(conn)


async def _step(conn: psycopg.AsyncConnection[Any], rollout: _Rollout) -> None:
    gateways = await _gateways(conn, rollout)
    reached = set(rollout.reached())
    for g in gateways:
        if g.gateway in reached and g.error and g.applied_revision == g.desired_revision:
            await _roll_back(conn, rollout, "rolled_back", f"gateway {g.gateway} could not apply its desired "
                             f"state: {g.error}")
            return
    cohort = [g for g in gateways if g.cohort == rollout.cohort and not g.revoked]
    applied = {g.gateway: (await _applied(conn, g.gateway)) for g in cohort}
    if rollout.phase == "shadow":
        if not all(_runs(applied[g.gateway], "shadow_model", rollout) for g in cohort):
            return
        if rollout.minutes < rollout.gates.min_minutes or any(g.readings < rollout.gates.min_readings for g in cohort):
            return
        failed = _failed_gate(cohort, rollout.gates)
        if failed:
            await _roll_back(conn, rollout, "rolled_back", failed)
            return
        await _go_live(conn, rollout)
        log.info("rollout %d: cohort %d passed its gates, going live", rollout.id, rollout.cohort + 1)
    elif rollout.phase == "live":
        if not all(_runs(applied[g.gateway], "live_model", rollout) for g in cohort):
            return
        await _next_cohort(conn, rollout)


async def _next_cohort(conn: psycopg.AsyncConnection[Any], rollout: _Rollout) -> None:
    if rollout.cohort + 1 >= len(rollout.cohorts):
        await _set(conn, rollout, state="completed", phase="done")
        log.info("rollout %d of %s %s completed", rollout.id, rollout.name, rollout.version)
        return
    rollout.cohort += 1
    await _set(conn, rollout, cohort=rollout.cohort, phase="shadow")
    await _shadow_cohort(conn, rollout)
    log.info("rollout %d: cohort %d starts shadowing", rollout.id, rollout.cohort + 1)


async def _applied(conn: psycopg.AsyncConnection[Any], name: str) -> dict[str, Any] | None:
    row = await _one(conn, "SELECT last_status->'applied' FROM gateways WHERE name = %s", [name])
    return row[0] if row is not None else None


def _failed_gate(cohort: list[GatewayFigures], gates: Gates) -> str | None:
    for g in cohort:
        assert g.agreement is not None and g.alarm_rate is not None and g.live_alarm_rate is not None
        if g.agreement < gates.min_agreement:
            return (f"gate failed on {g.gateway}: state agreement {g.agreement:.3f} below {gates.min_agreement} "
                    f"over {g.readings} readings")
        change = abs(g.alarm_rate - g.live_alarm_rate)
        if change > gates.max_alarm_rate_change:
            return (f"gate failed on {g.gateway}: alarm rate {g.alarm_rate:.3f} against {g.live_alarm_rate:.3f} "
                    f"live (change {change:.3f} above {gates.max_alarm_rate_change}) over {g.readings} readings")
    return None


async def promote(conn: psycopg.AsyncConnection[Any]) -> RolloutStatus | None:
    """Skip the current cohort's wait and gates: shadow -> live; live -> the next cohort."""
    async with conn.transaction():
        rollout = await _running(conn)
        if rollout is None:
            raise RolloutError("no rollout is running")
        if rollout.phase == "shadow":
            await _go_live(conn, rollout)
        else:
            await _next_cohort(conn, rollout)
        log.info("rollout %d promoted by the operator", rollout.id)
    return await status(conn)


async def abort(conn: psycopg.AsyncConnection[Any], reason: str) -> RolloutStatus | None:
    async with conn.transaction():
        rollout = await _running(conn)
        if rollout is None:
            raise RolloutError("no rollout is running")
        await _roll_back(conn, rollout, "aborted", reason)
    return await status(conn)


async def status(conn: psycopg.AsyncConnection[Any]) -> RolloutStatus | None:
    """The running rollout, else the latest; None when there was never one."""
    row = await _one(conn, ROLLOUT.format(where="", lock=""))
    if row is None:
        return None
    rollout = _Rollout(row)
    return RolloutStatus(
        id=rollout.id, model=f"{rollout.name} {rollout.version}", state=rollout.state, cohort=rollout.cohort,
        cohorts=rollout.cohorts, phase=rollout.phase, gates=rollout.gates, reason=rollout.reason,
        started_at=rollout.started_at.isoformat(), updated_at=rollout.updated_at.isoformat(),
        gateways=await _gateways(conn, rollout))
