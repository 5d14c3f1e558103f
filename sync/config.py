"""Where and how the agent syncs to the central API: the `[central]` table. Sync is off while `url` is unset."""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, FilePath, HttpUrl, SecretStr, ValidationInfo, field_validator

from sync.onchange import OnChangeConfig


class CentralConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # sync_interval_s = inf: wait() overflows

    # Declared before `url` so that url's validator can see it.
    allow_insecure_http: bool = False  # plain http:// to a host other than this one; the token travels in clear
    url: HttpUrl | None = None
    token: SecretStr | None = Field(None, validate_default=True)
    sync_interval_s: float = Field(30.0, gt=0)
    poll_s: float = Field(60.0, gt=0)  # the desired state (SPEC §9) is asked for at least this often
    batch_size: int = Field(500, gt=0)
    timeout_s: float = Field(10.0, gt=0)
    ca_file: FilePath | None = None  # CA bundle for a private CA; default: the system's
    on_change: OnChangeConfig = OnChangeConfig()  # summaries on change (sync/onchange.py); on by default

    @property
    def enabled(self) -> bool:
        return self.url is not None

    @field_validator("url")
    @classmethod
    def _safe_url(cls, url: HttpUrl | None, info: ValidationInfo) -> HttpUrl | None:
        if url is None:
            return url
        if url.username or url.password:
            raise ValueError("credentials in the URL would be logged; put the token in central.token")
        if url.scheme == "http" and not is_loopback(url.host or "") and not info.data.get("allow_insecure_http"):
            raise ValueError(
                "plain http:// sends the gateway token in clear; use https://, "
                "or set central.allow_insecure_http = true on a network you trust"
            )
        return url

    @field_validator("token")
    @classmethod
    def _token_for_url(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if token is None and info.data.get("url") is not None:
            raise ValueError(
                "required when central.url is set; give the token `pdm-central add-gateway` printed "
                "(PDM_CENTRAL__TOKEN_FILE or the systemd credential central.token), or unset central.url"
            )
        return token

    @field_validator("ca_file")
    @classmethod
    def _needs_tls(cls, ca_file: FilePath | None, info: ValidationInfo) -> FilePath | None:
        url = info.data.get("url")
        if ca_file is not None and url is not None and url.scheme != "https":
            raise ValueError("a CA file is only used with TLS; use an https:// URL or remove central.ca_file")
        return ca_file


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine, without resolving it (no network I/O during validation)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
