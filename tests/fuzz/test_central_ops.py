"""Fuzzing the central ops API's inputs that its OpenAPI document cannot constrain: the opaque paging cursor, path
segments, and times at the calendar's edges. Every answer is 200 or a 4xx with an error code, never a 5xx."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testkit import batches
from tests.central.conftest import central_url, gateways, make_client, no_central_environment  # noqa: F401
from tests.central.support import OPS, bearer
from tests.fuzz.strategies import fuzz_settings, json_values, to_json


def as_cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


cursors = st.one_of(
    st.text(max_size=40),
    json_values.map(to_json).map(as_cursor),
    st.tuples(st.one_of(st.text(max_size=30), json_values), st.one_of(st.integers(), json_values),
              st.one_of(st.uuids().map(str), json_values)).map(lambda t: as_cursor(to_json(list(t)))),
    st.sampled_from([as_cursor(b"[" * 5000 + b"]" * 5000), as_cursor(b'["2026-03-01T08:00:00", Infinity, "x"]'),
                     as_cursor(b'["2026-03-01T08:00:00+00:00", 1, 5]'), as_cursor(b'["0001-01-01T00:00:00+23:59", '
                     b'1, "6f1e4bd4-66ea-4d4d-9c9d-6e0e1a0c7a44"]'), as_cursor(b'["9999-12-31T23:59:59-23:59", '
                     b'99999999999999999999999, "6f1e4bd4-66ea-4d4d-9c9d-6e0e1a0c7a44"]')]),
)
times = st.one_of(st.none(), st.sampled_from(["0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59",
                                              "2026-03-01T08:00:00Z", "2026-03-01T08:00:00", "1e400", "nan", ""]),
                  st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()))
segments = st.one_of(st.text(min_size=1, max_size=70), st.sampled_from(["press-01", "\x00", "%00", "..", "a" * 65]))


@pytest.fixture
def central(make_client, gateways):  # noqa: F811
    """The app with one gateway that has sent summaries and an event: (client, gateway name)."""
    client = make_client(raise_server_exceptions=False)
    name, token = gateways.add("ops-fuzz")
    assert client.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(token)).status_code == 200
    return client, name


def assert_not_a_server_error(response) -> None:
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["error"]["code"]


def query(**params) -> dict:
    return {k: v for k, v in params.items() if v is not None}


@fuzz_settings(short=25, long=2_500)
@given(cursor=cursors, since=times, until=times, limit=st.sampled_from([None, 1, 2, 10_000]))
def test_any_cursor_and_times_give_200_or_4xx_on_events(central, cursor, since, until, limit):
    client, _ = central
    assert_not_a_server_error(client.get("/api/v1/events", headers=OPS,
                                         params=query(cursor=cursor, since=since, until=until, limit=limit)))


@fuzz_settings(short=25, long=2_500)
@given(gateway=st.one_of(st.none(), segments), machine=st.one_of(st.none(), segments), cursor=st.none() | cursors,
       since=times)
def test_any_path_cursor_and_times_give_200_or_4xx_on_summaries(central, gateway, machine, cursor, since):
    client, name = central
    path = f"/api/v1/gateways/{quote(gateway or name, safe='')}/machines/{quote(machine or 'press-01', safe='')}"
    assert_not_a_server_error(client.get(path + "/summaries", headers=OPS, params=query(cursor=cursor, since=since)))


@pytest.mark.parametrize("raw", [b"[" * 5000 + b"]" * 5000, b'["2026-03-01T08:00:00+00:00", Infinity, "x"]',
                                 b'["2026-03-01T08:00:00+00:00", 1, 5]',
                                 b'["2026-03-01T08:00:00+00:00", 2147483648, "6f1e4bd4-66ea-4d4d-9c9d-6e0e1a0c7a44"]'])
def test_a_forged_cursor_is_a_422(central, raw):
    """Regression: a cursor of deeply nested JSON (RecursionError), an infinite gateway id (OverflowError), a
    number as row id (AttributeError) or a gateway id beyond PostgreSQL's integer (NumericValueOutOfRange) was a
    500."""
    client, _ = central
    response = client.get("/api/v1/events", headers=OPS, params={"cursor": as_cursor(raw)})
    assert response.status_code == 422 and "invalid cursor" in response.json()["error"]["message"]


@pytest.mark.parametrize("segment", ["%00", "a%00b", "bad%20name", "a" * 65])
def test_a_gateway_or_machine_no_one_can_be_named_is_a_422(central, segment):
    """Regression: a NUL in the path reached PostgreSQL, which refused it with a DataError: a 500."""
    client, name = central
    for path in (f"/api/v1/gateways/{segment}/machines/press-01/summaries",
                 f"/api/v1/gateways/{name}/machines/{segment}/summaries"):
        response = client.get(path, headers=OPS)
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("param", ["since", "until"])
@pytest.mark.parametrize("value", ["179414971600054.34", "1764000000", "nan"])
def test_a_number_for_a_time_is_a_422_as_documented(central, param, value):
    """Regression (schemathesis, long run): pydantic read a number as epoch seconds or milliseconds, so a request
    the OpenAPI document calls invalid (it documents an ISO 8601 date-time) was answered 200."""
    client, name = central
    for path in ("/api/v1/events", f"/api/v1/gateways/{name}/machines/press-01/summaries"):
        response = client.get(path, headers=OPS, params={param: value})
        assert response.status_code == 422, response.text
        assert "ISO 8601" in response.json()["error"]["details"][0]["msg"]
    iso = {"since": "2026-03-01T08:00:00Z", "until": "2100-01-01T00:00:00+01:00"}[param]
    assert client.get("/api/v1/events", headers=OPS, params={param: iso}).status_code == 200
