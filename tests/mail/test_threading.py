"""Threading helpers: ticket numbers, reply prefixes, message ids to look a thread up by."""

from __future__ import annotations

import pytest

from postdesk.mail import (
    add_ticket_reference,
    strip_reply_prefixes,
    thread_message_ids,
    ticket_numbers_in_subject,
)
from tests.mail import parse_corpus


def test_it_finds_the_ticket_number_in_a_reply_subject() -> None:
    assert ticket_numbers_in_subject(parse_corpus("reply-with-ticket-number.eml").subject) == (10042,)


@pytest.mark.parametrize(
    "subject", ["[ticket#10042]", "[ Ticket # 10042 ]", "[TICKET#10042 ]", "x [Ticket #10042]"]
)
def test_it_is_tolerant_of_case_and_spaces(subject: str) -> None:
    assert ticket_numbers_in_subject(subject) == (10042,)


def test_it_finds_several_ticket_numbers_in_order_once_each() -> None:
    assert ticket_numbers_in_subject("[Ticket#7] [Ticket#10042] [Ticket#7]") == (7, 10042)


def test_it_ignores_numbers_without_brackets_or_prefix() -> None:
    assert ticket_numbers_in_subject("Ticket#10042 and [10042] and [Case#10042]") == ()


def test_it_supports_another_prefix() -> None:
    assert ticket_numbers_in_subject("[Case-No. 55] Printer", prefix="Case-No.") == (55,)


def test_it_adds_the_ticket_reference_after_reply_prefixes() -> None:
    assert add_ticket_reference("RE: AW: Printer", 10042) == "RE: AW: [Ticket#10042] Printer"


def test_it_adds_the_ticket_reference_to_a_subject_without_prefix() -> None:
    assert add_ticket_reference("Printer", 10042) == "[Ticket#10042] Printer"


def test_it_never_duplicates_the_ticket_reference() -> None:
    assert add_ticket_reference("RE: [Ticket#10042] Printer", 10042) == "RE: [Ticket#10042] Printer"
    assert add_ticket_reference("AW: [ ticket # 10042 ] Drucker", 10042) == "AW: [ ticket # 10042 ] Drucker"


def test_it_adds_a_reference_to_an_empty_subject() -> None:
    assert add_ticket_reference("", 5) == "[Ticket#5]"


@pytest.mark.parametrize(
    ("subject", "stripped"),
    [
        ("Re: Printer", "Printer"),
        ("RE: Fwd: FW: AW: WG: SV: VS: Antw: TR: RV: Printer", "Printer"),
        ("Re[2]: Re(3): Re^4: Printer", "Printer"),
        ("回复：转发: 打印机", "打印机"),
        ("  re :   Printer  ", "Printer"),
        ("Reply needed", "Reply needed"),
        ("Re: [Ticket#1] Re: x", "[Ticket#1] Re: x"),
    ],
)
def test_it_strips_reply_prefixes(subject: str, stripped: str) -> None:
    assert strip_reply_prefixes(subject) == stripped


@pytest.mark.timeout(60)  # a guard against quadratic behaviour hanging the suite, not a speed target
def test_it_strips_thousands_of_prefixes_without_hanging() -> None:
    assert strip_reply_prefixes("Re: " * 20_000 + "x") == "x"
    assert strip_reply_prefixes(" " * 100_000 + "Re") == "Re"


def test_it_returns_in_reply_to_first_then_references_newest_first() -> None:
    assert thread_message_ids(parse_corpus("reply-chain.eml")) == (
        "<reply-2-3b4c5d6e@helpdesk.contoso.com>",
        "<reply-1-2a3b4c5d@example.com>",
        "<root-1a2b3c4d@contoso.com>",
    )


def test_it_returns_no_thread_ids_for_a_new_conversation() -> None:
    assert thread_message_ids(parse_corpus("no-message-id.eml")) == ()
