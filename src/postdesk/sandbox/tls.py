"""A private test CA and a localhost server certificate for the sandbox's HTTPS listener.

MSAL only talks to https authorities, so the sandbox needs a certificate its clients can trust. The
files are kept in a state directory and reused while they still fit, so a demo started twice hands
out the same ``ca.pem`` and clients configured once keep working.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

DEFAULT_IDENTITIES = ("127.0.0.1", "localhost", "::1")
CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
# A certificate this close to expiry is replaced rather than served.
RENEW_MARGIN = timedelta(days=1)


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA (for clients) and the server certificate chain and key (for uvicorn) live."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def ensure_server_certificate(directory: Path, identities: tuple[str, ...] = DEFAULT_IDENTITIES) -> TlsFiles:
    """Return usable TLS files in ``directory``, creating them when missing, expired or mismatched."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE)
    if not _files_are_usable(files, identities):
        _write_new_files(files, identities)
    return files


def _write_new_files(files: TlsFiles, identities: tuple[str, ...]) -> None:
    ca = trustme.CA(organization_name="Postdesk sandbox (not Microsoft)")
    leaf = ca.issue_cert(*identities, organization_name="Postdesk sandbox (not Microsoft)")
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    _write_atomically(files.key_path, leaf.private_key_pem.bytes(), mode=0o600)
    _write_atomically(files.cert_path, chain, mode=0o644)
    _write_atomically(files.ca_path, ca.cert_pem.bytes(), mode=0o644)


def _write_atomically(path: Path, content: bytes, *, mode: int) -> None:
    # The key must never exist with wider permissions, not even for a moment, so the temporary
    # file is created with the final mode before anything is written into it.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _files_are_usable(files: TlsFiles, identities: tuple[str, ...]) -> bool:
    try:
        ca_cert = x509.load_pem_x509_certificate(files.ca_path.read_bytes())
        leaf = x509.load_pem_x509_certificates(files.cert_path.read_bytes())[0]
        key = serialization.load_pem_private_key(files.key_path.read_bytes(), password=None)
        leaf.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    if files.key_path.stat().st_mode & 0o077:
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fresh = all(cert.not_valid_after_utc > datetime.now(UTC) + RENEW_MARGIN for cert in (ca_cert, leaf))
    return same_key and fresh and _covers(leaf, identities)


def _covers(leaf: x509.Certificate, identities: tuple[str, ...]) -> bool:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    dns_names = set(names.get_values_for_type(x509.DNSName))
    addresses = {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    for identity in identities:
        try:
            if str(ipaddress.ip_address(identity)) not in addresses:
                return False
        except ValueError:
            if identity not in dns_names:
                return False
    return True
