"""atheris on Modbus register decoding: any words in any type and order decode to a number or raise the documented
ValueError, decode and encode are inverses, and a NaN or infinite value is rejected before the model (the promises
of test_registers.py, with coverage guidance). Run: python -m tests.fuzz.atheris_registers -max_total_time=SECONDS"""

from __future__ import annotations

import math

import atheris

with atheris.instrument_imports(include=["drivers.registers", "model.validate"]):
    from drivers.registers import ORDERS, REGISTER_WORDS, decode_raw, encode_raw

from model.features import INPUT_NAMES, MACHINE_TYPE_INPUT
from model.package import load
from model.validate import Reason, Rejection, Validator
from tests.fuzz.atheris_support import run

TYPES = list(REGISTER_WORDS)
VALIDATOR = Validator(load().manifest)
GOOD = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500, "torque": 40.0,
        "tool_wear": 10, MACHINE_TYPE_INPUT: "M"}


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    type_ = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
    order = ORDERS[fdp.ConsumeIntInRange(0, len(ORDERS) - 1)]
    count = fdp.ConsumeIntInRange(0, 5)
    words = fdp.ConsumeIntListInRange(count, 0, 0xFFFF) if fdp.ConsumeBool() else fdp.ConsumeIntList(count, 3)
    try:
        value = decode_raw(words, type_, *order)
    except ValueError:
        assert len(words) != REGISTER_WORDS[type_] or any(not 0 <= w <= 0xFFFF for w in words)
        return
    assert encode_raw(value, type_, *order) == words or (isinstance(value, float) and math.isnan(value))
    scale, offset = fdp.ConsumeRegularFloat(), fdp.ConsumeRegularFloat()
    name = INPUT_NAMES[fdp.ConsumeIntInRange(0, len(INPUT_NAMES) - 1)]
    scaled = value * scale + offset  # as drivers.registers.decode does; may be NaN or infinite
    checked = VALIDATOR.check({**GOOD, name: scaled})
    if isinstance(checked, Rejection):
        assert checked.reason in (Reason.NOT_FINITE, Reason.OUT_OF_RANGE) and checked.input == name
        assert checked.reason is Reason.NOT_FINITE or math.isfinite(scaled)
    else:
        assert all(math.isfinite(v) for v in checked[0])


def main() -> None:
    run("registers", test_one_input)


if __name__ == "__main__":
    main()
