"""`pdm-edge` as a user runs it: a real subprocess, real stdin and stdout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from model.package import SHIPPED

HEALTHY = ('{"machine_id": "press-1", "ts": 1700000000, "machine_type": "M", "air_temperature": 300.0, '
           '"process_temperature": 310.0, "rotational_speed": 1500, "torque": 40.0, "tool_wear": 100}')


def pdm_edge(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], input=stdin, check=False, capture_output=True,
                          text=True, timeout=120)


def test_model_info_shows_inputs_thresholds_and_figures():
    run = pdm_edge("model", "info")
    assert run.returncode == 0, run.stderr
    for text in ("ai4i-failure", "air_temperature", "physical range", "alarm from", "ROC-AUC", "trained with"):
        assert text in run.stdout


def test_model_verify_accepts_the_shipped_package_and_refuses_a_changed_one(tmp_path):
    assert pdm_edge("model", "verify").returncode == 0
    package = tmp_path / "pkg"
    shutil.copytree(SHIPPED, package)
    with open(package / "model.onnx", "ab") as f:
        f.write(b"\0")
    run = pdm_edge("model", "verify", str(package))
    assert run.returncode == 1
    assert "but the manifest says" in run.stderr


def test_model_score_reports_each_line_and_goes_on_after_bad_ones():
    lines = [HEALTHY, "{not json", "[1, 2]", HEALTHY.replace("40.0", "NaN"), "", HEALTHY.replace("100}", '"x"}')]
    run = pdm_edge("model", "score", stdin="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert [o.get("rejected", {}).get("reason") for o in out] == [
        None, "malformed", "not_an_object", "not_finite", "not_a_number"]
    first = out[0]
    assert (first["machine_id"], first["ts"], first["state"]) == ("press-1", 1700000000, "ok")
    assert set(first["risk"]) == {"TWF", "HDF", "PWF", "OSF"} and first["model"].startswith("ai4i-failure")


def test_model_score_reads_csv_with_the_ai4i_column_names():
    from model.manifest import Manifest

    manifest = Manifest.load(SHIPPED)
    header = ",".join(["UDI", manifest.machine_type.source_column, *(i.source_column for i in manifest.inputs)])
    rows = ["1,L,300.0,310.0,1500,40.0,10", "2,L,300.0,310.0,1500,,10", "3,L,300.0,310.0,2800,10.0,10"]
    run = pdm_edge("model", "score", stdin="\n".join([header, *rows]) + "\n")
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert out[0]["state"] == "ok"
    assert out[1]["rejected"]["reason"] == "missing_input" and out[1]["rejected"]["input"] == "torque"
    assert out[2]["state"] == "alarm" and out[2]["dominant_mode"] == "PWF"


def test_model_score_reports_hostile_lines_inline_and_goes_on():
    """A huge line, a deeply nested array, a byte-order mark, an unfinished line: each is one rejection with a
    one-line reason (no traceback), and the readings around them are scored."""
    lines = ["\ufeff" + HEALTHY, "x" * 200_000, "[" * 4_000 + "]" * 4_000, '{"machine_type": "M"', HEALTHY]
    run = pdm_edge("model", "score", stdin="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert [o.get("state") or o["rejected"]["reason"] for o in out] == ["ok", "malformed", "malformed", "malformed",
                                                                       "ok"]
    assert "longer than 10,000 characters" in out[1]["rejected"]["message"]
    assert out[2]["rejected"]["message"] == "not JSON: nested too deeply"
    assert out[3]["rejected"]["message"] == "not JSON: Expecting ',' delimiter at the end of the line"


def test_model_score_takes_input_starting_with_garbage_as_json_lines():
    run = pdm_edge("model", "score", stdin="\x00garbage \xff\n" + HEALTHY + "\n")
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert out[0]["rejected"]["reason"] == "malformed" and out[1]["state"] == "ok"


def test_model_score_reports_a_huge_csv_field_inline():
    from model.manifest import Manifest

    manifest = Manifest.load(SHIPPED)
    header = ",".join([manifest.machine_type.source_column, *(i.source_column for i in manifest.inputs)])
    rows = ["L,300.0,310.0,1500,40.0,10", "L," + "9" * 200_000 + ",310.0,1500,40.0,10", "L,300.0,310.0,1500,40.0,10"]
    run = pdm_edge("model", "score", stdin="\ufeff" + "\n".join([header, *rows]) + "\n")
    assert run.returncode == 0, run.stderr
    out = [json.loads(line) for line in run.stdout.splitlines()]
    assert [o.get("state") or o["rejected"]["reason"] for o in out] == ["ok", "malformed", "ok"]


def test_model_score_exits_2_when_the_csv_lacks_model_columns():
    run = pdm_edge("model", "score", stdin="a,b\n1,2\n")
    assert run.returncode == 2
    assert "lacks the columns" in run.stderr and "Torque [Nm]" in run.stderr


@pytest.mark.usefixtures("ai4i")
def test_model_evaluate_recomputes_the_manifest_figures(ai4i_path):
    run = pdm_edge("model", "evaluate", "--data", str(ai4i_path))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["failure"]["roc_auc"] >= 0.98


def write_config(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


MQTT_CONFIG = 'gateway_id = "gw-1"\n[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n'


def test_check_config_prints_the_effective_config_with_secrets_redacted(tmp_path, monkeypatch):
    token = "s3cret-token-0123456789"
    path = write_config(tmp_path, MQTT_CONFIG + '[central]\nurl = "https://central.example"\n')
    monkeypatch.setenv("PDM_CENTRAL__TOKEN", token)
    monkeypatch.chdir(tmp_path)
    run = pdm_edge("check-config", "--config", str(path))
    assert run.returncode == 0, run.stderr
    effective = json.loads(run.stdout)
    assert effective["gateway_id"] == "gw-1" and effective["central"]["token"] == "***"
    assert token not in run.stdout + run.stderr


def test_check_config_lists_every_problem_and_exits_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, '[mqtt]\nurl = "ftp://x"\nqos = 2\n[surprise]\n')
    run = pdm_edge("check-config", "--config", str(path))
    assert run.returncode == 1
    for key in ("gateway_id", "mqtt.url", "mqtt.qos", "surprise"):
        assert key in run.stderr


def test_check_config_refuses_a_model_package_with_a_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    package = tmp_path / "pkg"
    shutil.copytree(SHIPPED, package)
    (package / "model.onnx").write_bytes(b"not the model")
    path = write_config(tmp_path, MQTT_CONFIG + f'[model]\npath = "{package}"\n')
    run = pdm_edge("check-config", "--config", str(path))
    assert run.returncode == 1
    assert "model.path" in run.stderr and "but the manifest says" in run.stderr


def test_check_config_refuses_a_device_that_lacks_a_model_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registers = "".join(f'[modbus.registers.{name}]\naddress = {i}\n' for i, name in enumerate(
        ("air_temperature", "process_temperature", "rotational_speed", "torque")))
    device = '[[modbus]]\nmachine_id = "press-1"\nmachine_type = "M"\ntransport = "tcp"\nhost = "127.0.0.1"\n'
    run = pdm_edge("check-config", "--config", str(write_config(tmp_path, 'gateway_id = "gw-1"\n' + device + registers)))
    assert run.returncode == 1
    assert "modbus[0].registers: no register for model input tool_wear" in run.stderr
