"""The dashboard's data routes on what gateways sent through /api/v1/ingest: the fleet in alarm-first order with its
filters, "since", gateways with backlog, drops and silence; a machine's downsampled history, events and inputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from testkit import batches
from tests.central.support import OPS, bearer

T0 = datetime(2026, 6, 1, 0, 0, tzinfo=UTC)
RISK = {"TWF": 0.01, "HDF": 0.002, "PWF": 0.0, "OSF": 0.001}


def send(client, gateway: tuple[str, str], summaries: list[dict], events: list[dict] = (), **status) -> None:
    name, token = gateway
    body = batches.batch(name, summaries=summaries, events=list(events))
    body["gateway"].update(status)
    response = client.post("/api/v1/ingest", json=body, headers=bearer(token))
    assert response.status_code == 200, response.text


def window(name: str, machine: str, minute: int, state: str, health: float, dominant: str = "TWF",
           risk: float = 0.3, **overrides) -> dict:
    return batches.summary(name, machine, minute, state=state, t0=T0, health_min=health, health_mean=health,
                           health_last=health, mode_risk_max={**RISK, dominant: risk}, **overrides)


EVERY = 100_000  # gateways listed: every test's, where a test looks for its own among them


def fleet(client, **params) -> dict:
    response = client.get("/api/v1/dashboard/fleet", params=params, headers=OPS)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def plant(client, gateways):
    """One gateway's machines in every state, with the event that put the alarmed one into alarm."""
    gateway = gateways.add("plant")
    name = gateway[0]
    send(client, gateway, [
        window(name, "press-ok", 5, "ok", 96.0),
        window(name, "lathe-warn", 5, "warning", 61.0, "HDF", 0.2),
        window(name, "mill-alarm", 5, "alarm", 31.0, "OSF", 0.95),
        window(name, "drill-alarm", 5, "alarm", 22.0, "PWF", 0.9),
    ], [batches.event(name, "mill-alarm", 3, "warning", "ok", t0=T0),
        batches.event(name, "mill-alarm", 4, "alarm", "warning", t0=T0)], buffer_pending=42, dropped_total=7)
    return gateway


def test_fleet_lists_alarm_then_warning_then_ok_with_words_and_since(client, plant):
    data = fleet(client, gateway=plant[0])
    rows = data["machines"]
    assert [(m["machine_id"], m["state"]) for m in rows] == [
        ("drill-alarm", "alarm"), ("mill-alarm", "alarm"), ("lathe-warn", "warning"), ("press-ok", "ok")]
    mill = rows[1]
    assert mill["gateway"] == plant[0] and mill["health"] == 31.0 and mill["dominant_mode"] == "OSF"
    assert mill["dominant_risk"] == 0.95
    assert datetime.fromisoformat(mill["since"]) == T0 + timedelta(minutes=4, seconds=30)  # its alarm event
    assert data["counts"] == {"alarm": 2, "warning": 1, "ok": 1} and data["shown"] == 4
    assert {m["mode"]: m["label"] for m in data["modes"]}["OSF"] == "overstrain"


def test_fleet_filters_by_state_mode_and_gateway(client, plant, gateways):
    other = gateways.add("plant")
    send(client, other, [window(other[0], "mill-alarm", 5, "alarm", 10.0, "OSF", 0.99)])
    assert [m["machine_id"] for m in fleet(client, gateway=plant[0], state="alarm")["machines"]] == [
        "drill-alarm", "mill-alarm"]
    assert [m["machine_id"] for m in fleet(client, gateway=plant[0], mode="HDF")["machines"]] == ["lathe-warn"]
    osf = [(m["gateway"], m["machine_id"]) for m in fleet(client, state="alarm", mode="OSF")["machines"]]
    assert (other[0], "mill-alarm") in osf and (plant[0], "mill-alarm") in osf
    assert osf.index((other[0], "mill-alarm")) < osf.index((plant[0], "mill-alarm"))  # lower health first
    assert {g for g, _ in osf} >= {plant[0], other[0]}
    assert fleet(client, gateway=plant[0], state="ok", limit=1)["counts"] == {"alarm": 2, "warning": 1, "ok": 1}
    assert fleet(client, gateway="no-such-gateway")["machines"] == []
    assert client.get("/api/v1/dashboard/fleet", params={"state": "broken"}, headers=OPS).status_code == 422


def test_gateways_show_backlog_drops_and_silence(client, plant, gateways, conn):
    quiet = gateways.add("quiet")
    send(client, quiet, [window(quiet[0], "m1", 0, "ok", 90.0)], buffer_pending=0, dropped_total=0)
    conn.execute("UPDATE gateways SET last_seen_at = now() - interval '2 hours' WHERE name = %s", [quiet[0]])
    never = gateways.add("never")
    listed = {g["name"]: g for g in fleet(client, gateways=EVERY)["gateways"]}
    busy = listed[plant[0]]
    assert (busy["buffer_pending"], busy["dropped_total"], busy["machines"], busy["alarm"], busy["warning"]) == (
        42, 7, 4, 2, 1)
    assert not busy["silent"] and busy["last_seen_age_s"] < 60
    assert listed[quiet[0]]["silent"] and 7100 < listed[quiet[0]]["last_seen_age_s"] < 7300
    # Issue 14 item 8: never seen is not "silent for over 10 min": it is counted apart, as never connected.
    assert not listed[never[0]]["silent"] and listed[never[0]]["never_connected"]
    assert listed[never[0]]["last_seen_at"] is None
    assert not listed[quiet[0]]["never_connected"] and not busy["never_connected"]
    names = [g["name"] for g in fleet(client, gateways=EVERY)["gateways"]]
    assert names.index(quiet[0]) < names.index(plant[0])  # silent ones first


def test_the_gateways_listed_are_the_first_that_need_attention_and_the_counts_cover_them_all(client, gateways,
                                                                                             conn):
    quiet = gateways.add("quiet")
    send(client, quiet, [window(quiet[0], "m1", 0, "ok", 90.0)])
    conn.execute("UPDATE gateways SET last_seen_at = now() - interval '2 hours' WHERE name = %s", [quiet[0]])
    never = gateways.add("never")
    total, silent, unseen = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE revoked_at IS NULL AND last_seen_at < now() - interval '10 min'),"
        " count(*) FILTER (WHERE revoked_at IS NULL AND last_seen_at IS NULL) FROM gateways").fetchone()
    first = fleet(client, gateways=1)
    assert first["gateway_counts"] == {"total": total, "silent": silent, "never_connected": unseen}
    everything = fleet(client, gateways=EVERY)["gateways"]
    assert len(everything) == total and [g["name"] for g in first["gateways"]] == [everything[0]["name"]]
    assert len(fleet(client)["gateways"]) == min(total, 200)
    # Silent first, then never connected, then the rest (by alarms, warnings, name).
    kinds = [0 if g["silent"] else 1 if g["never_connected"] else 2 for g in everything]
    assert kinds == sorted(kinds)
    names = [g["name"] for g in everything]
    assert names.index(quiet[0]) < names.index(never[0])
    assert client.get("/api/v1/dashboard/fleet", params={"gateways": 0}, headers=OPS).status_code == 422


def test_state_counts_follow_each_machines_latest_window(client, gateways, conn):
    gateway = gateways.add("counts")
    name = gateway[0]

    def counted() -> dict:
        return fleet(client, gateway=name)["counts"]

    send(client, gateway, [window(name, "m1", 0, "ok", 90.0), window(name, "m2", 0, "ok", 91.0)])
    assert counted() == {"alarm": 0, "warning": 0, "ok": 2}
    send(client, gateway, [window(name, "m1", 1, "warning", 60.0), window(name, "m1", 2, "alarm", 30.0)])
    assert counted() == {"alarm": 1, "warning": 0, "ok": 1}
    send(client, gateway, [window(name, "m1", 1, "warning", 60.0, summary_id=batches.summary(name, "m1", 90)[
        "summary_id"])])  # a late, older window: the machine's state stays
    send(client, gateway, [window(name, "m2", 3, "ok", 95.0)])  # ok to ok
    assert counted() == {"alarm": 1, "warning": 0, "ok": 1}
    listed = next(g for g in fleet(client, gateway=name, gateways=EVERY)["gateways"] if g["name"] == name)
    assert (listed["machines"], listed["alarm"], listed["warning"]) == (2, 1, 0)
    # The kept counts equal a count of the machines themselves, over every test's gateways.
    kept = conn.execute("SELECT gateway_id, worst_state, machines FROM machine_states WHERE machines <> 0"
                        " ORDER BY 1, 2").fetchall()
    counted_now = conn.execute("SELECT gateway_id, worst_state, count(*) FROM machines GROUP BY 1, 2"
                               " ORDER BY 1, 2").fetchall()
    assert kept == counted_now


def machine(client, gateway: str, machine_id: str, **params):
    return client.get(f"/api/v1/dashboard/gateways/{gateway}/machines/{machine_id}", params=params, headers=OPS)


def test_machine_history_is_downsampled_to_the_points_asked(client, gateways):
    gateway = gateways.add("history")
    name = gateway[0]
    windows = [window(name, "m1", minute, "alarm" if minute == 250 else "ok", 20.0 if minute == 250 else 90.0,
                      "HDF", 0.8 if minute == 250 else 0.05) for minute in range(600)]
    for start in range(0, 600, 200):
        send(client, gateway, windows[start:start + 200],
             [batches.event(name, "m1", 250, "alarm", "ok", t0=T0)] if start == 200 else [])
    since, until = T0, T0 + timedelta(hours=10)
    response = machine(client, name, "m1", since=since.isoformat(), until=until.isoformat(), points=50)
    assert response.status_code == 200, response.text
    data = response.json()
    series = data["series"]
    assert len(series) <= 50 and data["range"]["bucket_s"] == 720
    assert sum(b["windows"] for b in series) == 600
    worst = next(b for b in series if b["state"] == "alarm")
    t = datetime.fromisoformat(worst["t"])
    assert t <= T0 + timedelta(minutes=250) < t + timedelta(minutes=12)
    assert worst["health_min"] == 20.0 and worst["modes"]["HDF"] == 0.8 and worst["p_failure"] == 0.02
    assert [b["state"] for b in series].count("alarm") == 1
    assert [(e["from_state"], e["to_state"]) for e in data["events"]] == [("ok", "alarm")]
    # A shorter range: one bucket per window, and events outside it are left out.
    late = machine(client, name, "m1", since=(T0 + timedelta(hours=9)).isoformat(), until=until.isoformat()).json()
    assert len(late["series"]) == 60 and late["events"] == []


def test_long_ranges_come_from_the_hourly_roll_up_exactly_once(client, gateways, conn):
    gateway = gateways.add("months")
    name = gateway[0]
    # Two days, a window every ten minutes; one alarm window at 30 h 20 min.
    windows = [window(name, "m1", minute, "alarm" if minute == 1820 else "ok", 20.0 if minute == 1820 else 80.0 + k % 5,
                      "PWF", 0.9 if minute == 1820 else 0.1) for k, minute in enumerate(range(0, 48 * 60, 10))]
    send(client, gateway, windows[:150])
    send(client, gateway, windows[100:])  # 50 windows sent twice: stored once, counted once
    hours = conn.execute("SELECT count(*), sum(windows) FROM summaries_hourly h JOIN gateways g ON g.id = h.gateway_id"
                         " WHERE g.name = %s", [name]).fetchone()
    assert hours == (48, 288)
    until = T0 + timedelta(days=30)
    data = machine(client, name, "m1", since=(T0 + timedelta(minutes=7)).isoformat(), until=until.isoformat(),
                   points=400).json()
    assert data["range"]["bucket_s"] == 7200 and data["range"]["since"] == T0.isoformat()  # whole hours
    series = data["series"]
    assert len(series) == 24 and sum(b["windows"] for b in series) == 288
    worst = next(b for b in series if b["state"] == "alarm")
    assert datetime.fromisoformat(worst["t"]) == T0 + timedelta(hours=30)
    assert worst["health_min"] == 20.0 and worst["modes"]["PWF"] == 0.9 and worst["windows"] == 12
    first = series[0]
    assert first["health_mean"] == pytest.approx(sum(80.0 + k % 5 for k in range(12)) / 12)
    assert [b["state"] for b in series].count("alarm") == 1


def test_machine_shows_the_latest_inputs_against_the_normal_ranges(client, gateways):
    gateway = gateways.add("inputs")
    inputs = {"air_temperature": {"min": 298.1, "mean": 298.4, "max": 298.9},
              "torque": {"min": 38.5, "mean": 60.1, "max": 80.25}}
    send(client, gateway, [window(gateway[0], "m1", 0, "ok", 90.0),
                           window(gateway[0], "m1", 1, "warning", 65.0, "OSF", 0.5, inputs=inputs)])
    data = machine(client, gateway[0], "m1", since=T0.isoformat(), until=(T0 + timedelta(hours=1)).isoformat()).json()
    rows = {i["name"]: i for i in data["inputs"]}
    assert rows["torque"]["out"] and rows["torque"]["max"] == 80.25 and rows["torque"]["unit"] == "Nm"
    assert rows["torque"]["normal_max"] == pytest.approx(76.6, abs=1e-4)
    assert not rows["air_temperature"]["out"]
    assert data["state"] == "warning" and data["dominant"]["label"] == "overstrain"
    assert data["health_bands"] == {"warning": pytest.approx(70.0), "alarm": pytest.approx(40.0)}
    assert {m["mode"] for m in data["modes"]} == {"TWF", "HDF", "PWF", "OSF"}


def test_machine_view_refuses_unknown_machines_and_bad_ranges(client, plant):
    assert machine(client, plant[0], "nope").status_code == 404
    assert machine(client, "no-gateway", "press-ok").status_code == 404
    assert machine(client, plant[0], "press-ok", since=T0.isoformat(), until=T0.isoformat()).status_code == 422
    far = (T0 - timedelta(days=500)).isoformat()
    assert machine(client, plant[0], "press-ok", since=far, until=T0.isoformat()).status_code == 422
    assert machine(client, plant[0], "press-ok", points=5).status_code == 422
    early = {"since": "0001-01-01T00:00:00+05:00", "until": "0001-03-01T00:00:00+05:00"}
    assert machine(client, plant[0], "press-ok", **early).status_code == 422


def test_machine_view_refuses_names_no_machine_has_and_numbers_for_times(client, plant):
    """Found by fuzzing the ops routes: a NUL byte reached PostgreSQL (a 500), and a number was read as epoch
    seconds though the document promises ISO 8601 times."""
    assert machine(client, plant[0], "press%00ok").status_code == 422  # percent-encoded: a URL holds no raw NUL
    assert machine(client, "gw%00", "press-ok").status_code == 422
    assert machine(client, plant[0], "press-ok", since="1764000000").status_code == 422
    assert machine(client, plant[0], "press-ok", since=T0.isoformat()).status_code == 200
