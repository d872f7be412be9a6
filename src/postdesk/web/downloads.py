"""Content-Disposition for downloads: the real name for browsers, a plain ASCII fallback for the rest."""

from __future__ import annotations

from urllib.parse import quote


def content_disposition(filename: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in filename)
    return f"attachment; filename=\"{fallback or 'attachment'}\"; filename*=UTF-8''{quote(filename, safe='')}"
