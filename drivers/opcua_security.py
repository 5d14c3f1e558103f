"""OPC UA security for the driver and the tools: the client certificate, and which server certificates to trust.

Trust: the server certificate the server presents at each connection is compared with the certificates in the
`trusted_server_certs` folder (.der, .pem, .crt files: pinned, byte for byte). One that is not there is refused,
saved as `<folder>/../rejected/<name>.der` (when that folder can be written), and the error names the file to copy
into the trusted folder. The check runs at every connection: a server that rotated its certificate is accepted
as soon as the new certificate is trusted, and refused until then.

`make_client_certificate(out_dir)`: what `pdm-edge opcua make-cert` runs: an RSA 2048 key and a self-signed
certificate valid for `days` whose application URI is `urn:<hostname>:pdm-edge` (the driver reads the URI back
from the certificate, so a certificate made on another host still works). The server has to trust it in turn.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")
CLIENT_CERT_FILE = "client-cert.der"
CLIENT_KEY_FILE = "client-key.pem"


class UntrustedServer(Exception):
    """The server presented a certificate that is not in the trusted folder; the message says what to copy where."""


def application_uri(hostname: str | None = None) -> str:
    return f"urn:{hostname or socket.gethostname()}:pdm-edge"


def load_der(path: Path) -> bytes:
    """A certificate file (DER or PEM) as DER bytes; ValueError when it is neither."""
    data = path.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    x509.load_der_x509_certificate(data)  # raises ValueError when it is not a certificate
    return data


def certificate_uri(path: Path) -> str | None:
    """The application URI in a certificate's subject alternative names, if any."""
    cert = x509.load_der_x509_certificate(load_der(path))
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def thumbprint(der: bytes) -> str:
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def _subject(der: bytes) -> str:
    try:
        cert = x509.load_der_x509_certificate(der)
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else cert.subject.rfc4514_string()
    except ValueError:
        return "unreadable certificate"


def trusted(folder: Path) -> set[bytes]:
    """The DER bytes of every certificate in the folder; files that are not certificates are skipped."""
    found = set()
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in CERT_SUFFIXES and path.is_file():
            try:
                found.add(load_der(path))
            except (ValueError, OSError):
                continue
    return found


def check_trusted(server_der: bytes, folder: Path, server: str) -> None:
    """Raise UntrustedServer unless the certificate is in `folder`."""
    if server_der in trusted(folder):
        return
    name = f"{_safe(_subject(server_der))}-{thumbprint(server_der)[:16]}.der"
    rejected = folder.resolve().parent / "rejected" / name
    try:
        rejected.parent.mkdir(exist_ok=True)
        rejected.write_bytes(server_der)
        where = f"saved as {rejected}: review it, then copy it into {folder} to trust it"
    except OSError:
        where = (f"fetch it with `pdm-edge opcua browse --url URL --save-cert FILE`, review it, then copy it into "
                 f"{folder} to trust it")
    raise UntrustedServer(f"server certificate of {server} (CN {_subject(server_der)!r}, SHA-1 "
                          f"{thumbprint(server_der)}) is not trusted; {where}")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:40] or "server"


@dataclass(frozen=True)
class MadeCertificate:
    certificate: Path
    private_key: Path
    uri: str
    thumbprint: str


def make_client_certificate(out_dir: Path, hostname: str | None = None, days: int = 730) -> MadeCertificate:
    """Write client-cert.der and client-key.pem (mode 0600) into out_dir; refuses to overwrite them."""
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography.x509.oid import ExtendedKeyUsageOID

    hostname = hostname or socket.gethostname()
    uri = application_uri(hostname)
    cert_path, key_path = out_dir / CLIENT_CERT_FILE, out_dir / CLIENT_KEY_FILE
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; remove it first or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key, f"pdm-edge@{hostname}", {},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(hostname)],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=days)
    key_path.touch(mode=0o600)
    key_path.write_bytes(dump_private_key_as_pem(key))
    der = cert.public_bytes(serialization.Encoding.DER)
    cert_path.write_bytes(der)
    return MadeCertificate(cert_path, key_path, uri, thumbprint(der))
