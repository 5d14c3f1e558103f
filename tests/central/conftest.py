"""The central API on a real PostgreSQL: a migrated database for the session, apps in-process (TestClient), and
gateways registered the way `pdm-central add-gateway` does it. Tests share the database; each uses gateways of
its own (unique names), so none depends on another's rows."""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from fastapi.testclient import TestClient

from central import auth, db
from central.app import create_app
from tests.central.support import make_settings


@pytest.fixture(autouse=True)
def no_central_environment(monkeypatch):
    """No PDM_CENTRAL_ variable or systemd credential of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("PDM_CENTRAL_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def central_url(postgres_database):
    """The session's database, migrated."""
    with psycopg.connect(postgres_database) as conn:
        db.migrate(conn)
    return postgres_database


@pytest.fixture
def settings(central_url):
    return make_settings(central_url)


@pytest.fixture
def make_client(central_url):
    """make_client(**settings) -> a started TestClient (lifespan run: the pool is open); closed after the test."""
    clients = []

    def make(url: str | None = None, raise_server_exceptions: bool = True, peer: str = "127.0.0.1",
             **overrides) -> TestClient:
        """`peer` is the client's address as the server sees it."""
        client = TestClient(create_app(make_settings(url or central_url, **overrides)),
                            raise_server_exceptions=raise_server_exceptions, client=(peer, 50000))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def conn(central_url):
    """A plain connection to the session's database, for looking at what the API stored."""
    with psycopg.connect(central_url, autocommit=True) as connection:
        yield connection


class Gateways:
    def __init__(self, url: str) -> None:
        self.url = url

    def add(self, prefix: str = "gw") -> tuple[str, str]:
        """A new gateway with a unique name: (name, token)."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url) as conn:
            return name, auth.add_gateway(conn, name)

    def revoke(self, name: str) -> None:
        with psycopg.connect(self.url) as conn:
            auth.revoke_gateway(conn, name)


@pytest.fixture
def gateways(central_url):
    return Gateways(central_url)


@pytest.fixture
def gateway(gateways):
    """(name, token) of a new active gateway."""
    return gateways.add()
