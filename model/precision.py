"""The precision the manifest states its numbers at, so a package retrained on another CPU reproduces the shipped one.

Training sums in BLAS kernels chosen per CPU (OpenBLAS picks AVX2 on one processor, AVX-512 on another), so the
calibration's coefficients, and the out-of-fold probabilities the thresholds are chosen among, move in the 16th
digit from one CPU to another. Which reading a threshold is chosen at depends on the order of those probabilities
alone (a sigmoid with coefficients a few ulps apart keeps it), so only the chosen value carries the noise: the
manifest states thresholds at THRESHOLD_DIGITS significant digits and metrics at METRIC_DECIMALS decimals, far
above it. Two packages reproduce each other when every number agrees to within one unit of that precision
(`differences`): rounding a value that sits, by chance, on a rounding boundary can still go either way.
"""

from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal

THRESHOLD_DIGITS = 6  # significant digits of each threshold (and health point) in the manifest
METRIC_DECIMALS = 4  # decimals of each reported metric
THRESHOLD_KEYS = ("threshold", "warning", "alarm")  # metric keys whose values are thresholds


class PrecisionError(ValueError):
    """No threshold at the stated precision separates the readings as the exact one does."""


def unit(value: float, digits: int = THRESHOLD_DIGITS) -> float:
    """One unit in the last of `digits` significant digits of value."""
    return 10.0 ** (math.floor(math.log10(abs(value))) - digits + 1) if value else 10.0 ** -digits


def _step(value: float, digits: int) -> Decimal:
    return Decimal(1).scaleb(math.floor(math.log10(abs(value))) - digits + 1)


def _rounded(value: float, rounding: str, digits: int) -> float:
    return float(Decimal(value).quantize(_step(value, digits), rounding=rounding))  # the binary value, not its repr


def threshold_at_or_below(chosen: float, below: float, digits: int = THRESHOLD_DIGITS) -> float:
    """A threshold flagging exactly the scores >= chosen when the highest unflagged one is `below`: chosen rounded
    down to `digits` significant digits."""
    stated = _rounded(chosen, ROUND_FLOOR, digits)
    if not below < stated <= chosen:
        raise PrecisionError(f"scores {below!r} and {chosen!r} are closer than {digits} significant digits")
    return stated


def threshold_above(highest_unflagged: float, next_score: float, digits: int = THRESHOLD_DIGITS) -> float:
    """The lowest threshold at `digits` significant digits above highest_unflagged, which must not pass
    next_score (the lowest score to stay flagged)."""
    step = _step(highest_unflagged, digits)
    grid = Decimal(highest_unflagged).quantize(step, rounding=ROUND_FLOOR)
    stated = float(grid + step)
    if stated <= highest_unflagged:  # the float nearest a grid point can sit a hair below it
        stated = float(grid + 2 * step)
    if not highest_unflagged < stated <= next_score:
        raise PrecisionError(f"scores {highest_unflagged!r} and {next_score!r} are closer than {digits} "
                             "significant digits")
    return stated


def differences(shipped: object, again: object, path: str = "") -> list[str]:
    """Where two manifests' figures (thresholds, metrics: nested dicts, lists, numbers) disagree at the stated
    precision: thresholds by more than one unit of THRESHOLD_DIGITS, other numbers by more than one unit of
    METRIC_DECIMALS, anything else by not being equal."""
    if isinstance(shipped, dict) and isinstance(again, dict):
        if shipped.keys() != again.keys():
            return [f"{path or 'top'}: keys {sorted(shipped)} vs {sorted(again)}"]
        return [d for key in shipped for d in differences(shipped[key], again[key], f"{path}.{key}".lstrip("."))]
    if isinstance(shipped, list | tuple) and isinstance(again, list | tuple):
        if len(shipped) != len(again):
            return [f"{path}: {len(shipped)} items vs {len(again)}"]
        return [d for i, (a, b) in enumerate(zip(shipped, again)) for d in differences(a, b, f"{path}[{i}]")]
    numbers = (int, float)
    if isinstance(shipped, numbers) and isinstance(again, numbers) and not isinstance(shipped, bool):
        is_threshold = path.rsplit(".", 1)[-1] in THRESHOLD_KEYS or path.startswith("modes.")
        tolerance = unit(max(abs(shipped), abs(again))) if is_threshold else 10.0 ** -METRIC_DECIMALS
        return [] if abs(shipped - again) <= tolerance * (1 + 1e-9) else [f"{path}: {shipped!r} vs {again!r}"]
    return [] if shipped == again else [f"{path}: {shipped!r} vs {again!r}"]
