"""atheris on the MQTT payload decoder, then the validator and the model: any topic and payload bytes become a
valid reading or a rejection with a reason, and nothing invalid reaches the model (the promises of
test_mqtt_payloads.py, with coverage guidance instead of strategies).
Run: python -m tests.fuzz.atheris_payloads -max_total_time=SECONDS"""

from __future__ import annotations

import atheris

# Only the decoder: with model.validate instrumented too, the process grew by about 1.4 KB a run inside atheris'
# tracing (2 GB, libFuzzer's RSS limit, in 1.3 M runs; the same calls without atheris stay at 105 MB). The
# validator has its own hypothesis fuzzer (test_mqtt_payloads.py) and is instrumented in atheris_registers.
with atheris.instrument_imports(include=["drivers.mqtt"]):
    from drivers.mqtt import MqttConfig, PayloadDecoder

from model.features import MACHINE_TYPE_INPUT
from model.package import load
from model.score import Scorer
from tests.fuzz.atheris_support import run
from tests.fuzz.test_mqtt_payloads import RECEIVED, assert_decoded, assert_scored_only_if_valid

CONFIGS = [{"default_machine_type": "M"}, {"machines": {"press-1": "H"}}, {},
           {"machine_id_from": "machine", "default_machine_type": "L"},
           {"payload_map": {"air": "air_temperature", "mt": MACHINE_TYPE_INPUT}, "default_machine_type": "M"}]
DECODERS = [PayloadDecoder(MqttConfig(url="mqtt://127.0.0.1", **config), MACHINE_TYPE_INPUT) for config in CONFIGS]
SCORER = Scorer(load())
TOPICS = ["pdm/press-1/telemetry", "pdm/lathe-07/telemetry", "pdm", "pdm/bad id!/telemetry", "", "pdm//x"]


def test_one_input(data: bytes) -> None:
    """The payload first, so that a seed's JSON stays JSON; the last two bytes pick the decoder and the topic."""
    payload, choice = data[:-2], data[-2:].rjust(2, b"\0")
    decoder = DECODERS[choice[0] % len(DECODERS)]
    topic = TOPICS[choice[1] % len(TOPICS)]
    reading = decoder.decode(topic, payload, RECEIVED)
    assert_decoded(reading, topic, payload)
    assert_scored_only_if_valid(SCORER, [reading])


def main() -> None:
    run("payloads", test_one_input)


if __name__ == "__main__":
    main()
