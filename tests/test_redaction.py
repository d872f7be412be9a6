"""Tokens, secrets and codes never reach a log line."""

from __future__ import annotations

import logging
import sys

import pytest

from postdesk.security.redact import RedactingFilter, redact

JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlLmNvbSJ9.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "line",
    [
        f"Authorization: Bearer {JWT}",
        f"token response {{'access_token': '{JWT}', 'expires_in': 3599}}",
        "refresh_token=0.AXoA-secret-refresh&client_id=abc",
        "client_secret=Abc8Q~supersecretvalue",
        '{"refresh_token": "1.AQoA-rotated-token"}',
        "GET /callback?code=0.AXoAauthcode&state=xyz",
        "C: a1 AUTHENTICATE XOAUTH2 dXNlcj1hQGIuY29tAWF1dGg9QmVhcmVyIGV5SjAuLi4BAQ==",
    ],
)
def test_it_removes_secrets_from_log_lines(line: str) -> None:
    cleaned = redact(line)
    for secret in (
        JWT,
        "0.AXoA-secret-refresh",
        "Abc8Q~supersecretvalue",
        "1.AQoA-rotated-token",
        "0.AXoAauthcode",
        "dXNlcj1hQGIuY29tAWF1dGg9QmVhcmVyIGV5SjAuLi4BAQ==",
    ):
        assert secret not in cleaned


def test_it_shortens_addresses_except_at_debug_level() -> None:
    assert redact("mail from jana.novak@example.org") == "mail from j…@example.org"
    assert (
        redact("mail from jana.novak@example.org", keep_addresses=True) == "mail from jana.novak@example.org"
    )


def test_the_filter_redacts_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("postdesk.test")
    handler_filter = RedactingFilter()
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        record = logger.makeRecord(
            "postdesk.test",
            logging.ERROR,
            __file__,
            1,
            "refresh failed: %s",
            (f"refresh_token={JWT}",),
            exc_info=sys.exc_info(),
        )
    handler_filter.filter(record)
    assert JWT not in record.getMessage()
    assert record.exc_text is not None
    assert JWT not in record.exc_text
