"""Fuzzing the sync client's handling of central's answers: a real HTTP server on loopback answers each batch with
arbitrary bytes (status codes, Retry-After garbage, lying Content-Length, bad gzip, garbage or huge JSON, the
connection closed mid-body). The client never raises out of its round, never waits a nonsensical time, marks a
record synced only after central's real answer for it, and never loses one."""

from __future__ import annotations

import gzip
import json
import math
import socketserver
import threading
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.store import Store
from sync.client import BACKOFF_MAX_S, REFUSED_RETRY_S
from sync.outbox import Outcome
from tests.fuzz.strategies import bad_utf8, fuzz_settings, json_values, nested, to_json
from tests.sync.test_client import client, records

SYNC_INTERVAL_S = 30.0  # CentralConfig's default: the wait after a round that emptied the outbox


@dataclass(frozen=True)
class Answer:
    """How the server answers one batch; `body` of None means central's correct answer for that batch."""

    status: bytes  # the status line's code, e.g. b"503" (or garbage)
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes | None
    length: str  # "exact", "short" (the body is cut, the connection closed), "long" (a lie), "none", "chunked-bad"

    def render(self, batch: dict) -> bytes:
        body = correct_answer(batch) if self.body is None else self.body
        head = [b"HTTP/1.1 " + self.status + b" Whatever", *(name + b": " + value for name, value in self.headers)]
        if self.length == "exact":
            head.append(b"Content-Length: %d" % len(body))
        elif self.length == "short":
            head.append(b"Content-Length: %d" % len(body))
            body = body[: len(body) // 2]
        elif self.length == "long":
            head.append(b"Content-Length: %d" % (len(body) + 100))
        elif self.length == "chunked-bad":
            head.append(b"Transfer-Encoding: chunked")
            body = b"zz\r\n" + body
        return b"\r\n".join([*head, b"Connection: close", b"", body])

    @property
    def accepts(self) -> bool:
        """Whether this is central really taking the batch: 200 with its own answer, delivered whole."""
        return self.status == b"200" and self.body is None and self.length in ("exact", "none")


def correct_answer(batch: dict) -> bytes:
    return json.dumps({"accepted": {"summaries": len(batch["summaries"]), "events": len(batch["events"])},
                       "duplicates": {"summaries": 0, "events": 0}}).encode()


class ScriptedCentral(socketserver.ThreadingTCPServer):
    """Answers the n-th POST with the n-th scripted Answer (then 503), written raw to the socket; records which
    record ids each request carried and whether central accepted them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.accepted_ids: set[str] = set()
        self.requests = 0
        self._lock = threading.Lock()
        central = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                start = self.rfile.peek(4)[:4]  # type: ignore[attr-defined]  # a BufferedReader
                if start == b"GET ":  # the token check: passes, the batches are what is fuzzed
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    self.wfile.write(b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n")
                    return
                length = 0
                while (line := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                batch = json.loads(gzip.decompress(self.rfile.read(length)))
                with central._lock:
                    answer = central.script.pop(0) if central.script else UNAVAILABLE
                    central.requests += 1
                    if answer.accepts:
                        central.accepted_ids.update(e["event_id"] for e in batch["events"])
                        central.accepted_ids.update(s["summary_id"] for s in batch["summaries"])
                self.wfile.write(answer.render(batch))

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


UNAVAILABLE = Answer(b"503", ((b"Content-Type", b"application/json"),), b'{"error": {"message": "down"}}', "exact")

retry_after = st.one_of(
    st.sampled_from([b"nan", b"NaN", b"inf", b"-inf", b"-1", b"1e400", b"0", b"7", b"3.5", b"99999999999",
                     b"Wed, 21 Oct 2026 07:28:00 GMT", b"", b"1_000", b"0x10", b"\xff\xfe"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12).map(str.encode),
)
headers = st.lists(st.one_of(
    st.tuples(st.just(b"Retry-After"), retry_after),
    st.tuples(st.just(b"Content-Type"), st.sampled_from([b"application/json", b"text/html; charset=utf-8",
                                                         b"application/json; charset=latin-1", b"garbage/\xff"])),
    st.tuples(st.just(b"Content-Encoding"), st.sampled_from([b"gzip", b"deflate", b"br", b"identity", b"x-junk"])),
    st.tuples(st.sampled_from([b"X-Junk", b"Set-Cookie", b"Location"]), st.binary(max_size=30).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
), max_size=4)
error_bodies = st.builds(lambda message, details: to_json({"error": {"code": "x", "message": message,
                                                                      "details": details}}),
                         json_values, json_values)
bodies = st.one_of(
    st.none(),  # central's correct answer
    st.binary(max_size=200),
    json_values.map(to_json),
    error_bodies,
    st.builds(lambda a, s, e: to_json({"accepted": {"summaries": s, "events": e}, "duplicates": a}),
              json_values, json_values, json_values),  # a 200 that is not quite central's answer
    st.builds(lambda depth: nested(depth), st.integers(min_value=1_000, max_value=100_000)),
    st.builds(lambda junk, n: junk * n, st.binary(min_size=1, max_size=8) | bad_utf8,
              st.integers(min_value=10_000, max_value=300_000)),
)
statuses = st.one_of(st.sampled_from([b"200", b"200", b"413", b"422", b"401", b"403", b"400", b"404", b"408",
                                      b"429", b"500", b"502", b"503", b"504", b"302", b"304", b"204", b"100"]),
                     st.integers(min_value=100, max_value=999).map(lambda n: b"%d" % n),
                     st.sampled_from([b"2OO", b"", b"-1", b"99999"]))
answers = st.builds(Answer, statuses, headers.map(tuple), bodies,
                    st.sampled_from(["exact", "exact", "short", "long", "none", "chunked-bad"]))


@pytest.fixture(scope="module")
def central():
    server = ScriptedCentral()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def outbox(tmp_path_factory):
    """Nine records (4 events, 5 summaries) as the agent writes them, copied into a fresh store per example."""
    with Store.open(tmp_path_factory.mktemp("outbox") / "agent.db") as store:
        return records(store, n_events=4, n_summaries=5)


@fuzz_settings(short=40, long=3_000)
@given(script=st.lists(answers, min_size=1, max_size=6), data=st.data())
def test_any_answer_is_handled_and_no_record_is_lost_or_wrongly_marked_synced(central, outbox, tmp_path_factory,
                                                                              script, data):
    central.script, central.accepted_ids = list(script), set()
    with Store.open(tmp_path_factory.mktemp("store") / "agent.db") as store:
        store.write([], [], outbox)
        sync = client(store, central.url, batch_size=3)
        sync._config = sync._config.model_copy(update={"timeout_s": 5.0})
        result = sync.sync_once()  # raises nothing, whatever central sends
        assert result.outcome in set(Outcome)
        assert math.isfinite(result.retry_after) and 0 <= result.retry_after <= max(REFUSED_RETRY_S, BACKOFF_MAX_S,
                                                                                    SYNC_INTERVAL_S)
        if result.outcome is Outcome.RETRY:
            assert result.error and result.retry_after <= BACKOFF_MAX_S
        pending = {r.record_id for r in store.pending(100)}
        synced = {r.record_id for r in store.outbox(pending=False)} - pending
        with store._guard("test") as db:
            set_aside = {record_id for (record_id,) in db.execute("SELECT record_id FROM dead_letters")}
        all_ids = {r.record_id for r in outbox}
        assert synced <= central.accepted_ids  # synced only after central's own 200 for it
        assert pending | synced | set_aside == all_ids and not (pending & set_aside)  # nothing lost
        assert result.sent == len(synced) and result.set_aside == len(set_aside)


def answer(status: bytes, body: bytes, *headers: tuple[bytes, bytes]) -> Answer:
    return Answer(status, ((b"Content-Type", b"application/json"), *headers), body, "exact")


@pytest.fixture
def store(tmp_path, outbox):
    with Store.open(tmp_path / "agent.db") as store:
        store.write([], [], outbox)
        yield store


@pytest.mark.parametrize("value", [b"nan", b"NaN", b"-nan"])
def test_a_retry_after_of_nan_falls_back_to_the_backoff(central, store, value):
    """Regression: Retry-After: nan passed through min()/max() as NaN, and the sync thread's wait(NaN) returned at
    once: the agent hammered central in a tight loop."""
    central.script = [answer(b"503", b"{}", (b"Retry-After", value))]
    result = client(store, central.url).sync_once()
    assert result.outcome is Outcome.RETRY and 0.5 <= result.retry_after <= 2.0  # the first backoff step


def test_a_deeply_nested_error_body_is_a_transient_error(central, store):
    """Regression: requests' JSON decoding raised RecursionError out of sync_once, which ended the sync thread."""
    central.script = [answer(b"500", nested(100_000))]
    result = client(store, central.url).sync_once()
    assert result.outcome is Outcome.RETRY and "500" in result.error
    assert len(store.pending(100)) == len(store.outbox(pending=False))


def test_a_round_cut_short_after_a_split_reports_what_it_set_aside(central, store):
    """Regression: the counts of a batch split on 422 were lost when a later part of the round failed."""
    invalid = answer(b"422", b'{"error": {"code": "invalid_batch", "message": "bad record"}}')
    central.script = [invalid, invalid, invalid]  # 3 records: split into 1 (set aside) and 2 (split again)...
    result = client(store, central.url, batch_size=3).sync_once()  # ...whose first half meets the 503
    assert (result.outcome, result.set_aside) == (Outcome.RETRY, 1)
    with store._guard("test") as db:
        assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)


@pytest.mark.parametrize("location", [b"\x80", b"https://elsewhere.example/api/v1/ingest", b"/api/v1/ingest"])
def test_a_redirect_is_not_followed_and_keeps_everything(central, store, location):
    """Regression (long run): requests raised UnicodeDecodeError out of sync_once on a Location that is not UTF-8
    (even with redirects off), which ended the sync thread; following a redirect also re-sent the batch elsewhere."""
    central.script, central.requests = [answer(b"302", b"", (b"Location", location))], 0
    result = client(store, central.url).sync_once()
    assert result.outcome is Outcome.RETRY and ("302" in result.error or "cannot be read" in result.error)
    assert central.requests == 1 and len(store.pending(100)) == len(store.outbox(pending=False))
