"""`GET /api/v1/gateways/{gateway_id}/desired` (SPEC §9, minimal): the gateway token's cheap check each sync round,
and the limit on refused gateway tokens per address (issue 22 item 9)."""

from __future__ import annotations

import logging

from central import guard
from testkit import batches
from tests.central.support import bearer

NOTHING = {"revision": 0, "model": None, "shadow": None, "config": {"revision": 0, "overrides": {}},
           "acknowledgements": []}


def desired(client, gateway_id: str, token: str, **headers: str):
    return client.get(f"/api/v1/gateways/{gateway_id}/desired", headers={**bearer(token), **headers})


def test_desired_state_answers_the_tokens_gateway_and_304_when_unchanged(client, gateway):
    name, token = gateway
    first = desired(client, name, token)
    assert first.status_code == 200 and first.json() == NOTHING and first.headers["etag"]
    again = desired(client, name, token, **{"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == first.headers["etag"]


def test_desired_state_refuses_unknown_revoked_and_other_gateways_tokens(client, gateways):
    (name, token), (other, _) = gateways.add(), gateways.add()
    assert desired(client, other, token).status_code == 403
    assert desired(client, name, "pdmgw_not-a-token").status_code == 401
    assert client.get(f"/api/v1/gateways/{name}/desired").status_code == 401
    gateways.revoke(name)
    refused = desired(client, name, token)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_refused_gateway_tokens_are_limited_per_address_and_logged_once(make_client, gateway, caplog):
    name, token = gateway
    client = make_client(peer="198.51.100.7")
    with caplog.at_level(logging.WARNING, logger="pdm.auth"):
        answers = [client.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(f"pdmgw_guess{i}"))
                   .status_code for i in range(guard.MAX_FAILURES + 3)]
        throttled = desired(client, name, token)
    assert answers == [401] * guard.MAX_FAILURES + [429] * 3
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert [r.getMessage() for r in caplog.records] == ["refused gateway token from 198.51.100.7"]
    assert desired(make_client(peer="198.51.100.8"), name, token).status_code == 200  # others go on


def test_the_limit_follows_x_forwarded_for_from_trusted_proxies_only(make_client, gateway, caplog):
    """Behind nginx every request comes from 127.0.0.1: the limit must count the client's address, and only a
    trusted proxy may name it (a forged header from elsewhere neither dodges nor moves the limit)."""
    name, token = gateway
    behind_nginx = make_client(trusted_proxies=["127.0.0.1"])
    direct = make_client(peer="192.0.2.77", trusted_proxies=["127.0.0.1"])
    with caplog.at_level(logging.WARNING, logger="pdm.auth"):
        for i in range(guard.MAX_FAILURES):
            assert desired(behind_nginx, name, f"pdmgw_guess{i}", **{"X-Forwarded-For": "203.0.113.9"}
                           ).status_code == 401
            assert desired(direct, name, f"pdmgw_guess{i}", **{"X-Forwarded-For": "203.0.113.10"}
                           ).status_code == 401
        assert desired(behind_nginx, name, token, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 429
        assert desired(behind_nginx, name, token, **{"X-Forwarded-For": "203.0.113.11"}).status_code == 200
        assert desired(direct, name, token, **{"X-Forwarded-For": "203.0.113.12"}).status_code == 429
    refused = sorted(r.getMessage() for r in caplog.records)
    assert refused == ["refused gateway token from 192.0.2.77", "refused gateway token from 203.0.113.9"]


def test_a_working_gateway_is_not_held_back_by_a_neighbour_behind_the_same_address(make_client, gateways):
    """Gateways of a plant often share one NAT address: a mis-provisioned one must not stop the others."""
    (name, token), (_, revoked_token) = gateways.add(), gateways.add()
    plant = make_client(peer="198.51.100.40")
    assert plant.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(token)).status_code == 200
    for _ in range(guard.MAX_FAILURES + 2):
        plant.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(revoked_token + "x"))
    assert desired(plant, name, revoked_token + "x").status_code == 429
    assert plant.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(token)).status_code == 200
    assert desired(plant, name, token).status_code == 200
