"""`pdm-central serve` as a process: a kill -9 in the middle of a delivery loses nothing; the restarted server
delivers it again under the same delivery id (issue 18 item 3)."""

from __future__ import annotations

import signal
import subprocess

import psycopg
import requests

from testkit import batches
from testkit.batches import event
from testkit.net import free_port, wait_until
from tests.central.notify_support import SECRET, Receiver
from tests.central.support import PDM_CENTRAL, Server, bearer, environment


def outbox(url: str, route: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT delivery_id::text, state, attempts FROM notify_outbox WHERE route = %s "
                            "ORDER BY delivery_id", [route]).fetchall()


def serve(url: str, config, log) -> Server:
    port = free_port()
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)],
                    environment(url, PDM_CENTRAL_NOTIFY_CONFIG=str(config)), port, log)
    server.wait_ready()
    return server


def test_kill_9_during_a_delivery_loses_nothing(central_url, gateways, tmp_path):
    gateway = gateways.add()
    name, token = gateway
    receiver = Receiver(slow=1, slow_s=4.0)  # the first request is answered after central is dead
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    route = f"kill-{name}"
    config = tmp_path / "notify.toml"
    config.write_text(f'[channels.hook]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret_file = "{secret}"\n'
                      f'timeout_s = 1\n[[routes]]\nname = "{route}"\ngateways = ["{name}"]\nchannels = ["hook"]\n')
    server = serve(central_url, config, tmp_path / "central-1.log")
    try:
        events = [event(name, f"m-{i}", to_state="alarm") for i in range(3)]
        response = requests.post(server.base + "/api/v1/ingest", headers=bearer(token), timeout=10,
                                 json=batches.batch(name, summaries=[], events=events))
        assert response.status_code == 200, response.text
        assert receiver.first_request.wait(20), "no delivery reached the receiver"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        assert len(outbox(central_url, route)) == 3
        server = serve(central_url, config, tmp_path / "central-2.log")
        wait_until(lambda: {s for _, s, _ in outbox(central_url, route)} == {"delivered"}, 40, interval=0.2)
        rows = outbox(central_url, route)
        assert {s for _, s, _ in rows} == {"delivered"}, (rows, server.log.read_text())
        assert set(receiver.answered) == {d for d, _, _ in rows}
        assert {d for d, _, _ in receiver.requests} == {d for d, _, _ in rows}
        assert all(valid for _, _, valid in receiver.requests)
        assert len(receiver.requests) >= 4 and max(a for _, _, a in rows) >= 2  # the one cut short came again
    finally:
        server.terminate()
        receiver.close()


def test_serve_refuses_to_start_with_a_bad_notification_config_one_line_per_problem(central_url, tmp_path):
    config = tmp_path / "notify.toml"
    config.write_text('[channels.hook]\ntype = "webhook"\nurl = "ftp://x"\nsecret_file = "nope"\n'
                      '[[routes]]\nname = "r"\nchannels = ["hook", "pager"]\n')
    done = subprocess.run([PDM_CENTRAL, "serve", "--port", str(free_port())], capture_output=True, text=True, check=False,
                          env=environment(central_url, PDM_CENTRAL_NOTIFY_CONFIG=str(config)), timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "pdm-central: 3 settings problem(s):",
        f"  PDM_CENTRAL_NOTIFY_CONFIG: {config}: channels.hook.url: 'ftp://x' is not an http(s) URL",
        f"  PDM_CENTRAL_NOTIFY_CONFIG: {config}: routes[0].channels: unknown channel 'pager' (known: hook)",
        (f"  PDM_CENTRAL_NOTIFY_CONFIG: {config}: channels.hook.secret_file: cannot read {tmp_path / 'nope'}: "
        "No such file or directory")]
