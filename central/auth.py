"""Gateway tokens and the ops token.

A gateway token is `pdmgw_` + 32 random bytes (URL-safe base64), printed once by `pdm-central add-gateway`; central
stores its sha256 only. A fast hash is enough here: slow, salted hashes (bcrypt, argon2) exist to make guessing
low-entropy passwords expensive, and 256 random bits cannot be guessed at any hashing speed. An unsalted hash also
keeps the lookup an index probe (`WHERE token_hash = $1`), which compares digests, not tokens: timing can at most
reveal something about the digest of the attacker's own guess, never about a stored token.

The ops token comes from the settings and is compared in constant time (`hmac.compare_digest` on digests).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

TOKEN_PREFIX = "pdmgw_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # the protocol's gateway_id


class GatewayError(ValueError):
    """A gateway command cannot be carried out (unknown name, already active, invalid name)."""


@dataclass(frozen=True)
class Gateway:
    id: int
    name: str
    token_hash: bytes  # of the token it was found by: ingest stores a batch only while that is still its token


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return token


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(token_hash(given), token_hash(expected))


FIND_GATEWAY = "SELECT id, name, token_hash FROM gateways WHERE token_hash = %s AND revoked_at IS NULL"


async def find_gateway(conn: psycopg.AsyncConnection, token: str) -> Gateway | None:
    """The active gateway holding `token`, else None (unknown and revoked tokens alike)."""
    row = await (await conn.execute(FIND_GATEWAY, [token_hash(token)])).fetchone()
    return Gateway(*row) if row else None


class GatewayCache:
    """Active gateways by token digest, each for `ttl_s` seconds: saves a query (and a pool checkout) per batch.

    Safe for revocation: the write itself re-checks that the gateway is still active and that this is still its token
    (central/ingest.py, STORE), so a token revoked meanwhile, or replaced by a new one, is still refused with 401 and
    stores nothing; the cache only decides whether its body is read and validated before that refusal. Hence a TTL
    longer than a sync round (a gateway sends once a minute) and room for a fleet's gateways (10,000 at a million
    machines): an entry is found again at the gateway's next batch. Unknown tokens are never cached. Used for ingest
    only, from the event loop only.
    """

    def __init__(self, ttl_s: float = 900.0, max_entries: int = 100_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: dict[bytes, tuple[Gateway, float]] = {}

    def get(self, token: str) -> Gateway | None:
        entry = self._entries.get(token_hash(token))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, token: str, gateway: Gateway) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[token_hash(token)] = (gateway, time.monotonic() + self.ttl_s)

    def drop(self, token: str) -> None:
        self._entries.pop(token_hash(token), None)


# The CLI's side, on a plain connection.

def add_gateway(conn: psycopg.Connection, name: str) -> str:
    """Register `name` and return its new token. A revoked gateway gets a new token and is active again (its data
    stays attached to it); an active one is an error: revoke it first."""
    if not NAME_PATTERN.match(name):
        raise GatewayError(f"invalid gateway name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    token = new_token()
    with conn.transaction():
        row = conn.execute("SELECT revoked_at FROM gateways WHERE name = %s FOR UPDATE", [name]).fetchone()
        if row is None:
            conn.execute("INSERT INTO gateways (name, token_hash) VALUES (%s, %s)", [name, token_hash(token)])
        elif row[0] is None:
            raise GatewayError(f"gateway {name!r} already exists and is active; to issue a new token, "
                               f"`pdm-central revoke-gateway {name}` first")
        else:
            conn.execute("UPDATE gateways SET token_hash = %s, revoked_at = NULL WHERE name = %s",
                         [token_hash(token), name])
    return token


def revoke_gateway(conn: psycopg.Connection, name: str) -> datetime:
    """Revoke the gateway's token at once; return when (the first revocation's time if it was already revoked)."""
    with conn.transaction():
        row = conn.execute("UPDATE gateways SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s "
                           "RETURNING revoked_at", [name]).fetchone()
    if row is None:
        raise GatewayError(f"no gateway named {name!r}; `pdm-central list-gateways` shows them")
    revoked_at: datetime = row[0]
    return revoked_at


def list_gateways(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT name, created_at, revoked_at, last_seen_at, agent_version FROM gateways "
                        "ORDER BY name").fetchall()
