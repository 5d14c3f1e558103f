"""Fleet management on central (issue 17) on a real PostgreSQL: the fleet migration on an upgraded database, signed
uploads, each gateway's desired state with its ETag, bundle downloads, and rollouts whose gates pass, fail or meet
an apply error — driven by `pdm-central` commands and gateways' ingest batches, as in production."""

from __future__ import annotations

import itertools
import json
import uuid

import psycopg
import pytest

from central import cli, db
from central.fleet import rollout
from model.bundle import key_id, load_public_key, read_bundle
from model.package import SHIPPED
from testkit import batches
from testkit.models import WORSE_THRESHOLDS, derive_package
from testkit.postgres import create_database, drop_database
from tests.central.support import OPS, bearer

SHIPPED_MANIFEST = json.loads((SHIPPED / "manifest.json").read_text())
SHA = SHIPPED_MANIFEST["onnx"]["sha256"]
MINUTES = itertools.count()  # each report's summary a window of its own


def test_the_fleet_migration_is_applied_to_a_database_already_at_0006(postgres):
    """An upgrade from a release that had 0006 but not 0005: `migrate` applies 0005 then, and only it."""
    name = create_database(postgres)
    try:
        with psycopg.connect(postgres.url(name), autocommit=True) as conn:
            conn.execute(db.SCHEMA_MIGRATIONS)
            for migration in db.migrations():
                if migration.version != 5:
                    with conn.transaction():
                        conn.execute(migration.sql)
                        conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                                     [migration.version, migration.name, migration.checksum])
            applied = db.migrate(conn)
            assert [m.version for m in applied] == [5]
            assert db.schema_version(conn) == db.latest_version()
            assert conn.execute("SELECT to_regclass('rollouts') IS NOT NULL").fetchone() == (True,)
            assert db.migrate(conn) == []
    finally:
        drop_database(postgres, name)


@pytest.fixture
def pdm_central(central_url, monkeypatch, capsys):
    monkeypatch.setenv("PDM_CENTRAL_DATABASE_URL", central_url)

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def uploaded(tmp_path, pdm_central):
    """Keys, and two candidates derived from the shipped package (same graph, another version; see the README):
    (version of a good one, version of one whose thresholds put every reading in alarm, public key file)."""
    code, out, _ = pdm_central("keys", "new", "--out", str(tmp_path / "keys"), "--name", "ops")
    assert code == 0 and "ops.pub" in out
    versions = []
    for suffix, thresholds in (("good", None), ("worse", WORSE_THRESHOLDS)):
        version = f"1.1.{uuid.uuid4().hex[:8]}-{suffix}"
        package = derive_package(tmp_path / suffix, version, thresholds)
        code, out, err = pdm_central("model", "upload", str(package), "--signing-key",
                                     str(tmp_path / "keys" / "ops.key"), "--signer", "ops team")
        assert code == 0, err
        versions.append(version)
    return versions[0], versions[1], tmp_path / "keys" / "ops.pub"


def desired(client, name, token, etag=None):
    headers = bearer(token) | ({"If-None-Match": etag} if etag else {})
    return client.get(f"/api/v1/gateways/{name}/desired", headers=headers)


def report(client, name, token, revision, live=None, shadow=None, error=None, figures=None):
    """An ingest batch as the agent sends it: what it applied, and a summary with the candidate's figures."""
    def ref(version):
        return None if version is None else {"name": "ai4i-failure", "version": version, "sha256": SHA}
    summaries = []
    if figures is not None:
        readings, agreed, live_alarm, alarm = figures
        summaries = [batches.summary(name, minute=next(MINUTES), readings=readings, shadow={
            "model": ref(shadow), "readings": readings, "agreed": agreed, "live_warning": 0,
            "live_alarm": live_alarm, "warning": 0, "alarm": alarm, "out_of_distribution": 0, "score_s": 0.01})]
    body = batches.batch(name, summaries=summaries)
    body["gateway"]["applied"] = {"revision": revision, "live_model": ref(live), "shadow_model": ref(shadow),
                                  "config_revision": 0, "error": error}
    answer = client.post("/api/v1/ingest", json=body, headers=bearer(token))
    assert answer.status_code == 200, answer.text


def status(pdm_central) -> dict:
    code, out, err = pdm_central("rollout", "status", "--json")
    assert code == 0, err
    return json.loads(out)


def test_a_rollout_goes_cohort_by_cohort_when_its_gates_pass(client, gateways, uploaded, pdm_central):
    good, _, public = uploaded
    (g1, t1), (g2, t2) = gateways.add(), gateways.add()
    before = desired(client, g1, t1)
    code, _, err = pdm_central("rollout", "start", "ai4i-failure", good, "--cohort", g1, "--cohort", g2,
                               "--min-readings", "100")
    assert code == 0, err
    first = desired(client, g1, t1, before.headers["etag"])
    assert first.status_code == 200 and first.headers["etag"] != before.headers["etag"]
    state = first.json()
    assert state["model"] is None and state["shadow"]["version"] == good
    assert desired(client, g1, t1, first.headers["etag"]).status_code == 304
    assert desired(client, g2, t2).json()["shadow"] is None  # cohort 2 waits

    bundle = client.get(state["shadow"]["bundle_url"], headers=bearer(t1))
    key = load_public_key(public)
    assert read_bundle(bundle.content, {key_id(key): key}).version == good

    report(client, g1, t1, state["revision"], shadow=good, figures=(60, 60, 0, 0))
    assert status(pdm_central)["phase"] == "shadow"  # 60 of the 100 readings the gate needs
    report(client, g1, t1, state["revision"], shadow=good, figures=(60, 59, 1, 1))
    now = status(pdm_central)
    assert now["phase"] == "live" and now["gateways"][0]["readings"] == 120
    live = desired(client, g1, t1).json()
    assert live["model"]["version"] == good and live["shadow"] is None
    report(client, g1, t1, live["revision"], live=good)
    assert status(pdm_central)["cohort"] == 1
    second = desired(client, g2, t2).json()
    report(client, g2, t2, second["revision"], shadow=good, figures=(200, 199, 0, 0))
    assert status(pdm_central)["phase"] == "live"
    report(client, g2, t2, desired(client, g2, t2).json()["revision"], live=good)
    done = status(pdm_central)
    assert done["state"] == "completed" and done["reason"] is None
    assert client.get("/api/v1/rollouts/current", headers=OPS).json()["state"] == "completed"


def test_a_worse_candidate_fails_its_gate_and_every_gateway_goes_back(client, gateways, uploaded, pdm_central):
    _, worse, _ = uploaded
    (g1, t1), (g2, t2) = gateways.add(), gateways.add()
    assert pdm_central("rollout", "start", "ai4i-failure", worse, "--cohort", g1, "--cohort", g2,
                       "--min-readings", "50")[0] == 0
    revision = desired(client, g1, t1).json()["revision"]
    report(client, g1, t1, revision, shadow=worse, figures=(60, 3, 0, 57))  # the candidate alarms on everything
    after = status(pdm_central)
    assert after["state"] == "rolled_back" and "state agreement 0.050" in after["reason"]
    back = desired(client, g1, t1).json()
    assert back["model"] is None and back["shadow"] is None and back["revision"] > revision
    assert desired(client, g2, t2).json()["shadow"] is None  # cohort 2 never saw it
    code, out, _ = pdm_central("rollout", "status")
    assert code == 0 and "rolled back" in out and "gate failed on " + g1 in out


def test_an_apply_error_stops_the_rollout_and_an_operator_can_abort(client, gateways, uploaded, pdm_central):
    good, _, _ = uploaded
    (g1, t1), (g2, t2) = gateways.add(), gateways.add()
    assert pdm_central("rollout", "start", "ai4i-failure", good, "--cohort", f"{g1},{g2}")[0] == 0
    assert pdm_central("rollout", "start", "ai4i-failure", good, "--cohort", g1)[0] == 1  # one at a time
    revision = desired(client, g2, t2).json()["revision"]
    report(client, g2, t2, revision, error="shadow model ai4i-failure refused: refused bundle: signed by key x")
    after = status(pdm_central)
    assert after["state"] == "rolled_back" and f"gateway {g2} could not apply" in after["reason"]

    assert pdm_central("rollout", "start", "ai4i-failure", good, "--cohort", g1)[0] == 0
    code, _, _ = pdm_central("rollout", "abort", "--reason", "line 3 retooling")
    assert code == 0 and status(pdm_central)["reason"] == "aborted by the operator: line 3 retooling"
    assert desired(client, g1, t1).json()["shadow"] is None


def test_remote_overrides_are_checked_by_the_agents_own_types(client, gateway, pdm_central):
    name, token = gateway
    code, _, err = pdm_central("config", "set", name, "alarms.enter_after=0", "central.url=http://evil")
    assert code == 1 and "alarms.enter_after" in err and "central.url: never set remotely" in err
    assert desired(client, name, token).json()["config"] == {"revision": 0, "overrides": {}}
    assert pdm_central("config", "set", name, "alarms.enter_after=5", "central.sync_interval_s=5")[0] == 0
    assert desired(client, name, token).json()["config"] == {
        "revision": 1, "overrides": {"alarms.enter_after": 5, "central.sync_interval_s": 5}}


def test_a_pinned_gateway_is_left_out_of_rollouts(gateway, uploaded, pdm_central):
    name, _ = gateway
    good = uploaded[0]
    assert pdm_central("pin", name)[0] == 0
    code, _, err = pdm_central("rollout", "start", "ai4i-failure", good, "--cohort", name)
    assert code == 1 and "is pinned" in err
    with pytest.raises(rollout.RolloutError):
        rollout._cohorts([name], [], {name})


def test_a_gateway_revoked_during_a_rollout_does_not_hold_it_back(client, gateways, uploaded, pdm_central):
    good = uploaded[0]
    (g1, t1), (g2, _) = gateways.add(), gateways.add()
    assert pdm_central("rollout", "start", "ai4i-failure", good, "--cohort", g1, "--cohort", g2,
                       "--min-readings", "10")[0] == 0
    report(client, g1, t1, desired(client, g1, t1).json()["revision"], shadow=good, figures=(20, 20, 0, 0))
    gateways.revoke(g2)
    status(pdm_central)  # cohort 1 goes live
    report(client, g1, t1, desired(client, g1, t1).json()["revision"], live=good)
    for _ in range(3):  # cohort 2: its only gateway is gone
        now = status(pdm_central)
    assert now["state"] == "completed" and [g["revoked"] for g in now["gateways"]] == [False, True]


def test_the_dashboard_shows_the_rollout_and_why_it_stopped(client, gateways, uploaded, pdm_central):
    _, worse, _ = uploaded
    g1, t1 = gateways.add()
    assert pdm_central("rollout", "start", "ai4i-failure", worse, "--cohort", g1, "--min-readings", "10")[0] == 0
    running = client.get("/api/v1/dashboard/fleet", headers=OPS).json()["rollout"]
    assert running["state"] == "running" and running["model"] == f"ai4i-failure {worse}"
    report(client, g1, t1, desired(client, g1, t1).json()["revision"], shadow=worse, figures=(20, 0, 0, 20))
    status(pdm_central)
    stopped = client.get("/api/v1/dashboard/fleet", headers=OPS).json()["rollout"]
    assert stopped["state"] == "rolled_back" and "gate failed on " + g1 in stopped["reason"]
