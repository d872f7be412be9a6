"""Content-addressed files on disk: raw mail in the spool, attachment bytes.

Layout: ``ROOT/ab/cd/abcd…`` named by SHA-256, so identical content is stored once. Files are only
ever created by write-fsync-rename and never modified, so the directories can live on shared storage
(NFS, a mounted volume) used by several workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

# fsync waits on the disk with the GIL released; running a batch's fsyncs side by side lets the file
# system serve them with far fewer journal commits than one after the other.
_FSYNC_THREADS = 16
_fsync_pool = ThreadPoolExecutor(max_workers=_FSYNC_THREADS, thread_name_prefix="postdesk-fsync")
_Item = TypeVar("_Item")


def _path_for(root: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("not a SHA-256 hex digest")
    return root / sha256[:2] / sha256[2:4] / sha256


def store_bytes(root: Path, content: bytes) -> str:
    """Store ``content`` durably (fsync, then rename) and return its SHA-256 hex digest."""
    return store_many(root, [content])[0]


def store_many(root: Path, contents: Sequence[bytes]) -> list[str]:
    """Store each of ``contents`` durably and return their SHA-256 hex digests, in order.

    The same guarantee as storing them one by one (each file is fsynced before it is renamed into
    place, and its directory is fsynced after the rename), with the waiting done together: all files
    are written, fsynced in parallel and renamed, then each directory touched is fsynced once.
    Paths are plain strings here: a batch is hundreds of files, and Path objects cost more than the
    system calls they wrap.
    """
    digests = [hashlib.sha256(content).hexdigest() for content in contents]
    base = os.fspath(root)
    missing: dict[str, bytes] = {}
    for digest, content in zip(digests, contents, strict=True):
        target = os.path.join(base, digest[:2], digest[2:4], digest)
        if target not in missing and not os.path.exists(target):
            missing[target] = content
    if not missing:
        return digests
    directories = list(dict.fromkeys(os.path.dirname(target) for target in missing))
    for directory in directories:
        os.makedirs(directory, exist_ok=True)
    written = _write_synced(missing)
    try:
        while written:
            target, temporary = written[-1]
            os.replace(temporary, target)
            written.pop()
    finally:
        for _, temporary in written:
            _unlink(temporary)
    _parallel(_fsync_directory, directories)
    return digests


def _write_synced(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """Write each content to a temporary file next to its target and fsync them all."""
    opened: list[tuple[str, int, str]] = []
    try:
        for target, content in files.items():
            fd, temporary = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".incoming-")
            opened.append((target, fd, temporary))
            _write_all(fd, content)
        _parallel(os.fsync, [fd for _, fd, _ in opened])
    except BaseException:
        for _, _, temporary in opened:
            _unlink(temporary)
        raise
    finally:
        for _, fd, _ in opened:
            os.close(fd)
    return [(target, temporary) for target, _, temporary in opened]


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parallel(function: Callable[[_Item], object], items: list[_Item]) -> None:
    """``function`` on every item, on up to ``_FSYNC_THREADS`` threads at once.

    One task per thread, each taking every n-th item: a task (and a future) per item cost more than
    the fsync it waits for.
    """
    if len(items) == 1:
        function(items[0])
        return
    shares = [items[start::_FSYNC_THREADS] for start in range(min(_FSYNC_THREADS, len(items)))]
    for _ in _fsync_pool.map(_each, [function] * len(shares), shares):
        pass  # map re-raises the first failure here


def _each(function: Callable[[_Item], object], items: list[_Item]) -> None:
    for item in items:
        function(item)


def read_bytes(root: Path, sha256: str) -> bytes:
    return _path_for(root, sha256).read_bytes()
