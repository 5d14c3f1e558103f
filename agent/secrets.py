"""How the agent reads PDM_ variables, and secrets from files: `<variable>_FILE` and systemd credentials.

    secret          variable              file variable              systemd credential
    central.token   PDM_CENTRAL__TOKEN    PDM_CENTRAL__TOKEN_FILE    central.token
    status.token    PDM_STATUS__TOKEN     PDM_STATUS__TOKEN_FILE     status.token
    mqtt.password   PDM_MQTT__PASSWORD    PDM_MQTT__PASSWORD_FILE    mqtt.password

A file variable, in the environment or in the .env file, stands for its variable holding the file's content: same
priority, and setting both is an error. A credential is the file of that name in `$CREDENTIALS_DIRECTORY` (systemd's
`LoadCredential=central.token:/etc/pdm-edge/central.token`); credentials rank below the environment and the .env
file and above the TOML file. Trailing newlines are stripped. An unreadable or empty file is a configuration error
that names the variable or credential and the path, never the content.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, DotEnvSettingsSource, EnvSettingsSource, InitSettingsSource

Key = tuple[str | int, ...]

ENV_PREFIX = "PDM_"
CONFIG_ENV = "PDM_CONFIG"  # names the TOML file; read by load_config, not a setting
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
SECRET_KEYS: tuple[tuple[str, str], ...] = (("central", "token"), ("status", "token"), ("mqtt", "password"))


def env_name(key: Key) -> str:
    """The variable that sets `key`, e.g. PDM_CENTRAL__URL; a list is set as a whole, e.g. PDM_MODBUS (JSON)."""
    names = itertools.takewhile(lambda part: isinstance(part, str), key)
    return ENV_PREFIX + "__".join(str(name) for name in names).upper()


def dotted(key: Key) -> str:
    """How a key is written in messages, e.g. modbus[0].registers.torque.type; also a credential's file name."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in key).removeprefix(".")


def read_secret(path: Path) -> str:
    """The file's content without trailing newlines; OSError or ValueError when it cannot serve as a secret."""
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\n")  # read_text turns \r\n into \n
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None  # the decode error would quote secret bytes
    if not secret:
        raise ValueError("it is empty")
    return secret


def unreadable(key: Key, origin: str, path: Path, exc: OSError | ValueError) -> str:
    reason = exc.strerror if isinstance(exc, OSError) else str(exc)
    return f"{dotted(key)} ({origin}): cannot use {path} as the secret: {reason}; fix the file or the path"


class _Variables:
    """Our reading of PDM_ variables, mixed into the library's environment and .env sources: a PDM_..._FILE
    variable becomes the variable it stands for, PDM_CONFIG is set aside, and bad JSON is reported by name."""

    place: str  # where the variables are, for messages
    problems: list[str]
    secret_files: dict[str, str]  # lower-case variable name -> the file it was read from
    config_file: str | None  # PDM_CONFIG

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env_vars = dict(super()._load_env_vars())  # type: ignore[misc]  # names are lower-case
        self.config_file = env_vars.pop(CONFIG_ENV.lower(), None)
        self.problems, self.secret_files = [], {}
        for key in SECRET_KEYS:
            self._read_file_variable(key, env_vars)
        return env_vars

    def _read_file_variable(self, key: Key, env_vars: dict[str, str | None]) -> None:
        name = env_name(key).lower()
        path = env_vars.pop(f"{name}_file", None)
        if path is None:
            return
        origin = f"{name.upper()}_FILE in {self.place}"
        if name in env_vars:
            self.problems.append(f"{dotted(key)} ({origin}): {name.upper()} is set too; keep one of them")
            return
        try:
            env_vars[name] = read_secret(Path(path))
        except (OSError, ValueError) as exc:
            self.problems.append(unreadable(key, origin, Path(path), exc))
        else:
            self.secret_files[name] = path

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)  # type: ignore[misc]
        except ValueError:
            raise ValueError(  # the library wraps it in a SettingsError that names neither variable nor fix
                f"{field_name} ({env_name((field_name,))}* in {self.place}): a list or table that is not valid "
                """JSON; write it as JSON, e.g. PDM_MQTT__TOPICS='["pdm/+/telemetry"]'"""
            ) from None

    def origin(self, key: Key) -> str:
        name = env_name(key)
        file = self.secret_files.get(name.lower())
        return f"{name}_FILE={file} in {self.place}" if file else f"{name} in {self.place}"


class EnvSource(_Variables, EnvSettingsSource):
    place = "the environment"


class DotEnvSource(_Variables, DotEnvSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], env_file: Path) -> None:
        self.place = str(env_file)
        super().__init__(settings_cls, env_file=env_file)


def _secret_files(directory: str | None) -> list[tuple[Key, Path]]:
    return [] if directory is None else [(key, Path(directory, dotted(key))) for key in SECRET_KEYS]


class CredentialsSource(InitSettingsSource):
    """systemd credentials named like the secret they hold, e.g. `$CREDENTIALS_DIRECTORY/central.token`."""

    def __init__(self, settings_cls: type[BaseSettings], directory: str | None) -> None:
        self.directory = directory
        self.problems: list[str] = []
        values: dict[str, dict[str, str]] = {}
        if directory is not None and not os.access(directory, os.R_OK | os.X_OK) and os.path.isdir(directory):
            # one problem for the folder rather than one per secret in it (seen in a container whose mounts do not
            # propagate: systemd leaves the folder root's 0700 and empty)
            self.problems.append(f"${CREDENTIALS_ENV} ({directory}): cannot read the folder of systemd credentials: "
                                 "Permission denied; the service manager made it, check its log")
            super().__init__(settings_cls, values)
            return
        for key, path in _secret_files(directory):
            try:
                secret = read_secret(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                self.problems.append(unreadable(key, f"systemd credential in {directory}", path, exc))
                continue
            section, name = key
            values.setdefault(str(section), {})[str(name)] = secret
        super().__init__(settings_cls, values)

    def origin(self, key: Key) -> str:
        return f"systemd credential {self.directory}/{dotted(key)}"
