"""The few header fields the fetch loop records on an inbound row, read without a full parse.

Only the header section is parsed (by the stdlib's HeaderParser), so a 25 MB message costs no more than
a small one; the full parse happens later, in the pipeline.
"""

from __future__ import annotations

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
        message = BytesHeaderParser(policy=default).parsebytes(head)
        message_id = str(message.get("Message-ID", "") or "").strip() or None
        subject = str(message.get("Subject", "") or "")
        sender = str(message.get("From", "") or "")
    except Exception:
        return SummaryHeaders(None, "", "")
    return SummaryHeaders(message_id[:998] if message_id else None, subject[:500], sender[:500])
