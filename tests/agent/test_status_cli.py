"""`pdm-edge status` (agent/status_cli.py) against a running agent's status API over real HTTP."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent import cli, status_cli
from tests.agent.test_status import TOKEN, Served, open_agent, token_agent


@pytest.fixture(scope="module")
def served(tmp_path_factory, mqtt_broker) -> Iterator[Served]:
    with open_agent(tmp_path_factory.mktemp("status-cli"), mqtt_broker) as running:
        yield running


@pytest.fixture
def with_token(tmp_path) -> Iterator[Served]:
    with token_agent(tmp_path) as running:
        yield running


def closed_port_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_json_has_the_status_and_every_machine(served, capsys):
    assert status_cli.main(served.url, None, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"]["gateway_id"] == "gw-status-test"
    assert [m["machine_id"] for m in out["machines"]] == ["m-hdf", "m-ood", "m-ok"]
    assert out["machines"][0]["dominant"]["mode"] == "HDF"


def test_table_shows_machines_worst_first_and_a_gateway_line(served, capsys):
    assert status_cli.main(served.url, None, as_json=True) == 0
    risk = json.loads(capsys.readouterr().out)["machines"][0]["dominant"]["risk"]  # the model's, whichever it is
    assert status_cli.main(served.url, None, as_json=False) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MACHINE", "STATE", "HEALTH", "TOP", "RISK", "LAST", "READING", "NOTES"]
    heat, worn, fine = lines[1:4]
    assert risk > 0.9 and heat.split()[:2] == ["m-hdf", "alarm"]
    assert f"heat dissipation (HDF {100 * risk:.0f}%)" in heat
    assert worn.split()[:2] == ["m-ood", "alarm"] and "overstrain (OSF" in worn
    assert "outside training range: tool_wear" in worn
    assert fine.split()[:3] == ["m-ok", "ok", "93"] and "none elevated" in fine and " ago" in fine
    assert "\033[" not in "\n".join(lines)  # no colour when not on a terminal
    gateway = lines[-1]
    for part in ("gateway gw-status-test", "model ai4i-failure 1.0.0", "sync off", "drivers: mqtt connected",
                 "to send (oldest"):
        assert part in gateway, gateway


def test_the_open_alarm_episodes_show_who_acknowledged_them(with_token, capsys):
    """Issue 18: a technician at the terminal sees which alarms are open and whether someone has taken them."""
    assert status_cli.main(with_token.url, TOKEN, as_json=False) == 0
    out = capsys.readouterr().out
    assert "open alarm episodes: 2" in out
    heat = next(line for line in out.splitlines() if line.strip().startswith("m-hdf") and "[" in line)
    assert "alarm" in heat and "heat dissipation" in heat and "NOT acknowledged" in heat
    episode = heat.rsplit("[", 1)[1].rstrip("]")

    acked = with_token.get(f"/api/v1/alarms/{episode}/acknowledge", TOKEN, method="POST", json={"by": "Ana"})
    assert acked.status_code == 200, acked.text
    assert status_cli.main(with_token.url, TOKEN, as_json=False) == 0
    out = capsys.readouterr().out
    heat = next(line for line in out.splitlines() if episode in line)
    assert "acknowledged by Ana at the gateway" in heat and "NOT acknowledged" not in heat
    assert "1 acknowledgement(s)/label(s) not yet at central" in out
    assert status_cli.main(with_token.url, TOKEN, as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)["alarms"]["alarms"]
    assert {a["episode_id"]: a["acknowledged_by"] for a in listed}[episode] == "Ana"


def test_table_colours_states_on_a_terminal(served, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Terminal()
    assert status_cli.main(served.url, None, as_json=False, out=out) == 0
    assert "\033[1;31malarm" in out.getvalue() and "\033[32mok" in out.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = Terminal()
    status_cli.main(served.url, None, as_json=False, out=plain)
    assert "\033[" not in plain.getvalue()


@pytest.mark.parametrize("as_json", [True, False])
def test_an_unreachable_agent_exits_1_with_a_clear_message(capsys, as_json):
    url = closed_port_url()
    assert status_cli.main(url, None, as_json=as_json) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"the agent is not reachable at {url}" in captured.err and "--url" in captured.err


@pytest.mark.parametrize("url", ["notaurl", "ftp://127.0.0.1:8080"])
def test_a_url_that_is_not_one_is_said_so_in_words(capsys, url):
    assert status_cli.main(url, None, as_json=False) == 1
    err = capsys.readouterr().err
    assert f"the agent is not reachable at {url} (not a URL such as http://127.0.0.1:8080)" in err
    assert "Schema" not in err and "InvalidURL" not in err


def test_a_token_is_sent_and_its_absence_explained(with_token, capsys):
    assert status_cli.main(with_token.url, None, as_json=True) == 1
    assert "needs the status token: set PDM_STATUS__TOKEN" in capsys.readouterr().err
    assert status_cli.main(with_token.url, "wrong-token-of-the-same-length!!", as_json=True) == 1
    assert "the token was refused" in capsys.readouterr().err
    assert status_cli.main(with_token.url, TOKEN, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["status"]["gateway_id"] == "gw-status-test"


def test_token_from_the_environment_or_a_file(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert status_cli.token_from_env({"PDM_STATUS__TOKEN": TOKEN}) == TOKEN
    assert status_cli.token_from_env({"PDM_STATUS__TOKEN_FILE": str(secret)}) == TOKEN
    assert status_cli.token_from_env({}) is None


def test_the_subcommand_parses_url_and_json(served, capsys, monkeypatch):
    monkeypatch.delenv("PDM_STATUS__TOKEN", raising=False)
    monkeypatch.delenv("PDM_STATUS__TOKEN_FILE", raising=False)
    root = argparse.ArgumentParser(prog="pdm-edge")
    status_cli.add_command(root.add_subparsers(dest="command", required=True))
    args = root.parse_args(["status", "--url", served.url, "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["machines"]
    assert root.parse_args(["status"]).url == os.environ.get("PDM_STATUS_URL", "http://127.0.0.1:8080")


def pdm_edge(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDM_")}
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


def registered() -> bool:
    subcommands = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "status" in subcommands.choices


@pytest.mark.skipif(not registered(), reason="`status` is not registered in agent/cli.py yet: add "
                                             "`status_cli.add_command(commands)` to parser()")
def test_pdm_edge_status_command(served):
    result = pdm_edge("status", "--url", served.url, "--json")
    assert result.returncode == 0, result.stderr
    assert [m["machine_id"] for m in json.loads(result.stdout)["machines"]] == ["m-hdf", "m-ood", "m-ok"]
    table = pdm_edge("status", "--url", served.url)
    assert table.returncode == 0 and table.stdout.startswith("MACHINE") and "m-hdf" in table.stdout
    down = pdm_edge("status", "--url", closed_port_url())
    assert down.returncode == 1 and "not reachable" in down.stderr


@pytest.mark.parametrize("name", ["Ana\u202eevil", "Ana\x9b31m", "Ana\x1b[2J"], ids=["bidi", "c1", "esc"])
def test_a_name_a_terminal_would_obey_is_refused_as_central_refuses_it(with_token, name):
    """Issue 22 item 7: the agent took C1 controls and bidi overrides in a technician's name, which central then
    refused and `pdm-edge status` printed raw."""
    assert status_cli.main(with_token.url, TOKEN, as_json=True, out=io.StringIO()) == 0
    episode = with_token.get("/api/v1/alarms", TOKEN).json()["alarms"][0]["episode_id"]
    refused = with_token.get(f"/api/v1/alarms/{episode}/acknowledge", TOKEN, method="POST", json={"by": name})
    assert refused.status_code == 422 and refused.json()["error"]["details"][0]["loc"][-1] == "by"
    assert with_token.get("/api/v1/alarms", TOKEN).json()["alarms"][0]["acknowledged_at"] is None


def test_what_the_agent_answers_is_printed_escaped(with_token, monkeypatch):
    """Whatever reached the buffer before a rule (an old row, a future field), the terminal gets escapes, not
    commands: in the table and in --json."""
    real = status_cli._get

    def tampered(session, base, path):
        body = real(session, base, path)
        if path == "/api/v1/status":
            body["gateway_id"] = "gw\x1b]0;owned\x07\u202e"
        return body

    monkeypatch.setattr(status_cli, "_get", tampered)
    for as_json in (False, True):
        out = io.StringIO()
        assert status_cli.main(with_token.url, TOKEN, as_json=as_json, out=out) == 0
        text = out.getvalue()
        assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "gateway gw\\x1b]0;owned\\x07\\u202e" in status_cli_table(with_token.url)


def status_cli_table(url: str) -> str:
    out = io.StringIO()
    status_cli.main(url, TOKEN, as_json=False, out=out)
    return out.getvalue()
