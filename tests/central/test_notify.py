"""Notifications (issue 18 item 3, SPEC §10): the outbox written with the events, delivered by the worker to real
receivers on loopback (webhook, SMTP with STARTTLS), retried with the same delivery id, escalated and digested on a
fake clock. Every transition reaches each route once in effect: the receivers dedupe by delivery id and check the
HMAC."""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient
from psycopg_pool import AsyncConnectionPool

from central.app import create_app
from central.notify.config import parse
from central.notify.worker import Worker
from testkit import batches
from testkit.batches import T0, event
from testkit.net import LOCALHOST, free_port, wait_until
from tests.central.notify_support import SECRET, Mailbox, Receiver, self_signed
from tests.central.support import OPS, bearer, make_settings
from tests.central.test_alarms import events_of
from tests.central.test_gateway_actions import action

INGEST = "/api/v1/ingest"
DELIVERIES = "/api/v1/notifications/deliveries"
NOW = T0 + timedelta(minutes=6)  # just after the story's events (tests/central/test_alarms.py STORY)


class Clock:
    def __init__(self, now=NOW) -> None:
        self.now = now

    def __call__(self):
        return self.now


class Central:
    """The API in-process on the test database with a notification config, its worker driven by hand."""

    def __init__(self, url: str, config: Path, clock: Clock) -> None:
        app = create_app(make_settings(url, notify_config=config))
        self.notifications = app.app.state.notifications  # type: ignore[attr-defined]  # the guard wraps the app
        self.notifications.clock = clock
        self.notifications.background = False
        self.clock = clock
        self.client = TestClient(app)
        self.client.__enter__()

    def send(self, gateway: tuple[str, str], events: list[dict]) -> None:
        name, token = gateway
        response = self.client.post(INGEST, json=batches.batch(name, summaries=[], events=events),
                                    headers=bearer(token))
        assert response.status_code == 200, response.text

    def deliver(self, after: timedelta = timedelta(0)) -> None:
        """One worker round, `after` past the clock's time (the clock moves there)."""
        self.clock.now += after
        self.client.portal.call(self.notifications.worker.run_once, self.clock.now)

    def deliveries(self, **query) -> list[dict]:
        return self.client.get(DELIVERIES, params=query, headers=OPS).json()["deliveries"]

    def close(self) -> None:
        self.client.__exit__(None, None, None)


@pytest.fixture
def secret_file(tmp_path) -> Path:
    path = tmp_path / "webhook-secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


@pytest.fixture
def central(central_url, tmp_path):
    # The worker of each test's Central delivers whatever is pending in the session's database: another module's
    # undelivered rows (tests/central/test_notify_worker.py leaves some behind a slow receiver) would be its too.
    with psycopg.connect(central_url, autocommit=True) as conn:
        conn.execute("TRUNCATE notify_outbox")
    made: list[Central] = []

    def make(config: str, clock: Clock | None = None) -> Central:
        path = tmp_path / f"notify-{len(made)}.toml"
        path.write_text(config)
        made.append(Central(central_url, path, clock or Clock()))
        return made[-1]

    yield make
    for one in made:
        one.close()


def webhook(name: str, receiver: Receiver, secret_file: Path, timeout_s: float = 2.0) -> str:
    return f"""
[channels.{name}]
type = "webhook"
url = "{receiver.url}"
secret_file = "{secret_file}"
timeout_s = {timeout_s}
"""


def route(name: str, gateway: str, channels: list[str], **extra) -> str:
    lines = [f'[[routes]]\nname = "{name}"\ngateways = ["{gateway}"]\nchannels = {channels!r}'.replace("'", '"')]
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def test_every_transition_reaches_each_route_once_signed(central, receivers, secret_file, gateways):
    gateway = gateways.add()
    everything, alarms_only = receivers(), receivers()
    c = central(webhook("all", everything, secret_file) + webhook("alarms", alarms_only, secret_file)
                + route("line", gateway[0], ["all"]) + route("urgent", gateway[0], ["alarms"], from_state="alarm"))
    c.send(gateway, events_of(gateway[0]))
    c.send(gateway, events_of(gateway[0]))  # resent: duplicates, no new delivery
    c.deliver()
    c.deliver()
    assert everything.transitions() == sorted([("opened", "press-01", "line"), ("to_alarm", "press-01", "line"),
                                               ("closed", "press-01", "line"), ("opened", "press-01", "line")])
    assert alarms_only.transitions() == sorted([("to_alarm", "press-01", "urgent"), ("closed", "press-01", "urgent")])
    assert len(everything.requests) == 4 and all(valid for _, _, valid in everything.requests)
    for delivery, body, _ in everything.requests:
        assert body["delivery_id"] == delivery and body["schema"] == "pdm-alarm/1"
    log = c.deliveries()
    assert {d["state"] for d in log if d["route"] in ("line", "urgent")} == {"delivered"}


def test_a_wrong_secret_fails_the_receiver_s_check(central, receivers, tmp_path, gateways):
    gateway = gateways.add()
    receiver = receivers()
    other = tmp_path / "other-secret"
    other.write_text("not-the-receiver-s-secret")
    c = central(webhook("hook", receiver, other) + route("r", gateway[0], ["hook"]))
    c.send(gateway, events_of(gateway[0])[:1])
    c.deliver()
    assert [valid for _, _, valid in receiver.requests] == [False]


@pytest.mark.parametrize(("trouble", "reason"), [
    ({"fail": 2}, "HTTP 500"), ({"slow": 1, "slow_s": 1.5}, "no answer within 0.5 s"),
    ({"cut": 1}, "cannot connect, or the connection broke before the answer")],
    ids=["answers-500", "slow", "hangs-up-mid-body"])
def test_a_failed_delivery_is_retried_with_backoff_under_the_same_id(central, receivers, secret_file, gateways,
                                                                     trouble, reason):
    gateway = gateways.add()
    receiver = receivers(**trouble)
    c = central(webhook("hook", receiver, secret_file, timeout_s=0.5) + route("r", gateway[0], ["hook"]))
    c.send(gateway, events_of(gateway[0])[:1])
    c.deliver()
    [first] = c.deliveries(state="pending")
    assert first["attempts"] == 1 and first["last_error"] == reason
    c.deliver(timedelta(seconds=5))  # before the backoff's end: not tried again
    assert c.deliveries(state="pending")[0]["attempts"] == 1
    for _ in range(3):
        c.deliver(timedelta(minutes=2))
    [done] = [d for d in c.deliveries() if d["delivery_id"] == first["delivery_id"]]
    assert done["state"] == "delivered" and done["attempts"] >= 2
    assert {d for d, _, _ in receiver.requests} == {first["delivery_id"]}  # every attempt: the same id
    assert receiver.transitions() == [("opened", "press-01", "r")]


def test_a_delivery_is_given_up_after_the_retry_horizon_and_shown_failed(central, receivers, secret_file, gateways,
                                                                        caplog):
    gateway = gateways.add()
    receiver = receivers(fail=10_000)
    c = central(webhook("hook", receiver, secret_file) + route("r", gateway[0], ["hook"]))
    c.send(gateway, events_of(gateway[0])[:1])
    c.deliver()
    c.deliver(timedelta(hours=25))
    [failed] = c.deliveries(state="failed")
    assert failed["last_error"] == "HTTP 500"
    assert "given up" in caplog.text
    c.deliver(timedelta(hours=1))
    assert len(receiver.requests) == 2


def test_an_unacknowledged_episode_escalates_once_and_an_acknowledged_one_not(central, receivers, secret_file,
                                                                            gateways):
    gateway = gateways.add()
    receiver = receivers()
    c = central(webhook("hook", receiver, secret_file) + route("r", gateway[0], ["hook"], escalate_after_min=30))
    name = gateway[0]
    c.send(gateway, [event(name, "m-left", to_state="alarm"), event(name, "m-acked", to_state="alarm")])
    c.deliver()
    acked = c.client.get("/api/v1/alarms", params={"gateway": name, "machine": "m-acked"}, headers=OPS).json()
    c.client.post(f"/api/v1/alarms/{acked['alarms'][0]['id']}/acknowledge", headers=OPS)
    c.deliver(timedelta(minutes=20))  # 26 minutes after the events: not yet
    assert [t for t, _, _ in receiver.transitions()] == ["opened", "opened"]
    c.deliver(timedelta(minutes=5))
    c.deliver(timedelta(minutes=30))
    assert sorted(receiver.transitions()) == sorted([("opened", "m-left", "r"), ("opened", "m-acked", "r"),
                                                     ("escalation", "m-left", "r")])


def test_escalation_counts_from_when_central_heard_of_the_episode(central, receivers, secret_file, gateways):
    """A gateway offline for two hours sends an episode opened then: nobody could acknowledge it before it arrived,
    so it does not escalate on arrival."""
    gateway = gateways.add()
    receiver = receivers()
    c = central(webhook("hook", receiver, secret_file) + route("r", gateway[0], ["hook"], escalate_after_min=30),
                Clock(T0 + timedelta(hours=2)))
    c.send(gateway, [event(gateway[0], "m-late", to_state="alarm")])
    c.deliver()
    c.deliver(timedelta(minutes=29))
    assert receiver.transitions() == [("opened", "m-late", "r")]
    c.deliver(timedelta(minutes=2))
    assert receiver.transitions() == [("escalation", "m-late", "r"), ("opened", "m-late", "r")]


def test_a_flood_of_transitions_becomes_one_digest(central, receivers, secret_file, gateways):
    gateway = gateways.add()
    receiver = receivers()
    c = central(webhook("hook", receiver, secret_file)
                + route("plant", gateway[0], ["hook"], digest_after=3, digest_window_s=300))
    name = gateway[0]
    c.send(gateway, [event(name, f"m-{i:03d}", to_state="alarm") for i in range(50)])
    c.deliver()
    assert len(receiver.requests) == 3
    c.deliver(timedelta(seconds=100))
    assert len(receiver.requests) == 3
    c.deliver(timedelta(seconds=250))
    assert len(receiver.requests) == 4
    digest = receiver.requests[-1][1]
    assert digest["transition"] == "digest" and digest["count"] == 47
    assert {t["episode"]["machine_id"] for t in digest["transitions"]} == {f"m-{i:03d}" for i in range(3, 50)}
    assert len(c.deliveries(state="digested")) == 47


@pytest.fixture
def smtp(tmp_path):
    cert = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, tmp_path / "key.pem")
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname=LOCALHOST, port=port, tls_context=context, require_starttls=True,
                            authenticator=mailbox.authenticate, auth_require_tls=True)
    controller.start()
    yield mailbox, port, cert
    controller.stop()


def test_mail_goes_over_starttls_with_the_password_from_its_file(central, smtp, tmp_path, gateways):
    mailbox, port, cert = smtp
    gateway = gateways.add()
    password = tmp_path / "smtp-password"
    password.write_text("smtp-pass-123\n")
    c = central(f"""
[channels.mail]
type = "email"
host = "{LOCALHOST}"
port = {port}
starttls = true
ca_file = "{cert}"
from = "pdm@example.com"
to = ["maintenance@example.com"]
username = "pdm"
password_file = "{password}"
""" + route("r", gateway[0], ["mail"]))
    c.send(gateway, events_of(gateway[0])[:2])
    c.deliver()
    assert mailbox.logins == [(b"pdm", b"smtp-pass-123")] * 2
    subjects = sorted(m["Subject"] for m in mailbox.messages)
    assert subjects == sorted([f"[pdm] {gateway[0]}/press-01: opened (alarm, OSF)",
                               f"[pdm] {gateway[0]}/press-01: raised to alarm (alarm, OSF)"])
    ids = {m["X-PDM-Delivery"] for m in mailbox.messages}
    assert ids == {d["delivery_id"] for d in c.deliveries() if d["channel"] == "mail" and d["route"] == "r"}
    assert all(m["Message-ID"] == f"<{m['X-PDM-Delivery']}@pdm-central>" for m in mailbox.messages)


def test_a_refused_smtp_password_is_retried_and_never_logged(central, smtp, tmp_path, gateways, caplog):
    mailbox, port, cert = smtp
    gateway = gateways.add()
    password = tmp_path / "smtp-password"
    password.write_text("wrong-pass-987")
    c = central(f"""
[channels.mail]
type = "email"
host = "{LOCALHOST}"
port = {port}
ca_file = "{cert}"
from = "pdm@example.com"
to = ["maintenance@example.com"]
username = "pdm"
password_file = "{password}"
timeout_s = 3
""" + route("r", gateway[0], ["mail"]))
    c.send(gateway, events_of(gateway[0])[:1])
    c.deliver()
    [pending] = [d for d in c.deliveries(state="pending") if d["route"] == "r" and d["channel"] == "mail"]
    assert pending["last_error"] == "SMTP: the server hung up"  # aiosmtpd's answer to refused logins
    assert mailbox.messages == []
    assert "wrong-pass-987" not in caplog.text and "wrong-pass-987" not in str(c.deliveries())


def test_the_delivery_log_counts_what_is_not_delivered_and_shows_the_worker(central, receivers, secret_file,
                                                                            gateways):
    gateway = gateways.add()
    receiver = receivers(fail=1)
    c = central(webhook("hook", receiver, secret_file) + route("r", gateway[0], ["hook"]))
    c.send(gateway, events_of(gateway[0])[:2])
    c.deliver()
    log = c.client.get(DELIVERIES, headers=OPS).json()
    assert log["outbox"]["pending"] >= 1 and log["outbox"]["oldest_pending_at"]
    assert log["worker"]["running"] is False  # driven by hand here
    assert log["worker"]["delivered"] == 1


def test_a_worker_that_dies_is_logged_and_started_again(central_url, tmp_path, secret_file, receivers, monkeypatch,
                                                       caplog):
    receiver = receivers()
    real_run, calls = Worker.run, []

    async def dies_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        await real_run(self)

    monkeypatch.setattr(Worker, "run", dies_once)
    config = tmp_path / "notify.toml"
    config.write_text(webhook("hook", receiver, secret_file) + route("r", "gw-none", ["hook"]))
    with TestClient(create_app(make_settings(central_url, notify_config=config))) as client:
        wait_until(lambda: client.get(DELIVERIES, headers=OPS).json()["worker"]["running"], 20, interval=0.2)
        worker = client.get(DELIVERIES, headers=OPS).json()["worker"]
    assert worker["running"] and worker["restarts"] == 1
    assert "the notification worker stopped (restart 1): a bug" in caplog.text


def test_the_worker_outlives_a_database_it_cannot_reach_counting_and_logging_each_failed_round(secret_file, caplog):
    config = parse({"channels": {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/h",
                                          "secret_file": str(secret_file)}},
                    "routes": [{"name": "r", "channels": ["hook"]}]})

    async def scenario() -> tuple[int, bool]:
        pool = AsyncConnectionPool(f"postgresql://127.0.0.1:{free_port()}/none", open=False, timeout=0.3,
                                   kwargs={"connect_timeout": 2})
        await pool.open(wait=False)
        worker = Worker(pool, config, interval_s=0.05)
        task = asyncio.create_task(worker.run())
        while worker.failed_rounds < 2:
            await asyncio.sleep(0.05)
        alive = not task.done()
        task.cancel()
        await pool.close()
        return worker.failed_rounds, alive

    failed_rounds, alive = asyncio.run(scenario())
    assert alive and failed_rounds >= 2
    assert "notification round failed (1 so far)" in caplog.text


def test_an_acknowledgement_made_at_the_gateway_stops_the_escalation(central, receivers, secret_file, gateways):
    """Issue 18: the technician acknowledged on the shop floor; central sends no escalation for it."""
    gateway = gateways.add()
    receiver = receivers()
    c = central(webhook("hook", receiver, secret_file) + route("r", gateway[0], ["hook"], escalate_after_min=30))
    name = gateway[0]
    left, acked = event(name, "m-left", to_state="alarm"), event(name, "m-acked", to_state="alarm")
    c.send(gateway, [left, acked])
    c.deliver()
    body = batches.batch(name, summaries=[], events=[], actions=[action(name, acked, "acknowledge", by="Ana")])
    assert c.client.post(INGEST, json=body, headers=bearer(gateway[1])).json()["actions"]["accepted"] == 1
    c.deliver(timedelta(minutes=31))
    assert sorted(receiver.transitions()) == sorted([("opened", "m-left", "r"), ("opened", "m-acked", "r"),
                                                     ("escalation", "m-left", "r")])
