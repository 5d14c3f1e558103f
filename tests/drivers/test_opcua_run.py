"""`pdm-edge run` with `[[opcua]]` servers, as a subprocess, into its SQLite file: the readings of the values
written on a real asyncua server are stored and scored, once each, across a server restart; the status API shows
the driver; SIGTERM ends it cleanly. And the CLI tools: `opcua browse`, `opcua make-cert`, `simulate opcua`,
`demo --protocol opcua`."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("asyncua", reason="the opcua extra: pip install 'pdm-edge[opcua]'")

from agent.cli import main
from drivers.simulator import INPUTS
from testkit.net import free_port
from testkit.opcua import OpcuaServers

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def stored(data: Path, machine: str) -> list[float]:
    try:
        with sqlite3.connect(f"file:{data / 'agent.db'}?mode=ro", uri=True) as db:
            rows = db.execute('SELECT "values" FROM readings WHERE machine_id = ? ORDER BY id', (machine,)).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    return [json.loads(values)["tool_wear"] for (values,) in rows]


def test_run_stores_each_change_once_across_a_server_restart(tmp_path):
    status_port = free_port()
    with OpcuaServers() as servers:
        machines = {"m1": "L", "m2": "H"}
        port = servers.serve(machines)
        config = tmp_path / "agent.toml"
        data = tmp_path / "data"
        lines = ['gateway_id = "gw-opcua"', f'data_dir = "{data}"', 'log_format = "json"',
                 "[status]", f'bind = "127.0.0.1:{status_port}"',
                 # configured machines are always taken: before the fix the second was quarantined as unknown
                 "[machines]", "max_machines = 1",
                 "[[opcua]]", f'url = "opc.tcp://127.0.0.1:{port}"', 'name = "plc-1"', "sampling_ms = 50",
                 "backoff_max_s = 1.0"]
        for machine, machine_type in machines.items():
            lines += ["[[opcua.machines]]", f'machine_id = "{machine}"', f'machine_type = "{machine_type}"',
                      "[opcua.machines.nodes]", *(f'{name} = "ns=2;s={machine}.{name}"' for name in INPUTS)]
        config.write_text("\n".join(lines) + "\n")
        log = tmp_path / "agent.log"
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                       stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            written = {"m1": [10.0], "m2": [10.0]}
            wait_for(lambda: stored(data, "m1") and stored(data, "m2") or process.poll() is not None, 60,
                     "the first readings stored")
            assert process.poll() is None, log.read_text()[-2000:]

            def write(n: float) -> None:
                for machine in machines:
                    servers.write(port, machine, {"tool_wear": n})
                    written[machine].append(n)
                wait_for(lambda: all(stored(data, m)[-1:] == [n] for m in machines), 30, f"tool wear {n} stored")

            for n in range(1, 4):
                write(float(n))
            servers.stop(port)
            wait_for(lambda: "plc-1 unavailable" in log.read_text(), 30, "the loss logged")
            servers.serve(machines, port=port, keep=True)
            wait_for(lambda: "plc-1 available again" in log.read_text(), 60, "the reconnection logged")
            for n in range(4, 7):
                write(float(n))
            assert stored(data, "m1") == written["m1"] and stored(data, "m2") == written["m2"]
            with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/api/v1/status", timeout=10) as response:
                status = json.load(response)
            driver = next(d for d in status["drivers"] if d["name"] == "opcua")
            assert driver["connected"] is True
            assert driver["details"]["devices"]["plc-1"]["connection_losses"] == 1
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_browse_lists_the_simulator_with_units_and_node_map_entries(capsys):
    with OpcuaServers() as servers:
        port = servers.serve({"m1": "L"})
        assert main(["opcua", "browse", "--url", f"opc.tcp://127.0.0.1:{port}", "--node", "/Objects/2:Plant",
                     "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "ns=2;s=m1.torque" in out and "/Objects/2:Plant/2:m1/2:torque" in out
    assert any(line.split()[:4] == ["ns=2;s=m1.torque", "/Objects/2:Plant/2:m1/2:torque", "Double", "Nm"]
               for line in out.splitlines())
    assert 'torque = "ns=2;s=m1.torque"  # Double, Nm, now 40.0' in out


def test_browse_says_why_it_could_not(capsys):
    assert main(["opcua", "browse", "--url", f"opc.tcp://127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pdm-edge opcua browse: connection to opc.tcp://") and "refused" in err
    assert "Traceback" not in err


def test_make_cert_writes_a_pair_the_driver_can_use_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["opcua", "make-cert", "--out", str(tmp_path / "pki"), "--hostname", "gw-7"]) == 0
    assert "urn:gw-7:pdm-edge" in capsys.readouterr().out
    key = tmp_path / "pki" / "client-key.pem"
    assert key.stat().st_mode & 0o077 == 0  # the private key is the owner's alone
    from drivers.opcua_security import certificate_uri

    assert certificate_uri(tmp_path / "pki" / "client-cert.der") == "urn:gw-7:pdm-edge"
    assert main(["opcua", "make-cert", "--out", str(tmp_path / "pki")]) == 1
    assert "exists" in capsys.readouterr().err


def test_demo_over_opcua_scores_the_simulated_plant(tmp_path):
    data_dir = tmp_path / "demo"
    process = subprocess.Popen([sys.executable, "-m", "agent.cli", "demo", "--protocol", "opcua", "--machines", "3",
                                "--data-dir", str(data_dir), "--status-port", str(free_port())],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any(len(stored(data_dir, m)) >= 2 for m in ("m1", "m2", "m3")) or process.poll() is not None,
                 90, "readings from the OPC UA simulator")
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert "3 simulated machines on OPC UA opc.tcp://127.0.0.1:" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_opcua_example_validates(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["check-config", "--config", str(ROOT / "examples" / "simulator-opcua.toml")]) == 0
    assert "configuration valid" in capsys.readouterr().err


def test_browse_saves_the_server_certificate_to_trust_then_browses_over_basic256sha256(tmp_path, capsys):
    from testkit.opcua import make_cert

    server_cert, server_key = make_cert(tmp_path / "server", "server")
    client_cert, client_key = make_cert(tmp_path / "client", "client", server=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    with OpcuaServers() as servers:
        port = servers.serve({"m1": "L"}, cert=(server_cert, server_key))
        url = f"opc.tcp://127.0.0.1:{port}"
        secure = ["--security-policy", "Basic256Sha256", "--certificate", str(client_cert), "--private-key",
                  str(client_key), "--trusted", str(trusted), "--node", "/Objects/2:Plant", "--depth", "2"]
        assert main(["opcua", "browse", "--url", url, *secure]) == 1
        assert "is not trusted" in capsys.readouterr().err
        assert main(["opcua", "browse", "--url", url, "--save-cert", str(trusted / "server.der")]) == 0
        assert (trusted / "server.der").read_bytes() == server_cert.read_bytes()
        capsys.readouterr()
        assert main(["opcua", "browse", "--url", url, *secure]) == 0
    assert 'torque = "ns=2;s=m1.torque"' in capsys.readouterr().out
