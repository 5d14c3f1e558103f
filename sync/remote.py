"""Remote configuration (SPEC §9): the subset of the agent's configuration central may override, and its check.

The file stays the base; central's overrides (dotted keys -> values) replace single keys of it. Allowed:
  alarms.enter_after, alarms.leave_after, alarms.leave_margin    applied at once (the next batch)
  central.sync_interval_s, central.poll_s                        applied at once (the next sync round)
  summary.grace_s                                                applied at once
  summary.window_s                                               applied at the agent's next start (windows in
                                                                 progress keep their size)
Never credentials, never central.url or anything that says where data goes or which code runs.

The sections are validated by the same typed models as the file: `AlarmsConfig` and `SummaryConfig` live here,
neutral, so central (which never imports the agent) checks overrides exactly as the agent will.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sync.config import CentralConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number finite, e.g. grace_s


class SummaryConfig(_Section):
    window_s: int = Field(60, gt=0)  # windows are aligned to the clock: [k * window_s, (k + 1) * window_s)
    grace_s: float = Field(10.0, ge=0)  # a window with no newer reading closes this long after its end


class AlarmsConfig(_Section):
    """Hysteresis: a machine enters a worse state after `enter_after` consecutive readings in it, and leaves it
    after `leave_after` consecutive readings whose health is at least `leave_margin` points above the state's band.
    The margin is in health points because the thresholds differ by orders of magnitude in probability."""

    enter_after: int = Field(3, ge=1)
    leave_after: int = Field(5, ge=1)
    leave_margin: float = Field(5.0, ge=0, le=30)  # health points


SECTIONS: dict[str, type[BaseModel]] = {"alarms": AlarmsConfig, "summary": SummaryConfig, "central": CentralConfig}
ALLOWED = ("alarms.enter_after", "alarms.leave_after", "alarms.leave_margin", "summary.window_s", "summary.grace_s",
           "central.sync_interval_s", "central.poll_s")
AT_NEXT_START = ("summary.window_s",)
NEVER = ("central.url", "central.token", "central.ca_file", "central.allow_insecure_http", "status.token",
         "mqtt.password", "model.path", "model.trusted_keys")


class OverrideError(ValueError):
    """Overrides that cannot be applied; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def problems(overrides: Mapping[str, Any]) -> list[str]:
    """What is wrong with `overrides` on their own (over the defaults); [] when they can be applied."""
    try:
        apply(overrides, {})
    except OverrideError as exc:
        return exc.problems
    return []


def apply(overrides: Mapping[str, Any], base: Mapping[str, BaseModel]) -> dict[str, BaseModel]:
    """Every section of `base` (section name -> the file's section model) and every section `overrides` touch,
    validated with the overrides over `base` (a section missing from `base` starts from its defaults): without
    overrides, `base` itself. OverrideError lists every problem."""
    found: list[str] = []
    changes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in NEVER:
            found.append(f"{key}: never set remotely (credentials, where data goes and which code runs stay in the "
                         "gateway's own configuration)")
        elif key not in ALLOWED:
            found.append(f"{key}: not remotely configurable; allowed: {', '.join(ALLOWED)}")
        else:
            section, name = key.split(".", 1)
            changes.setdefault(section, {})[name] = value
    sections: dict[str, BaseModel] = {}
    for section, values in {**{name: {} for name in base}, **changes}.items():
        model = SECTIONS[section]
        current = base.get(section)
        merged = {**(current.model_dump() if current is not None else {}), **values}
        try:
            sections[section] = model.model_validate(merged)
        except ValidationError as exc:
            for error in exc.errors(include_url=False, include_input=False):
                where = ".".join(str(part) for part in error["loc"])
                found.append(f"{section}.{where}: {error['msg'].removeprefix('Value error, ')}")
    if found:
        raise OverrideError(found)
    return sections
