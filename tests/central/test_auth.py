"""Tokens: their form, the Authorization header, and the lookup that refuses revoked ones."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from central import auth


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), (" Bearer abc", "abc"),
    (None, None), ("", None), ("Bearer", None), ("Bearer ", None), ("Basic abc", None), ("abc", None),
    ("Bearer " + "x" * 513, None),
])
def test_bearer_token(header, token):
    assert auth.bearer_token(header) == token


def test_new_tokens_are_long_random_and_prefixed():
    tokens = {auth.new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith(auth.TOKEN_PREFIX) and len(t) == len(auth.TOKEN_PREFIX) + 43 for t in tokens)


def test_same_secret():
    assert auth.same_secret("a" * 40, "a" * 40)
    assert not auth.same_secret("a" * 40, "a" * 39) and not auth.same_secret("", "a")


def test_find_gateway_refuses_revoked_and_unknown_tokens(central_url, gateways):
    name, token = gateways.add()

    async def find(candidate: str):
        async with await psycopg.AsyncConnection.connect(central_url) as conn:
            return await auth.find_gateway(conn, candidate)

    found = asyncio.run(find(token))
    assert found is not None and found.name == name
    assert asyncio.run(find(token + "x")) is None
    gateways.revoke(name)
    assert asyncio.run(find(token)) is None


def test_the_gateway_cache_expires_and_is_bounded(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("central.auth.time.monotonic", lambda: now[0])
    cache = auth.GatewayCache(ttl_s=60, max_entries=2)
    gateway = auth.Gateway(1, "gw-1", auth.token_hash("token-1"))
    cache.put("token-1", gateway)
    assert cache.get("token-1") == gateway and cache.get("token-2") is None
    now[0] += 61
    assert cache.get("token-1") is None
    cache.put("token-1", gateway)
    cache.drop("token-1")
    assert cache.get("token-1") is None
    for i in range(3):
        cache.put(f"t{i}", gateway)
    assert len(cache._entries) <= 2


def test_a_revoked_token_in_the_cache_is_refused_every_time(client, gateways, conn):
    from testkit import batches
    from tests.central.support import bearer

    name, token = gateways.add()
    assert client.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(token)).status_code == 200
    gateways.revoke(name)  # the app still has the gateway in its cache
    batch = batches.batch(name, summaries=[batches.summary(name, minute=10)], events=[])
    assert client.post("/api/v1/ingest", json=batch, headers=bearer(token)).status_code == 401
    # That refusal evicted it: the next request is refused before its body is even read (not a 422).
    malformed = client.post("/api/v1/ingest", content=b"{",
                            headers={**bearer(token), "Content-Type": "application/json"})
    assert malformed.status_code == 401
    assert conn.execute("SELECT count(*) FROM summaries s JOIN gateways g ON g.id = s.gateway_id "
                        "WHERE g.name = %s", [name]).fetchone()[0] == 3


def test_a_cached_token_replaced_by_a_new_one_stores_nothing(client, gateways, conn):
    """Revoked, then given a new token (`pdm-central add-gateway` again): the old token, still in the app's cache,
    is refused with 401 and stores nothing; the new one is taken."""
    from testkit import batches
    from tests.central.support import bearer

    name, old = gateways.add()
    assert client.post("/api/v1/ingest", json=batches.batch(name), headers=bearer(old)).status_code == 200
    gateways.revoke(name)
    with psycopg.connect(gateways.url) as admin:
        new = auth.add_gateway(admin, name)
    late = batches.batch(name, summaries=[batches.summary(name, minute=10)], events=[])
    assert client.post("/api/v1/ingest", json=late, headers=bearer(old)).status_code == 401
    assert client.post("/api/v1/ingest", json=late, headers=bearer(new)).json()["accepted"]["summaries"] == 1
    assert conn.execute("SELECT count(*) FROM summaries s JOIN gateways g ON g.id = s.gateway_id "
                        "WHERE g.name = %s", [name]).fetchone()[0] == 4
