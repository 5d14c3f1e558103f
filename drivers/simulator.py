"""The plant simulator: N milling machines that behave like the AI4I 2020 data's, pure and I/O-free.

Hand-made dynamics, not rows of the data set:
- air temperature: a plant-wide ambient (about 300 K, a slow swing of ±1 K) plus a small per-machine offset and a
  slow random walk; process temperature: air + about 10 K (the data's mean difference);
- rotational speed: a job's set point (1400-1700 rpm), held for a while, with a random walk around it; torque
  follows the job's mechanical power (5.2-6.8 kW): torque = power / (speed * 2π/60), as in the data where power is
  nearly constant;
- tool wear grows while the machine cuts (type H/M/L wear 5/3/2 parts per unit of time, as in the data) and resets
  to 0 at a tool change, which a healthy machine gets at 120-190 min (before the tool-wear-failure band);
- every reading has sensor noise and is rounded to sensor resolution: 0.1 K, 1 rpm, 0.1 Nm, 1 min.

Time is lapsed: tool wear grows `wear_rate` minutes per second of simulated time (default 0.5), so a tool lives a
few minutes instead of hours; temperatures, speed and torque move at their real pace.

One machine can be driven towards a failure mode (`Drift`): from `start_s`, over `minutes`, the affected values
move linearly from the machine's healthy behaviour to a point past the mode's documented condition, and stay there:

    mode  condition (MODEL_NOTES / the data set's description)       the drift's end point
    HDF   process - air < 8.6 K and speed < 1380 rpm                 difference 7.8 K (air +2 K), speed 1320 rpm
    PWF   power = torque * speed * 2π/60 < 3500 W or > 9000 W        torque 68 Nm at 1400 rpm: about 9,970 W
    OSF   tool wear * torque > 11,000 / 12,000 / 13,000 (L / M / H)  torque 62 Nm at 1360 rpm, wear to 1.12 x limit
    TWF   tool wear 200-240 min                                      wear 235 min (no tool change)

`failure_modes(values, machine_type)` applies those conditions to one reading.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from drivers.base import MachineType
from model.modes import MODES

INPUTS = ("air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
# machine i gets TYPES[i % 6]: about the data's 60/30/10 % mix
TYPES: tuple[MachineType, ...] = ("L", "M", "L", "H", "L", "M")
OSF_LIMIT = {"L": 11_000.0, "M": 12_000.0, "H": 13_000.0}  # min * Nm
WEAR_PER_TYPE = {"L": 2.0, "M": 3.0, "H": 5.0}  # the data's "H/M/L add 5/3/2 minutes of tool wear"
RESOLUTION = {"air_temperature": 0.1, "process_temperature": 0.1, "rotational_speed": 1.0, "torque": 0.1,
              "tool_wear": 1.0}
HDF_DIFF_K, HDF_SPEED_RPM = 8.6, 1380.0
PWF_MIN_W, PWF_MAX_W = 3500.0, 9000.0
TWF_WEAR_MIN = 200.0
RAMP_END = 0.5  # speed and torque reach the drift's operating point at half the drift
CREEP = ((0.5, 0.98), (0.9, 1.02))  # (progress, stress ratio): the slow crossing of the condition
END_STRESS = {"HDF": 8.6 / 7.8, "PWF": 1.1, "OSF": 1.12, "TWF": 235 / 200}


def power_w(torque: float, speed: float) -> float:
    return torque * speed * 2 * math.pi / 60


def failure_modes(values: dict[str, float], machine_type: str) -> set[str]:
    """The documented generating rules of the AI4I data, applied to one reading (TWF: wear in the failure band)."""
    modes = set()
    if values["process_temperature"] - values["air_temperature"] < HDF_DIFF_K \
            and values["rotational_speed"] < HDF_SPEED_RPM:
        modes.add("HDF")
    if not PWF_MIN_W <= power_w(values["torque"], values["rotational_speed"]) <= PWF_MAX_W:
        modes.add("PWF")
    if values["tool_wear"] * values["torque"] > OSF_LIMIT[machine_type]:
        modes.add("OSF")
    if values["tool_wear"] >= TWF_WEAR_MIN:
        modes.add("TWF")
    return modes


@dataclass(frozen=True)
class Drift:
    """Drive `machine_id` towards `mode` (HDF, PWF, OSF, TWF) from `start_s` of plant time, over `minutes`."""

    machine_id: str
    mode: str
    minutes: float = 1.5
    start_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown failure mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.minutes <= 0:
            raise ValueError("the drift's duration must be more than 0 minutes")

    @classmethod
    def parse(cls, text: str, minutes: float = 1.5) -> Drift:
        """'m3:OSF' -> Drift('m3', 'OSF')."""
        machine_id, sep, mode = text.partition(":")
        if not sep or not machine_id:
            raise ValueError(f"expected MACHINE:MODE such as m3:OSF, got {text!r}")
        return cls(machine_id, mode.upper(), minutes)

    def progress(self, t: float) -> float:
        return min(1.0, max(0.0, (t - self.start_s) / (self.minutes * 60)))


@dataclass
class Machine:
    """One machine's hidden state (true values, before sensor noise)."""

    machine_id: str
    machine_type: MachineType
    air_offset: float
    diff: float  # process - air, K
    speed_setpoint: float
    power_setpoint: float  # W
    speed: float
    tool_wear: float
    tool_change_at: float
    job_left_s: float
    tool_changes: int = 0
    values: dict[str, float] = field(default_factory=dict)  # the last reading


class Plant:
    """`Plant(machines, seed, drift)`; `step(dt)` advances plant time by dt seconds and returns one reading per
    machine: {machine_id: {input name: value at sensor resolution}}. Deterministic for a seed and a sequence of dt."""

    def __init__(self, machines: int = 5, seed: int | None = 0, drift: Drift | tuple[str, str] | None = None,
                 wear_rate: float = 0.5) -> None:
        if machines < 1:
            raise ValueError("a plant has at least one machine")
        if isinstance(drift, tuple):
            drift = Drift(*drift)
        self.rng = random.Random(seed)
        self.t = 0.0
        self.wear_rate = wear_rate
        self.machines: dict[str, Machine] = {}
        for i in range(machines):
            machine_id = f"m{i + 1}"
            speed = self.rng.uniform(1420, 1680)
            self.machines[machine_id] = Machine(
                machine_id, TYPES[i % len(TYPES)], air_offset=self.rng.gauss(0, 0.4), diff=self.rng.gauss(10.0, 0.3),
                speed_setpoint=speed, power_setpoint=self.rng.uniform(5200, 6800), speed=speed,
                tool_wear=self.rng.uniform(0, 100), tool_change_at=self.rng.uniform(120, 190),
                job_left_s=self.rng.uniform(30, 120))
        if drift is not None and drift.machine_id not in self.machines:
            raise ValueError(f"cannot drift {drift.machine_id}: the plant has machines m1..m{machines}")
        self.drift = drift

    def drift_note(self, machine_id: str) -> str:
        """", drifting towards TWF over 30 min" for the machine that drifts, "" for the others."""
        drift = self.drift
        return "" if drift is None or drift.machine_id != machine_id else \
            f", drifting towards {drift.mode} over {drift.minutes:g} min"

    def machine_type(self, machine_id: str) -> MachineType:
        return self.machines[machine_id].machine_type

    def step(self, dt: float) -> dict[str, dict[str, float]]:
        if dt < 0:
            raise ValueError("time runs forward: dt must be 0 or more")
        self.t += dt
        ambient = 300.0 + 1.0 * math.sin(2 * math.pi * self.t / 900)  # a 15-minute swing
        return {machine_id: self._step(machine, dt, ambient) for machine_id, machine in self.machines.items()}

    def _step(self, m: Machine, dt: float, ambient: float) -> dict[str, float]:
        rng = self.rng
        root = math.sqrt(dt)
        drift = self.drift if self.drift is not None and self.drift.machine_id == m.machine_id else None
        f = drift.progress(self.t) if drift is not None else 0.0
        mode = drift.mode if drift is not None else None

        # a new job now and then: a new speed and power set point
        m.job_left_s -= dt
        if m.job_left_s <= 0:
            m.speed_setpoint = rng.uniform(1420, 1680)
            m.power_setpoint = rng.uniform(5200, 6800)
            m.job_left_s = rng.uniform(30, 120)
        # slow random walks, pulled back to their means (Ornstein-Uhlenbeck, discretised)
        m.air_offset += -0.01 * m.air_offset * dt + 0.03 * root * rng.gauss(0, 1)
        m.diff += -0.02 * (m.diff - 10.0) * dt + 0.03 * root * rng.gauss(0, 1)
        m.speed += -0.3 * (m.speed - m.speed_setpoint) * dt + 8.0 * root * rng.gauss(0, 1)
        m.tool_wear += self.wear_rate * WEAR_PER_TYPE[m.machine_type] / 3 * dt
        if mode in ("OSF", "TWF"):
            m.tool_wear = min(m.tool_wear, self._wear_target(m))  # nobody changes the tool of the drifting machine
        elif m.tool_wear >= m.tool_change_at:
            m.tool_wear, m.tool_changes = 0.0, m.tool_changes + 1
            m.tool_change_at = rng.uniform(120, 190)

        air = ambient + m.air_offset
        diff, speed, wear = m.diff, m.speed, m.tool_wear
        power = m.power_setpoint * (1 + 0.02 * rng.gauss(0, 1))
        torque = power / (speed * 2 * math.pi / 60)
        if mode is not None:
            ramp = min(1.0, f / RAMP_END)  # the operating point moves during the first part of the drift
            if mode == "HDF":
                air += 2.0 * f
                speed += ramp * (1320 - speed)
                torque = power / (speed * 2 * math.pi / 60)
                diff = HDF_DIFF_K / _stress(mode, f, HDF_DIFF_K / diff)
            elif mode == "PWF":
                speed += ramp * (1400 - speed)
                omega = speed * 2 * math.pi / 60
                torque = _stress(mode, f, torque * omega / PWF_MAX_W) * PWF_MAX_W / omega
            elif mode == "OSF":
                speed += ramp * (1360 - speed)
                torque += ramp * (62 - torque)
                limit = OSF_LIMIT[m.machine_type]
                wear = _stress(mode, f, wear * torque / limit) * limit / torque
            else:  # TWF
                wear = _stress(mode, f, wear / TWF_WEAR_MIN) * TWF_WEAR_MIN

        true = {"air_temperature": air, "process_temperature": air + diff, "rotational_speed": speed,
                "torque": torque, "tool_wear": wear}
        noise = {"air_temperature": 0.05, "process_temperature": 0.05, "rotational_speed": 3.0, "torque": 0.2,
                 "tool_wear": 0.0}
        m.values = {name: _at_resolution(value + noise[name] * rng.gauss(0, 1), RESOLUTION[name])
                    for name, value in true.items()}
        return dict(m.values)

    def _wear_target(self, m: Machine) -> float:
        """Where the natural tool wear of the drifting machine stops (the drift sets the wear it reports)."""
        return 250.0


def _stress(mode: str, f: float, healthy: float) -> float:
    """The drifting machine's stress ratio at progress f: 1 is the mode's condition. From the healthy value at
    f = 0 to just below the condition at f = CREEP[0], slowly through it until CREEP[1] (the model's warning
    band is narrow: a slow crossing shows it), then on to the end point."""
    (f1, r1), (f2, r2) = CREEP
    start = min(healthy, r1)
    if f <= f1:
        return start + (r1 - start) * f / f1
    if f <= f2:
        return r1 + (r2 - r1) * (f - f1) / (f2 - f1)
    return r2 + (END_STRESS[mode] - r2) * (f - f2) / (1 - f2)


def _at_resolution(value: float, resolution: float) -> float:
    if resolution == 1.0:
        return float(round(value))
    return round(round(value / resolution) * resolution, 1)
