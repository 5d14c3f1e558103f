"""The reliability suite (RELIABILITY.md): faults injected into real processes and services. The central fixtures
(a migrated PostgreSQL database, gateways with tokens) are the central tests' own."""

from tests.central.conftest import central_url, gateways  # noqa: F401  (fixtures)
