"""Property-based tests of parsing and ingest on nasty MIME trees and mutated corpus messages (issue #9).

The messages come from the generators in ``tests/fuzz/fuzz_ingest.py`` (shared with the standalone
fuzzer), driven by hypothesis here so that a failure shrinks to a small example. The ingest properties
run the real step, spool and SQLite database included: whatever comes in ends as an article (or a
duplicate of one) or in quarantine with its exact bytes, and never in quarantine because a step crashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postdesk.mail import MailParseError, ParsedMail, parse_message
from postdesk.runtime import Runtime
from tests.fuzz.fuzz_ingest import IngestBench, corpus_messages, mutate, nasty_message, problems

T = TypeVar("T")
CORPUS_MESSAGES = corpus_messages()
PARSING = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Each example writes to the spool and the database: fewer of them, and the runtime fixture is shared
# by all of them on purpose (each example checks only the rows it added).
INGESTING = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class DrawChoices:
    """The generators' decisions, drawn from hypothesis so that failures shrink."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def pick(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))

    def number(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def blob(self, max_size: int) -> bytes:
        return self.draw(st.binary(max_size=max_size))


@st.composite
def nasty_messages(draw: st.DrawFn) -> bytes:
    return nasty_message(DrawChoices(draw))


@st.composite
def mutated_corpus_messages(draw: st.DrawFn) -> bytes:
    choose = DrawChoices(draw)
    return mutate(choose.pick(CORPUS_MESSAGES), choose)


def parsed_or_rejected(raw: bytes) -> ParsedMail | None:
    try:
        return parse_message(raw)
    except MailParseError:
        return None


@PARSING
@given(nasty_messages())
def test_parse_message_raises_nothing_but_mail_parse_error_on_nasty_mime_trees(raw: bytes) -> None:
    mail = parsed_or_rejected(raw)
    if mail is not None:
        for text in (mail.subject, mail.body_text, mail.body_html or "", mail.message_id or ""):
            text.encode("utf-8")  # no lone surrogates
            assert "\x00" not in text
        assert mail.message_id is None or len(mail.message_id) <= 998
        assert all(len(attachment.content_type) <= 255 for attachment in mail.attachments)
        assert all(len(address.email) <= 320 for address in (*mail.to, *mail.cc, *mail.reply_to))


@PARSING
@given(nasty_messages() | mutated_corpus_messages())
def test_parse_message_reads_the_same_bytes_the_same_way_every_time(raw: bytes) -> None:
    # Caches shared between messages must not make the outcome depend on what was parsed before.
    assert parsed_or_rejected(raw) == parsed_or_rejected(raw)


def test_a_message_nested_too_deeply_does_not_change_how_later_messages_are_read() -> None:
    # Regression (#9): header objects are cached across messages, and a Content-Type read hundreds of
    # levels deep, where the call stack runs out, was cached as unparseable for every later message.
    boundaries = [b"deep-%d" % level for level in range(1000)]
    body = b"hello"
    for boundary in boundaries:
        body = b"Content-Type: multipart/mixed; boundary=%s\r\n\r\n--%s\r\n%s\r\n--%s--" % (
            boundary, boundary, body, boundary
        )  # fmt: skip
    parse_message(b"From: p@example.com\r\nSubject: deep\r\n" + body)
    for boundary in boundaries:
        innocent = b"From: q@example.com\r\nContent-Type: multipart/mixed; boundary=%s\r\n\r\n" % boundary
        mail = parse_message(innocent + b"--%s\r\nContent-Type: text/plain\r\n\r\nhi\r\n--%s--\r\n" % (
            boundary, boundary
        ))  # fmt: skip
        assert (mail.body_text, mail.defects) == ("hi", ())


@pytest.fixture
def bench(runtime: Runtime) -> IngestBench:
    return IngestBench(runtime)


@INGESTING
@given(st.lists(nasty_messages(), min_size=1, max_size=4))
def test_every_nasty_message_ends_as_an_article_or_in_quarantine(
    bench: IngestBench, raws: list[bytes]
) -> None:
    # Several per example: a batch that fails is redone a message at a time, and that path must hold too.
    for ending in bench.ingest(raws):
        assert problems(ending) == []


@INGESTING
@given(st.lists(mutated_corpus_messages(), min_size=1, max_size=4))
def test_every_mutated_corpus_message_ends_as_an_article_or_in_quarantine(
    bench: IngestBench, raws: list[bytes]
) -> None:
    for ending in bench.ingest(raws):
        assert problems(ending) == []
