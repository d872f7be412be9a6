"""Log redaction: tokens, secrets and authorization codes never reach a log line.

Installed as a filter on every handler, so a library that logs a request body (MSAL, httpx) is covered
too. Email addresses are shortened (``a…@example.com``) unless the level is DEBUG, as Zulip does.
"""

from __future__ import annotations

import logging
import re

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # JWTs (access and id tokens): three base64url segments starting with a JSON header.
    (re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*"), "[jwt]"),
    (re.compile(r"(?i)\b(bearer)\s+[\w\-.~+/=]+"), r"\1 [redacted]"),
    # Postdesk's own API tokens (see security/api_tokens.py), wherever they appear.
    (re.compile(r"\bpd_[\w-]{20,}"), "pd_[redacted]"),
    (
        re.compile(
            r"(?i)\b(refresh_token|access_token|id_token|client_secret|client_assertion|code|"
            r"code_verifier|password|secret|token|auth=Bearer)([\"']?\s*[:=]\s*[\"']?)[^\s\"'&,}]+"
        ),
        r"\1\2[redacted]",
    ),
    # SASL XOAUTH2 initial responses are base64 of "user=…\x01auth=Bearer …".
    (re.compile(r"(?i)\b(AUTHENTICATE XOAUTH2|AUTH XOAUTH2)\s+\S+"), r"\1 [redacted]"),
)
_EMAIL = re.compile(r"\b([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})\b")


def redact(text: str, *, keep_addresses: bool = False) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if not keep_addresses:
        text = _EMAIL.sub(r"\1…@\2", text)
    return text


def redact_email_address(address: str) -> str:
    return _EMAIL.sub(r"\1…@\2", address)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message once, with its arguments merged in, before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message, keep_addresses=record.levelno <= logging.DEBUG)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Alembic announces every migration context at INFO; only its warnings matter to an operator.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLevelName(level)))
