"""Real local services for tests and benchmarks (never shipped in the wheel, never imported by the product).

- `testkit.net`: LOCALHOST, free ports, `port_open`, `wait_until`, and `ServiceError`, which every service raises
  with what to do about it.
- `testkit.mqtt`: a throwaway Mosquitto broker, a broker someone else runs, an MQTT publisher.
- `testkit.modbus`: pymodbus TCP and RTU servers simulating devices.
- `testkit.opcua`: asyncua servers (security, users, restarts with kept values, session expiry), a slow or cut
  proxy, certificates.
- `testkit.postgres`: a PostgreSQL that trusts the `postgres` user, a throwaway server, throwaway databases.
- `testkit.batches`: ingest batches as a gateway sends them to central (SPEC §6).
- `testkit.central`: the ops token the tests and benchmarks configure central with.
"""
