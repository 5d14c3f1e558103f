"""The central API's settings: `PDM_CENTRAL_<NAME>` environment variables, validated once at startup.

    variable                        default                                 notes
    PDM_CENTRAL_MODE                development                             development | production
    PDM_CENTRAL_DATABASE_URL        postgresql://127.0.0.1:5432/pdm_central secret (may hold a password)
    PDM_CENTRAL_READ_DATABASE_URL   (none: every read on the primary)       secret; a streaming replica for the
                                                                            dashboard's and ops reads (replica.py)
    PDM_CENTRAL_OPS_TOKEN           (none: ops endpoints answer 401)        secret, bearer token of the ops API
    PDM_CENTRAL_CORS_ORIGINS        (none: no CORS headers)                 comma-separated https://host[:port]
    PDM_CENTRAL_TRUSTED_PROXIES     (none: X-Forwarded-* ignored)           comma-separated IPs or networks
    PDM_CENTRAL_MAX_BODY_BYTES      16777216                                ingest body, compressed and decompressed
    PDM_CENTRAL_MAX_MACHINES_PER_GATEWAY  10000                             new machines beyond it: 422 per record
    PDM_CENTRAL_BIND                127.0.0.1:8000                          `serve` and gunicorn
    PDM_CENTRAL_WORKERS             number of CPUs                          gunicorn worker processes
    PDM_CENTRAL_POOL_MIN_SIZE       1                                       connections per worker process
    PDM_CENTRAL_POOL_MAX_SIZE       10
    PDM_CENTRAL_DB_TIMEOUT_S        5                                       wait for a connection, then 503
    PDM_CENTRAL_STATEMENT_TIMEOUT_S 30
    PDM_CENTRAL_LOG_LEVEL           INFO
    PDM_CENTRAL_LOG_FORMAT          auto                                    auto | json | text
    PDM_CENTRAL_SESSION_LIFETIME_S  28800                                   dashboard session, from login (60 s-7 days)
    PDM_CENTRAL_SESSION_COOKIE_SECURE  true                                 false: plain http, loopback bind only
    PDM_CENTRAL_NOTIFY_CONFIG       (none: no notifications)                TOML routes and channels (central/notify)
    PDM_CENTRAL_NOTIFY_WORKER       inline                                  inline: the API process delivers them;
                                                                            off: `pdm-central notify` does (production)
    PDM_CENTRAL_RETAIN_SUMMARIES_DAYS  30                                   raw summaries (daily partitions dropped)
    PDM_CENTRAL_RETAIN_ROLLUP_DAYS  1830                                    the hourly roll-up (monthly partitions)
    PDM_CENTRAL_RETAIN_EVENTS_DAYS  400                                     state changes (monthly partitions)
    PDM_CENTRAL_RETAIN_EPISODES_DAYS   730                                  closed alarm episodes and their audit log
    PDM_CENTRAL_PARTITIONS_AHEAD_DAYS  7                                    partitions created this far ahead
    PDM_CENTRAL_MAINTENANCE_INTERVAL_S 3600                                 partitions and retention; 0: off (then
                                                                            run `pdm-central maintain` from a timer)
    PDM_CENTRAL_ROLLOUT_INTERVAL_S  10                                      a running rollout is advanced this often;
                                                                            0: only by `pdm-central rollout status`

A secret can also come from a file: `PDM_CENTRAL_OPS_TOKEN_FILE=/run/secrets/ops-token` (setting both is an error),
or from the systemd credential of the same name in lower case (`LoadCredential=ops_token:/etc/pdm-central/ops`),
which ranks below the environment. Trailing newlines are stripped. An unknown `PDM_CENTRAL_` variable is an error
(a misspelt security setting must not pass silently); the agent's `PDM_CENTRAL__*` variables (double underscore)
are not ours and are ignored. There is no .env file: use systemd's EnvironmentFile= or docker's env_file.

Production mode (`PDM_CENTRAL_MODE=production`) refuses to serve, listing every reason at once, when
  - the ops token is missing or weak (under 128 bits of estimated entropy, web/tokens.py: length alone is not
    strength, `0123456789` three times is 32 characters and guessable);
  - a CORS origin is `*` (and in any mode, an origin must be scheme://host[:port] without a path);
  - a trusted proxy network covers every address (0.0.0.0/0 or ::/0): anyone could forge X-Forwarded-For;
  - PDM_CENTRAL_DATABASE_URL is not set (the development default is never right in production);
  - the database URL holds a password (in any form libpq reads: `user:password@`, `?password=`, or a keyword
    conninfo's `password=`) and came from the plain variable: environment variables leak through
    `/proc/PID/environ`, `docker inspect` and crash reports; give the URL through PDM_CENTRAL_DATABASE_URL_FILE or a
    credential, or leave the password out and use libpq's ~/.pgpass (PGPASSFILE);
  - PDM_CENTRAL_SESSION_COOKIE_SECURE is false (the dashboard's session cookie would travel over plain http).
In any mode, a session cookie without Secure is refused unless PDM_CENTRAL_BIND is a loopback address: plain http
is for a developer's own machine and the tests only.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from sync.config import is_loopback
from web.tokens import weakness

PREFIX = "PDM_CENTRAL_"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
SECRETS = ("database_url", "ops_token", "read_database_url")
MIN_OPS_TOKEN_BITS = 128
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/pdm_central"
LIST_SETTINGS = ("cors_origins", "trusted_proxies")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """Settings that cannot be used; `problems` has one line per problem, naming the variable and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["development", "production"] = "development"
    database_url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
    read_database_url: SecretStr | None = None
    ops_token: SecretStr | None = None
    cors_origins: list[str] = []
    trusted_proxies: list[Network] = []
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    max_machines_per_gateway: int = Field(10_000, ge=1)
    bind: Annotated[str, Field(pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")] = "127.0.0.1:8000"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(10, ge=1)
    db_timeout_s: float = Field(5.0, gt=0)
    statement_timeout_s: float = Field(30.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    session_lifetime_s: int = Field(8 * 3600, ge=60, le=7 * 24 * 3600)
    session_cookie_secure: bool = True
    notify_config: Path | None = None  # notification routes and channels (central/notify/config.py)
    # Who delivers them: a task of each API process (inline), or only `pdm-central notify` processes (off).
    notify_worker: Literal["inline", "off"] = "inline"
    # Partitions and retention (central/partitions.py).
    retain_summaries_days: int = Field(30, ge=1)
    retain_rollup_days: int = Field(5 * 366, ge=1)
    retain_events_days: int = Field(400, ge=1)
    retain_episodes_days: int = Field(730, ge=1)
    partitions_ahead_days: int = Field(7, ge=1, le=90)
    maintenance_interval_s: float = Field(3600.0, ge=0)
    rollout_interval_s: float = Field(10.0, ge=0)  # how often a running rollout is advanced; 0: only by the CLI

    # Where each secret came from ("environment", "file", "credential", "default"): production rules depend on it.
    sources: dict[str, str] = {}

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise ValueError(f"{origin!r} is not an origin; write scheme://host[:port], e.g. https://ops.example.com")
        return origins

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, proxies: list[object]) -> list[object]:
        return [ipaddress.ip_network(p, strict=False) if isinstance(p, str) else p for p in proxies]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, level: str) -> str:
        return level.upper() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _pool(self) -> Settings:
        if self.pool_max_size < self.pool_min_size:
            raise ValueError(f"{PREFIX}POOL_MAX_SIZE ({self.pool_max_size}) is below {PREFIX}POOL_MIN_SIZE "
                             f"({self.pool_min_size}); raise the maximum or lower the minimum")
        return self

    @model_validator(mode="after")
    def _retention(self) -> Settings:
        if self.retain_rollup_days < self.retain_summaries_days:
            raise ValueError(f"{PREFIX}RETAIN_ROLLUP_DAYS ({self.retain_rollup_days}) is below "
                             f"{PREFIX}RETAIN_SUMMARIES_DAYS ({self.retain_summaries_days}): the hourly roll-up is "
                             "what the dashboard draws once the raw summaries are gone; keep it at least as long")
        return self

    @property
    def production(self) -> bool:
        return self.mode == "production"

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.bind.rsplit(":", 1)
        return host.strip("[]"), int(port)

    def serving_problems(self) -> list[str]:
        """What production mode refuses (in development only an insecure cookie off loopback; empty when all is
        well); see the module docstring."""
        problems = self._notify_problems()
        if not self.session_cookie_secure:
            if self.production:
                problems.append(f"{PREFIX}SESSION_COOKIE_SECURE: false sends the dashboard's session cookie over "
                                "plain http; production keeps it true (TLS ends at nginx, see DEPLOYMENT.md)")
            elif not is_loopback(self.host_port[0]):
                problems.append(f"{PREFIX}SESSION_COOKIE_SECURE: false is for a loopback address only, not "
                                f"{PREFIX}BIND={self.bind}; keep it true and put TLS in front (DEPLOYMENT.md)")
        if not self.production:
            return problems
        token = self.ops_token.get_secret_value() if self.ops_token else ""
        if not token:
            problems.append(f"{PREFIX}OPS_TOKEN: required in production; generate one with "
                            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        elif reason := weakness(token, min_bits=MIN_OPS_TOKEN_BITS):
            problems.append(f"{PREFIX}OPS_TOKEN ({self.sources.get('ops_token')}): {reason}")
        if "*" in self.cors_origins:
            problems.append(f"{PREFIX}CORS_ORIGINS: '*' lets any web page call the ops API; list the dashboard's "
                            "origins, e.g. https://ops.example.com")
        for network in self.trusted_proxies:
            if network.prefixlen == 0:
                problems.append(f"{PREFIX}TRUSTED_PROXIES: {network} trusts X-Forwarded-For from every address; "
                                "list the reverse proxy's addresses only")
        source = self.sources.get("database_url", "default")
        if source == "default":
            problems.append(f"{PREFIX}DATABASE_URL: required in production (the development default "
                            f"{DEFAULT_DATABASE_URL} is not assumed)")
        for key, url in (("database_url", self.database_url), ("read_database_url", self.read_database_url)):
            if url is not None and self.sources.get(key) == "environment" \
                    and _password(url.get_secret_value()) is not None:
                problems.append(f"{PREFIX}{key.upper()}: holds a password in a plain environment variable; give "
                                f"the URL through {PREFIX}{key.upper()}_FILE or the systemd credential {key}, or use "
                                "~/.pgpass (PGPASSFILE) and leave the password out")
        return problems

    def _notify_problems(self) -> list[str]:
        """PDM_CENTRAL_NOTIFY_CONFIG's file, checked with the rest (gunicorn refuses to start on it too)."""
        from central.notify.config import NotifyConfigError, load

        try:
            if self.notify_config is not None:
                load(self.notify_config, production=self.production)
        except NotifyConfigError as exc:
            return [f"{PREFIX}NOTIFY_CONFIG: {line}" for line in exc.problems]
        return []

    def redacted(self) -> dict[str, Any]:
        """The effective settings for logs: secrets and the database URL's password replaced by ***."""
        data = self.model_dump(mode="json", exclude={"sources"})
        data["ops_token"] = "***" if self.ops_token else None
        data["database_url"] = redact_url(self.database_url.get_secret_value())
        if self.read_database_url is not None:
            data["read_database_url"] = redact_url(self.read_database_url.get_secret_value())
        return data


def _password(conninfo: str) -> str | None:
    """The password a libpq connection string holds, in whichever form (URL userinfo, `?password=`, keyword
    `password=`); "" when it cannot be parsed (then it may hold one: treat it as secret)."""
    import psycopg  # here, not at the top: `pdm-central --help` works without the central extra
    from psycopg.conninfo import conninfo_to_dict

    try:
        password = conninfo_to_dict(conninfo).get("password")
    except (psycopg.Error, ValueError):  # what libpq's parser refuses
        return ""
    return None if password is None else str(password)


def redact_url(url: str) -> str:
    """The connection string for logs, its password replaced by ***, whatever form it takes: a URL keeps its form
    when its only password is in the userinfo; otherwise libpq's parse, rebuilt as keywords. One that libpq cannot
    parse is not shown at all."""
    password = _password(url)
    if password is None:
        return url
    if password == "":
        return "(not shown: libpq cannot parse it)"
    parts = urlsplit(url)
    if parts.scheme in ("postgresql", "postgres") and parts.password is not None and "password" not in parts.query:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    return make_conninfo("", **{**conninfo_to_dict(url), "password": "***"})


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default os.environ); SettingsError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    fields = set(Settings.model_fields) - {"sources"}
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper.startswith(PREFIX + "_"):
            continue  # PDM_CENTRAL__URL and friends belong to the agent
        key = upper.removeprefix(PREFIX).lower()
        if key.endswith("_file") and key.removesuffix("_file") in SECRETS:
            continue  # read below
        if key not in fields:
            problems.append(f"{name}: unknown variable; remove it or correct its spelling "
                            f"(known: {', '.join(PREFIX + f.upper() for f in sorted(fields))})")
            continue
        if value == "":
            continue  # PDM_CENTRAL_X= counts as unset, as docker compose's ${X:-} produces
        values[key] = _split(value) if key in LIST_SETTINGS else value
        sources[key] = "environment"
    credentials = environ.get(CREDENTIALS_ENV)
    for key in SECRETS:
        variable = PREFIX + key.upper()
        path = next((v for n, v in environ.items() if n.upper() == variable + "_FILE" and v), None)
        if path is not None:
            if key in values:
                problems.append(f"{variable}_FILE: {variable} is set too; keep one of them")
                continue
            try:
                values[key], sources[key] = read_secret(Path(path)), "file"
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                problems.append(f"{variable}_FILE: cannot use {path} as the secret: {reason}; fix the file or the path")
        elif key not in values and credentials:
            credential = Path(credentials, key)
            try:
                values[key], sources[key] = read_secret(credential), "credential"
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                problems.append(f"systemd credential {credential}: cannot use it as {variable}: {reason}")
    if problems:
        raise SettingsError(problems)
    try:
        return Settings.model_validate({**values, "sources": {key: sources.get(key, "default") for key in SECRETS}})
    except ValidationError as exc:
        raise SettingsError([_describe(error) for error in exc.errors()]) from None


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(error: ErrorDetails) -> str:
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    name = PREFIX + str(error["loc"][0]).upper() if error["loc"] else PREFIX + "*"
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"] and error["loc"][0] in SECRETS:
        return f"{name}: {message}"  # never echo a secret
    return f"{name}={error.get('input')!r}: {message}"


def read_secret(path: Path) -> str:
    """The file's content without trailing newlines; OSError or ValueError when it cannot serve as a secret."""
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    if not secret:
        raise ValueError("it is empty")
    return secret
