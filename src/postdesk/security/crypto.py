"""Authenticated encryption of secrets at rest (client secrets, token caches, private keys).

Values are sealed with AES-256-GCM under a key derived (HKDF-SHA256) from the master key, which comes
from ``POSTDESK_SECRET_KEY`` or is generated once into ``DATA_DIR/secret.key`` (mode 0600). Each value
is bound to its *purpose* (the column it lives in) as associated data, so a ciphertext copied from one
column into another does not decrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_PREFIX = "pd1:"
KEY_FILE_NAME = "secret.key"
_NONCE_BYTES = 12


class SecretError(Exception):
    """A stored secret cannot be decrypted: wrong POSTDESK_SECRET_KEY, or the value was tampered with."""


def _derive(master_key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(master_key)


class SecretBox:
    """Seals and opens secrets; also the source of keys for signing (CSRF tokens)."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) < 32:
            raise ValueError("the master key must be at least 32 bytes")
        self._aead = AESGCM(_derive(master_key, b"postdesk/secrets-at-rest/v1"))
        self._signing_key = _derive(master_key, b"postdesk/signing/v1")
        # Lets an operator check which key a data dir was written with, without revealing it.
        self.fingerprint = hashlib.sha256(_derive(master_key, b"postdesk/fingerprint/v1")).hexdigest()[:16]

    def encrypt(self, plaintext: str, *, purpose: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode("utf-8"), purpose.encode("utf-8"))
        return FORMAT_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, token: str, *, purpose: str) -> str:
        if not token.startswith(FORMAT_PREFIX):
            raise SecretError(f"stored {purpose} is not in Postdesk's encrypted format")
        try:
            raw = base64.urlsafe_b64decode(token[len(FORMAT_PREFIX) :])
            opened = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], purpose.encode("utf-8"))
        except (InvalidTag, ValueError) as exc:
            raise SecretError(
                f"cannot decrypt the stored {purpose}: POSTDESK_SECRET_KEY differs from the key it was "
                "written with, or the value was altered"
            ) from exc
        return opened.decode("utf-8")

    def sign(self, message: str) -> str:
        digest = hmac.new(self._signing_key, message.encode("utf-8"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def verify(self, message: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(message), signature)


def load_or_create_master_key(*, configured: str | None, data_dir: Path) -> bytes:
    """The configured key, else the one generated into the data dir on first run (mode 0600)."""
    if configured:
        return configured.encode("utf-8")
    path = data_dir / KEY_FILE_NAME
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_urlsafe(48) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return _read_key_file(path)


def _read_key_file(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        # Anyone who can read this file can read every mailbox token: refuse loudly rather than run.
        raise SecretError(f"{path} is readable by other users; run: chmod 600 {path}")
    key = path.read_text(encoding="ascii").strip()
    if len(key) < 32:
        raise SecretError(f"{path} does not hold a usable key (too short)")
    return key.encode("ascii")


_installed: SecretBox | None = None


def install_secret_box(box: SecretBox) -> None:
    """Make ``box`` the one the encrypted column type uses (called once at start-up)."""
    global _installed  # noqa: PLW0603 - a process-wide key, like the settings themselves
    _installed = box


def secret_box() -> SecretBox:
    if _installed is None:
        raise RuntimeError("no SecretBox installed; call postdesk.runtime.bootstrap() first")
    return _installed
