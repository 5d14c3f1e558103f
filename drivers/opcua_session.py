"""One connection to an OPC UA server, with the security a `[[opcua]]` table asks for; failures in one line.

`connect(config, lost)` returns a connected asyncua Client (its own reconnection off: the driver owns that) and
resolves `lost` with a one-line reason when the connection is lost later. `describe_failure(exc, config)` says
what went wrong and what to check, without a Python type name or a traceback. The browse tool uses both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.subscription import OverflowPolicy
from asyncua.crypto import security_policies, uacrypto
from asyncua.ua import uaerrors

from drivers.opcua_config import OpcuaServer
from drivers.opcua_security import UntrustedServer, certificate_uri, check_trusted, load_der

log = logging.getLogger(__name__)
T = TypeVar("T")

_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
_USER_REFUSED = {"BadUserAccessDenied", "BadIdentityTokenInvalid", "BadIdentityTokenRejected",
                 "BadUserSignatureInvalid"}
_CLIENT_CERT_REFUSED = {"BadCertificateUntrusted", "BadSecurityChecksFailed", "BadCertificateInvalid",
                        "BadCertificateUriInvalid", "BadCertificateTimeInvalid", "BadCertificateRevoked",
                        "BadCertificateUseNotAllowed", "BadCertificateIssuerRevocationUnknown"}


class NoEndpoint(Exception):
    pass


class UnreadableFile(Exception):
    """A certificate, key or password file named in the configuration cannot be read now."""


def _read(what: str, path: Path | None, read: Callable[[Path], T]) -> T:
    if path is None:  # the configuration requires it with this security policy or a username
        raise UnreadableFile(f"{what} is not set")
    try:
        return read(path)
    except OSError as exc:
        raise UnreadableFile(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UnreadableFile(f"{what} {path} is not a certificate or key asyncua can read: {exc}") from None


def _key(path: Path) -> uacrypto.CertProperties:
    pem = path.read_bytes().lstrip().startswith(b"-----BEGIN")
    return uacrypto.CertProperties(str(path), extension="pem" if pem else "der")


async def connect(config: OpcuaServer, lost: asyncio.Future[str] | None = None,
                  timeout_s: float | None = None) -> Client:
    timeout = timeout_s or config.timeout_s
    client = Client(config.url, timeout=timeout, watchdog_intervall=timeout, auto_reconnect=False)
    client.session_timeout = max(60_000, int(timeout * 4000))
    if config.security_policy == "Basic256Sha256":
        await _secure(client, config, timeout)
    if config.username is not None:
        client.set_user(config.username)
        client.set_password(_read("password_file", config.password_file, lambda _: config.password()) or "")
    if lost is not None:
        async def on_lost(exc: Exception) -> None:
            if not lost.done():
                lost.set_result(_why(exc))

        client.connection_lost_callback = on_lost
    try:
        async with asyncio.timeout(timeout * 3):  # not wait_for: on 3.11 it can swallow a stop's cancel
            await client.connect()
    except BaseException:
        await disconnect(client, timeout)
        raise
    return client


async def _secure(client: Client, config: OpcuaServer, timeout: float) -> None:
    """Apply Basic256Sha256 with the server certificate the server presents now, if the trusted folder has it."""
    mode = _MODES[config.security_mode]
    uri = security_policies.SecurityPolicyBasic256Sha256.URI
    async with asyncio.timeout(timeout * 2):
        endpoints = await client.connect_and_get_server_endpoints()
    endpoint = next((e for e in endpoints if e.SecurityPolicyUri == uri and e.SecurityMode == mode), None)
    if endpoint is None:
        offered = sorted({f"{e.SecurityPolicyUri.rpartition('#')[2]} {e.SecurityMode.name}" for e in endpoints})
        raise NoEndpoint(f"the server offers no Basic256Sha256 {config.security_mode} endpoint (it offers "
                         f"{', '.join(offered)}); set security_policy and security_mode to one of those")
    presented = uacrypto.x509_from_der(endpoint.ServerCertificate)  # type: ignore[no-untyped-call]  # unannotated
    server_der: bytes = uacrypto.der_from_x509(presented)  # type: ignore[no-untyped-call]
    _read("trusted_server_certs", config.trusted_server_certs,
          lambda folder: check_trusted(server_der, folder, config.label))
    client.application_uri = _read("certificate", config.certificate, certificate_uri) or client.application_uri
    certificate = _read("certificate", config.certificate, load_der)
    private_key = _read("private_key", config.private_key, _key)
    try:
        await client.set_security(security_policies.SecurityPolicyBasic256Sha256, certificate=certificate,
                                  private_key=private_key, server_certificate=server_der, mode=mode)
    except (ValueError, TypeError) as exc:
        raise UnreadableFile(f"private_key {config.private_key} is not an unencrypted key asyncua can read: {exc}") \
            from None


async def disconnect(client: Client, timeout_s: float) -> None:
    """Close session, channel and socket; never raises, never waits much longer than timeout_s."""
    try:
        async with asyncio.timeout(timeout_s):
            await client.disconnect()
    except asyncio.CancelledError:
        client.disconnect_socket()
        raise
    except Exception:  # noqa: BLE001 - the server is gone or refused: the socket is closed either way
        client.disconnect_socket()


def _why(exc: BaseException | None) -> str:
    if exc is None:
        return "the connection was lost"
    if isinstance(exc, uaerrors.UaStatusCodeError):
        return f"{type(exc).__name__}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "the server stopped answering"
    text = str(exc) or "the connection was lost"
    return "the connection was closed" if text in ("transport lost", "Connection is closed") else text


def describe_failure(exc: BaseException, config: OpcuaServer) -> str:
    """One line: what failed, and what to check."""
    if isinstance(exc, UntrustedServer | NoEndpoint | UnreadableFile):
        return str(exc)
    if isinstance(exc, uaerrors.UaStatusCodeError):
        name = type(exc).__name__ if type(exc) is not uaerrors.UaStatusCodeError else _status_name(exc)
        if name in _USER_REFUSED:
            who = f"user {config.username!r}" if config.username else "anonymous access"
            return f"{who} refused by the server ({name}): check username and password_file"
        if name in _CLIENT_CERT_REFUSED:
            cert = config.certificate or "this client's certificate"
            return (f"the server refused this client's certificate ({name}): add {cert} to the server's trusted "
                    "certificates")
        if name == "BadTooManySessions":
            return "the server has no session left for this client (BadTooManySessions)"
        return f"the server answered {name}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return f"no answer from {config.url} within the timeout ({config.timeout_s:g} s)"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {config.url} refused: is the server running, and is the port right?"
    if isinstance(exc, OSError):
        return f"cannot reach {config.url}: {exc.strerror or exc}"
    if isinstance(exc, uaerrors.UaError):
        return f"{config.url}: {exc}"
    if isinstance(exc, ValueError):  # a certificate or key file asyncua could not read
        return f"cannot use the certificate or key: {exc}"
    return f"{config.url}: {exc!r}"


def _status_name(exc: uaerrors.UaStatusCodeError) -> str:
    try:
        name: str = ua.StatusCode(exc.code).name
        return name
    except Exception:  # noqa: BLE001
        return f"status 0x{exc.code:08X}"


__all__ = ["OverflowPolicy", "connect", "describe_failure", "disconnect", "uaerrors"]
