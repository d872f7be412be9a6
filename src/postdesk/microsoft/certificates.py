"""Certificate credentials for the app registration: Microsoft's recommended alternative to secrets.

Postdesk generates the key pair itself, keeps the private key encrypted at rest, and offers the public
certificate (.cer) for upload under Entra ID › App registrations › Certificates & secrets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

VALIDITY = timedelta(days=730)  # the longest Entra ID suggests for secrets; rotate like one


@dataclass(frozen=True)
class GeneratedCertificate:
    certificate_pem: str
    private_key_pem: str
    thumbprint: str  # SHA-1, upper-case hex, as the Azure portal shows it
    expires_at: datetime


def generate_certificate(common_name: str, *, now: datetime | None = None) -> GeneratedCertificate:
    now = now or datetime.now(UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .sign(key, hashes.SHA256())
    )
    return GeneratedCertificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii"),
        thumbprint=thumbprint_of(certificate),
        expires_at=certificate.not_valid_after_utc,
    )


def thumbprint_of(certificate: x509.Certificate) -> str:
    return (
        hashlib.sha1(certificate.public_bytes(serialization.Encoding.DER), usedforsecurity=False)
        .hexdigest()
        .upper()
    )


def load_certificate_and_key(pem: str) -> GeneratedCertificate:
    """Read an existing certificate plus its unencrypted private key from one PEM bundle."""
    certificate = x509.load_pem_x509_certificate(pem.encode("ascii"))
    key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(
            "the private key must be RSA (Entra ID accepts RSA certificates for client assertions)"
        )
    public = certificate.public_key()
    if (
        not isinstance(public, rsa.RSAPublicKey)
        or key.public_key().public_numbers() != public.public_numbers()
    ):
        raise ValueError("the private key does not belong to the certificate")
    return GeneratedCertificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii"),
        thumbprint=thumbprint_of(certificate),
        expires_at=certificate.not_valid_after_utc,
    )


def certificate_der(certificate_pem: str) -> bytes:
    return x509.load_pem_x509_certificate(certificate_pem.encode("ascii")).public_bytes(
        serialization.Encoding.DER
    )
