"""The few header fields an inbound row shows (Message-ID, subject, sender), read without a full parse.

For mail the pipeline does not parse: over the size limit, unreadable, or broken by a bug. (Parsed mail
gets them from its one full parse.) Only the header section is read (by the stdlib's HeaderParser), so a
25 MB message costs no more than a small one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import default

_HEADER_LIMIT = 256 * 1024


@dataclass(frozen=True)
class SummaryHeaders:
    message_id: str | None
    subject: str
    sender: str


def summary_headers(raw: bytes) -> SummaryHeaders:
    end = raw.find(b"\r\n\r\n", 0, _HEADER_LIMIT)
    head = raw[: end if end >= 0 else _HEADER_LIMIT]
    try:
        fields = BytesHeaderParser(policy=default).parsebytes(head).raw_items()
        first: dict[str, tuple[str, str]] = {}
        for name, value in fields:
            first.setdefault(name.lower(), (name, value))
        message_id = _decoded(first.get("message-id")).strip() or None
        subject = _decoded(first.get("subject"))
        sender = _decoded(first.get("from"))
    except Exception:
        return SummaryHeaders(None, "", "")
    return SummaryHeaders(message_id[:998] if message_id else None, subject[:500], sender[:500])


def _decoded(field: tuple[str, str] | None) -> str:
    """What ``str(message.get(name))`` gives for the first such field (``""`` when there is none)."""
    if field is None:
        return ""
    name, value = field
    if len(value) > _CACHED_VALUE_CHARS:
        return str(default.header_fetch_parse(name, value) or "")
    return _cached_decoded(name, value)


# Senders recur from message to message and their address header is the slowest to parse; the result
# depends only on the field, so it is kept.
_CACHED_VALUE_CHARS = 1024


@functools.lru_cache(maxsize=4096)
def _cached_decoded(name: str, value: str) -> str:
    return str(default.header_fetch_parse(name, value) or "")
