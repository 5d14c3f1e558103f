"""Issue 22: hostile inputs to `pdm-edge run` as a process: idle and slow connections, token guessing, the data
folder's modes, a model package whose manifest changes under the agent. Real TCP on loopback: 127.0.0.1 and
127.0.0.2 (and .3, .4) are different client addresses to the agent."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from model.package import SHIPPED
from testkit.mqtt import Publisher
from tests.agent.test_run import EVERY_WINDOW, AgentProcess, reading, wait_for

TOKEN = "hostile-test-token-Xq7vR2pL9sKd3mWz"
IDLE_CONNECTIONS = 70  # above uvicorn's limit_concurrency (64): what locked the API


def get(port: int, path: str, source: str = "127.0.0.1", token: str | None = None) -> Any:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    connection.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
    response: Any = connection.getresponse()
    response.body = response.read()  # read before the connection closes
    connection.close()
    return response


def closed_by_the_agent(sock: socket.socket, within_s: float) -> bool:
    """True once the agent has closed (or reset) `sock`; False if it is still open after `within_s`."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def refused(port: int, source: str) -> bool:
    """A new connection from `source` is closed by the agent before it answers a request."""
    try:
        response = get(port, "/healthz", source)
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        return True
    raise AssertionError(f"served with {response.status}")


def log_lines(agent: AgentProcess) -> list[dict]:
    return [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def agent(tmp_path_factory, mqtt_broker) -> Iterator[AgentProcess]:
    """One agent with a status token, started with the umask most shells have (022), outside systemd."""
    process = AgentProcess(tmp_path_factory.mktemp("hostile"), mqtt_broker.url, status={"token": TOKEN})
    umask = os.umask(0o022)
    try:
        process.start()
    finally:
        os.umask(umask)
    yield process
    process.stop()


def test_idle_connections_from_one_address_do_not_lock_the_status_api(agent):
    """Issue 22 item 5: 70 connections that send nothing answered every other request, /healthz included, with 503
    for as long as they stayed open (uvicorn's timeout starts after a first response)."""
    port = agent.status_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.1", 0))
            for _ in range(IDLE_CONNECTIONS)]
    try:
        healthz = get(port, "/healthz", source="127.0.0.2")
        assert healthz.status == 200, healthz.body  # another address is served while they sit there
        assert refused(port, "127.0.0.1")  # the address holding its cap gets no more
        assert all(closed_by_the_agent(sock, within_s=60) for sock in idle)  # idle ones are closed, not kept
        assert get(port, "/healthz", source="127.0.0.1").status == 200  # and the address is served again
    finally:
        for sock in idle:
            sock.close()
    warnings = [line for line in log_lines(agent)
                if line["message"] == "refused a connection over the per-address cap from 127.0.0.1"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"  # 54 refusals, one line (repeats collapsed)


def trickled_until_closed(sock: socket.socket, start: bytes, byte: bytes, within_s: float) -> bool:
    """Send `start`, then `byte` every 2 s (reading any answer) until the agent closes the connection: True; or
    `within_s` passes: False."""
    sock.sendall(start)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            sock.sendall(byte)
            sock.settimeout(2)
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


@pytest.mark.parametrize("start,byte", [
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", b"a"),  # the head never ends
    (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n", b"a"),  # nor the body
], ids=["head", "body"])
def test_a_request_trickled_a_byte_at_a_time_is_cut_off(agent, start, byte):
    """Issue 22 item 5 (slow loris): uvicorn's keep-alive timeout restarts on every byte; a request that never
    completes must not hold its connection."""
    sock = socket.create_connection(("127.0.0.1", agent.status_port), timeout=10, source_address=("127.0.0.2", 0))
    try:
        assert trickled_until_closed(sock, start, byte, within_s=60)
    finally:
        sock.close()


def test_token_guessing_is_throttled_per_address_and_logged_without_the_token(agent):
    """Issue 22 item 9: ~1,500 guesses/s on loopback, no limit, no log of refused tokens."""
    port = agent.status_port
    guesses = [f"guess-{i:04d}-{TOKEN}" for i in range(10)]
    assert [get(port, "/api/v1/status", "127.0.0.3", guess).status for guess in guesses] == [401] * 10
    throttled = get(port, "/api/v1/status", "127.0.0.3", TOKEN)  # even the right token: nothing is checked
    assert throttled.status == 429 and int(throttled.getheader("Retry-After")) >= 1
    assert json.loads(throttled.body)["error"]["code"] == "too_many_requests"
    assert get(port, "/api/v1/status", "127.0.0.4", TOKEN).status == 200  # another address is not affected
    assert get(port, "/healthz", "127.0.0.3").status == 200  # nor are the probes

    text = agent.log.read_text()
    refusals = [line for line in log_lines(agent) if line["message"] == "refused status token from 127.0.0.3"]
    assert len(refusals) == 1 and refusals[0]["level"] == "warning"  # 10 refusals, one line until the window ends
    assert "guess-" not in text and TOKEN not in text


def test_the_data_folder_and_the_buffer_are_the_agents_alone(agent):
    """Issue 22 item 9: agent.db was created 0644 (and its folder 0755) outside systemd."""
    assert stat.S_IMODE(agent.data.stat().st_mode) == 0o700
    files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in agent.data.iterdir()}
    assert {"agent.db", "agent.db-wal", "agent.db-shm"} <= set(files)
    assert files == dict.fromkeys(files, 0o600)


def test_a_hot_reloaded_manifest_change_reports_a_new_package_digest(tmp_path, private_broker):
    """Issue 22 item 8: moving the alarm threshold 0.584 -> 0.999 reloaded silently with the same reported sha256."""
    package = tmp_path / "package"
    shutil.copytree(SHIPPED, package)
    agent = AgentProcess(tmp_path, private_broker.url, model={"path": str(package)}, **EVERY_WINDOW)
    try:
        agent.start()
        before = json.loads(get(agent.status_port, "/api/v1/status").body)["model"]

        manifest = json.loads((package / "manifest.json").read_text())
        manifest["thresholds"]["alarm"] = 0.999  # and the health map's point with it: a consistent manifest
        manifest["health"]["points"][2][0] = 0.999
        (package / "manifest.json").write_text(json.dumps(manifest, indent=2))
        agent.process.send_signal(signal.SIGHUP)
        wait_for(lambda: agent.count_log("model reloaded") >= 1, 30, "the reload")
        after = json.loads(get(agent.status_port, "/api/v1/status").body)["model"]

        assert after["sha256"] == before["sha256"]  # the ONNX file did not change ...
        assert after["package_digest"] != before["package_digest"]  # ... the package did, and it says so
        reload_line = next(line for line in log_lines(agent) if line["message"].startswith("model reloaded"))
        assert after["package_digest"] in reload_line["message"] and before["package_digest"] in reload_line["message"]

        reloaded_at = time.time()
        with Publisher(private_broker.url) as publisher:  # readings over three windows close at least two
            publisher.publish_all([reading(1, i) for i in range(0, 180, 2)])

        def summaries() -> list[dict]:
            with agent.db() as db:
                rows = db.execute("SELECT body FROM outbox WHERE kind = 'summary' AND created_at >= ?",
                                  (reloaded_at,)).fetchall()
            return [json.loads(body) for (body,) in rows]

        wait_for(lambda: len(summaries()) >= 2, 30, "summaries after the reload")
        assert {s["model"]["package_digest"] for s in summaries()} == {after["package_digest"]}
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        agent.stop()


def test_a_data_folder_the_operator_made_keeps_its_mode_with_a_warning_when_others_can_reach_it(tmp_path, caplog):
    """The judgement call of item 9: the agent tightens what it creates, never what it finds."""
    from agent.service import _prepare_data_dir

    made, shared = tmp_path / "deep" / "made", tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with caplog.at_level("WARNING", logger="agent.service"):
        _prepare_data_dir(made)
        _prepare_data_dir(shared)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700 and stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert [r.getMessage() for r in caplog.records] == [
        f"{shared} is open to other users (mode drwxr-xr-x); the buffer holds plant data: chmod o-rwx {shared}"]


def test_a_huge_alarm_action_body_is_refused_before_it_is_read(agent):
    """Issue 22 item 3 ("every route that reads a body"): with the right token, a technician's POST whose body is
    over 64 KiB is answered 413; a declared length is refused before any of the body is sent."""
    with socket.create_connection(("127.0.0.1", agent.status_port), timeout=10) as sock:
        sock.sendall((f"POST /api/v1/alarms/{'0' * 32}/acknowledge HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {256 * 2**20}\r\n\r\n").encode())
        answer = b""
        while b"payload_too_large" not in answer and (part := sock.recv(4096)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 413 ") and b"payload_too_large" in answer, answer[:200]
    response = get(agent.status_port, "/api/v1/status", "127.0.0.5", TOKEN)
    assert response.status == 200
