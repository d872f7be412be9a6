"""Attachment filenames that are safe to show, store and offer for download on any operating system.

The name comes from the sender, so it is hostile until cleaned: a path (``../../etc/passwd``), a Windows
device name (``CON``), control characters or a right-to-left override that disguises ``exe`` as ``txt``.
RFC 2231 and RFC 2047 decoding has already been done by the ``email`` package when this runs.
"""

from __future__ import annotations

import re
import unicodedata

MAX_FILENAME_BYTES = 200
_LAST_RESORT = "attachment"
# Characters Windows refuses in a filename; replaced so a download never fails or changes meaning.
_FORBIDDEN = re.compile(r'[<>:"|?*]')
_WHITESPACE = re.compile(r"\s+")
# Device names stay special on Windows whatever the extension ("CON.txt" opens the console).
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{device}{digit}" for device in ("COM", "LPT") for digit in "0123456789¹²³"}
)
_MAX_EXTENSION_CHARS = 16


def safe_filename(name: str | None, *, fallback: str) -> str:
    """Return ``name`` cleaned for storage and download; ``fallback`` (also cleaned) if nothing is left.

    Never empty, at most 200 bytes of UTF-8, the extension kept when the name has to be shortened.
    """
    cleaned = _clean(name or "")
    if cleaned:
        return cleaned
    return _clean(fallback) or _LAST_RESORT


def _clean(name: str) -> str:
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(_replace_unsafe_character(character) for character in name)
    name = _WHITESPACE.sub(" ", name).strip(" .")
    if not name:
        return ""
    name = _avoid_reserved_name(name)
    return _shorten(name)


def _replace_unsafe_character(character: str) -> str:
    # Cc: control characters and NUL; Cf: bidi overrides and zero-width characters used to disguise
    # extensions; Cs: lone surrogates left by undecodable bytes, which cannot be stored as UTF-8.
    if unicodedata.category(character) in {"Cc", "Cf", "Cs"}:
        return " " if character in "\t\r\n" else ""
    return "_" if _FORBIDDEN.match(character) else character


def _avoid_reserved_name(name: str) -> str:
    stem = name.split(".", 1)[0].rstrip(" ")
    return f"_{name}" if stem.upper() in _WINDOWS_RESERVED else name


def _split_extension(name: str) -> tuple[str, str]:
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > _MAX_EXTENSION_CHARS or " " in extension:
        return name, ""
    return stem, f".{extension}"


def _shorten(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_FILENAME_BYTES:
        return name
    stem, extension = _split_extension(name)
    budget = MAX_FILENAME_BYTES - len(extension.encode("utf-8"))
    # Cutting the UTF-8 bytes and dropping a partial last character keeps whole characters only.
    stem = stem.encode("utf-8")[:budget].decode("utf-8", "ignore").rstrip(" .")
    return f"{stem}{extension}" if stem else extension.lstrip(".")
