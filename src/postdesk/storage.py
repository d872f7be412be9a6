"""Content-addressed files on disk: raw mail in the spool, attachment bytes.

Layout: ``ROOT/ab/cd/abcd…`` named by SHA-256, so identical content is stored once. Files are only
ever created by write-fsync-rename and never modified, so the directories can live on shared storage
(NFS, a mounted volume) used by several workers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _path_for(root: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a SHA-256 hex digest")
    return root / sha256[:2] / sha256[2:4] / sha256


def store_bytes(root: Path, content: bytes) -> str:
    """Store ``content`` durably (fsync, then rename) and return its SHA-256 hex digest."""
    digest = hashlib.sha256(content).hexdigest()
    target = _path_for(root, digest)
    if target.exists():
        return digest
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return digest


def read_bytes(root: Path, sha256: str) -> bytes:
    return _path_for(root, sha256).read_bytes()
