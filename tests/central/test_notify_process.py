"""`pdm-central notify`, the delivery worker in a process of its own (production: the API with
PDM_CENTRAL_NOTIFY_WORKER=off): it delivers what the API's ingest wrote, woken by the ingest's NOTIFY; a kill -9 in
the middle of a delivery loses nothing and sends again only what was in flight; SIGTERM ends it cleanly; the API
with its worker off never delivers, and its delivery log says whether any worker listens."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import requests

from central.notify import outbox as outbox_module
from central.notify import process
from central.notify.outbox import LISTENER
from testkit import batches
from testkit.batches import event
from testkit.net import free_port, wait_until
from tests.central.notify_support import SECRET, Receiver
from tests.central.support import OPS, PDM_CENTRAL, Server, bearer, environment, make_settings

DELIVERIES = "/api/v1/notifications/deliveries"


def outbox(url: str, route: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT delivery_id::text, state, attempts FROM notify_outbox WHERE route = %s "
                            "ORDER BY delivery_id", [route]).fetchall()
    return [(str(d), str(s), int(a)) for d, s, a in rows]


def notify_config(folder: Path, receiver: Receiver, route: str, gateway: str, timeout_s: float = 5) -> Path:
    secret = folder / "secret"
    secret.write_text(SECRET)
    config = folder / "notify.toml"
    config.write_text(f'[channels.hook]\ntype = "webhook"\nurl = "{receiver.url}"\nsecret_file = "{secret}"\n'
                      f'timeout_s = {timeout_s:g}\n[[routes]]\nname = "{route}"\ngateways = ["{gateway}"]\n'
                      'channels = ["hook"]\n')
    return config


def api(url: str, config: Path, log: Path) -> Server:
    """`pdm-central serve` as the production API: notifications configured, its worker off."""
    port = free_port()
    server = Server([PDM_CENTRAL, "serve", "--port", str(port)],
                    environment(url, PDM_CENTRAL_NOTIFY_CONFIG=str(config), PDM_CENTRAL_NOTIFY_WORKER="off"), port, log)
    server.wait_ready()
    return server


def notifier(url: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([PDM_CENTRAL, "notify"], env=environment(url, PDM_CENTRAL_NOTIFY_CONFIG=str(config)),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def listening(server: Server) -> int:
    worker = requests.get(server.base + DELIVERIES, headers=OPS, timeout=10).json()["worker"]
    assert worker["inline"] is False and worker["running"] is False  # the API's own: off
    return int(worker["listening"])


def ingest(server: Server, gateway: tuple[str, str], machines: list[str]) -> None:
    name, token = gateway
    events = [event(name, machine, to_state="alarm") for machine in machines]
    response = requests.post(server.base + "/api/v1/ingest", headers=bearer(token), timeout=10,
                             json=batches.batch(name, summaries=[], events=events))
    assert response.status_code == 200, response.text


def test_the_notifier_process_delivers_what_the_apis_ingest_wrote_and_stops_on_sigterm(central_url, gateways,
                                                                                        tmp_path):
    gateway = gateways.add()
    receiver = Receiver()
    route = f"proc-{gateway[0]}"
    config = notify_config(tmp_path, receiver, route, gateway[0])
    server = api(central_url, config, tmp_path / "api.log")
    process = notifier(central_url, config, tmp_path / "notify.log")
    try:
        wait_until(lambda: listening(server) == 1, 20, interval=0.2)
        ingest(server, gateway, ["m-1", "m-2", "m-3"])
        wait_until(lambda: {s for _, s, _ in outbox(central_url, route)} == {"delivered"}, 20, interval=0.1)
        rows = outbox(central_url, route)
        assert len(rows) == 3 and {a for _, _, a in rows} == {1}
        assert sorted(d for d, _, _ in receiver.requests) == [d for d, _, _ in rows]  # each once
        assert all(valid for _, _, valid in receiver.requests)
        assert sorted(b["episode"]["machine_id"] for b in receiver.answered.values()) == ["m-1", "m-2", "m-3"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        wait_until(lambda: listening(server) == 0, 20, interval=0.2)  # the delivery log shows it down
    finally:
        if process.poll() is None:
            process.kill()
        server.terminate()
        receiver.close()
    lines = [json.loads(line) for line in (tmp_path / "notify.log").read_text().splitlines()]
    messages = [line["message"] for line in lines]  # JSON lines, as the API logs with PDM_CENTRAL_LOG_FORMAT=json
    assert any("notify: delivering for 1 route(s)" in m for m in messages), messages
    assert messages[-1].startswith("pdm-central notify stopped: {'delivered': 3"), messages
    assert not [line for line in lines if line["level"] in ("WARNING", "ERROR")], lines


def test_a_kill_9_of_the_notifier_mid_delivery_loses_nothing_and_resends_only_what_was_in_flight(
        central_url, gateways, tmp_path):
    gateway = gateways.add()
    receiver = Receiver(slow=1, slow_s=4.0)  # the first request is answered after the notifier is dead
    route = f"kill-{gateway[0]}"
    config = notify_config(tmp_path, receiver, route, gateway[0], timeout_s=1)
    server = api(central_url, config, tmp_path / "api.log")
    process = notifier(central_url, config, tmp_path / "notify-1.log")
    try:
        wait_until(lambda: listening(server) == 1, 20, interval=0.2)
        ingest(server, gateway, ["m-1"])  # alone in its round: the one in flight at the kill
        assert receiver.first_request.wait(20), "no delivery reached the receiver"
        in_flight = {d for d, _, _ in receiver.requests}
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        ingest(server, gateway, ["m-2", "m-3"])  # written while no notifier runs
        rows = outbox(central_url, route)  # a delivery by anything else meanwhile would show in the sends below
        assert len(rows) == 3 and "delivered" not in {s for _, s, _ in rows}, rows
        process = notifier(central_url, config, tmp_path / "notify-2.log")
        wait_until(lambda: {s for _, s, _ in outbox(central_url, route)} == {"delivered"}, 40, interval=0.2)
        rows = outbox(central_url, route)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(15)
        server.terminate()
        receiver.close()
    assert len(in_flight) == 1
    sent = [d for d, _, _ in receiver.requests]
    assert set(sent) == set(receiver.answered) == {d for d, _, _ in rows}  # nothing lost
    assert {d for d in sent if sent.count(d) > 1} == in_flight  # at least once: only the one cut short, again
    assert sent.count(next(iter(in_flight))) == 2
    assert all(valid for _, _, valid in receiver.requests)


def test_the_api_with_its_worker_off_never_delivers(central_url, gateways, tmp_path):
    gateway = gateways.add()
    receiver = Receiver()
    route = f"off-{gateway[0]}"
    config = notify_config(tmp_path, receiver, route, gateway[0])
    server = api(central_url, config, tmp_path / "api.log")
    try:
        ingest(server, gateway, ["m-1", "m-2"])
        time.sleep(3.0)  # an inline worker polls every second and is woken at once by the ingest
        rows = outbox(central_url, route)
        assert listening(server) == 0
    finally:
        server.terminate()
        receiver.close()
        with psycopg.connect(central_url) as conn:  # the database is shared: another test's worker would send them
            conn.execute("DELETE FROM notify_outbox WHERE route = %s", [route])
    assert receiver.seen == 0
    assert [(s, a) for _, s, a in rows] == [("pending", 0), ("pending", 0)]


@contextmanager
def notifier_in_thread(central_url: str, config: Path, interval_s: float) -> Iterator[None]:
    """`pdm-central notify`'s loop (process.run) in a thread of this process, with its periodic check every
    `interval_s`; stopped as SIGTERM stops it, and joined."""
    running: dict = {}

    async def notifier() -> None:
        running["loop"], running["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await process.run(make_settings(central_url, notify_config=config), running["stop"], interval_s=interval_s)

    thread = threading.Thread(target=asyncio.run, args=(notifier(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        wait_until(lambda: "stop" in running, 20, interval=0.05)
        running["loop"].call_soon_threadsafe(running["stop"].set)
        thread.join(20)
    assert not thread.is_alive()


def test_an_ingest_wakes_the_notifier_at_once_not_at_its_next_poll(central_url, gateways, tmp_path):
    """The API's ingest NOTIFYs; the notifier, here polling once a minute only, LISTENs and sends at once."""
    gateway = gateways.add()
    receiver = Receiver()
    route = f"wake-{gateway[0]}"
    config = notify_config(tmp_path, receiver, route, gateway[0])
    try:
        with notifier_in_thread(central_url, config, interval_s=60):
            server = api(central_url, config, tmp_path / "api.log")
            try:
                wait_until(lambda: listening(server) == 1, 20, interval=0.2)
                time.sleep(0.5)  # its first round is over: it waits for a NOTIFY or its next poll, a minute away
                started = time.monotonic()
                ingest(server, gateway, ["m-1"])
                assert receiver.first_request.wait(10), "not delivered within 10 s"
                assert time.monotonic() - started < 5
            finally:
                server.terminate()
    finally:
        receiver.close()
    assert [b["episode"]["machine_id"] for b in receiver.answered.values()] == ["m-1"]


def listeners(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                            "AND datname = current_database()", [LISTENER]).fetchall()
    return [int(pid) for pid, in rows]


def test_a_notifier_cut_from_the_database_listens_again_and_the_next_ingest_wakes_it(central_url, gateways, tmp_path):
    """The LISTEN connection killed (a PostgreSQL restart, a proxy's idle timeout): the notifier connects again, and
    the next alarm goes out at once, not at the next time something falls due (minutes away: it does not poll)."""
    gateway = gateways.add()
    receiver = Receiver()
    route = f"cut-{gateway[0]}"
    config = notify_config(tmp_path, receiver, route, gateway[0])
    try:
        with notifier_in_thread(central_url, config, interval_s=0.2):
            server = api(central_url, config, tmp_path / "api.log")
            try:
                wait_until(lambda: listening(server) == 1, 20, interval=0.2)
                [cut] = listeners(central_url)
                with psycopg.connect(central_url, autocommit=True) as conn:
                    conn.execute("SELECT pg_terminate_backend(%s)", [cut])
                wait_until(lambda: len(found := listeners(central_url)) == 1 and cut not in found, 20, interval=0.1)
                ingest(server, gateway, ["m-1"])
                assert receiver.first_request.wait(20), "not delivered within 20 s"
            finally:
                server.terminate()
    finally:
        receiver.close()
    assert [b["episode"]["machine_id"] for b in receiver.answered.values()] == ["m-1"]


def test_a_failed_delivery_is_sent_again_when_its_backoff_ends_by_a_notifier_that_does_not_poll(
        central_url, gateways, tmp_path, monkeypatch):
    """Nothing wakes an idle notifier but an ingest or what it knows falls due: a retry is one of those."""
    monkeypatch.setattr(outbox_module, "BACKOFF_FIRST_S", 0.5)
    gateway = gateways.add()
    receiver = Receiver(fail=1)
    route = f"retry-{gateway[0]}"
    config = notify_config(tmp_path, receiver, route, gateway[0])
    try:
        with notifier_in_thread(central_url, config, interval_s=3600):
            server = api(central_url, config, tmp_path / "api.log")
            try:
                wait_until(lambda: listening(server) == 1, 20, interval=0.2)
                ingest(server, gateway, ["m-1"])
                wait_until(lambda: [s for _, s, _ in outbox(central_url, route)] == ["delivered"], 20, interval=0.2)
            finally:
                server.terminate()
    finally:
        receiver.close()
    assert [a for _, _, a in outbox(central_url, route)] == [2]  # refused once, then sent
