"""The expected outcome of every corpus file, as one table; a new .eml without a row fails the suite.

``huge-attachment.eml`` is small on purpose (test_message builds a 10 MB variant in memory), and the
gigantic-header case is generated in test_message rather than committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from postdesk.mail import classify
from tests.mail import CORPUS, parse_corpus

OWN = frozenset({"support@contoso.com"})


@dataclass(frozen=True)
class Expected:
    """What a file is about: who sent it, the start of its text, its attachments and its class."""

    sender: str | None
    text_starts: str
    attachments: tuple[str, ...] = ()
    has_html: bool = False
    flags: frozenset[str] = frozenset()  # of auto_reply, bulk, bounce: none for mail from a person
    repaired: bool = False  # at least one defect noted


AUTO_REPLY = frozenset({"auto_reply"})
# Bounces carry Auto-Submitted or a null Return-Path as well, so they are automatic mail too.
AUTOMATIC_BOUNCE = frozenset({"auto_reply", "bounce"})
EXPECTED = {
    "outlook-html-only.eml": Expected(
        "MeganB@contoso.com", "Hello,\n\nsince this morning", ("image001.png",), True
    ),
    "outlook-plain-and-html.eml": Expected("AdeleV@contoso.com", "Hi team,", (), True),
    "apple-mail-inline-images.eml": Expected(
        "renee.dubois@example.fr", "Bonjour,", ("Screenshot 1.png", "Screenshot 2.png"), True
    ),
    "winmail-dat.eml": Expected("IsaiahL@fabrikam.com", "Please find the signed", ("winmail.dat",)),
    "iso-2022-jp.eml": Expected("taro.yamada@example.co.jp", "サポートご担当者様"),
    "broken-charset-declared-utf8-is-latin1.eml": Expected("jose.garcia@example.es", "Hola,", repaired=True),
    "unknown-8bit.eml": Expected("pat@example.net", "Hello,\n\nthe “premium” tier", repaired=True),
    "rfc2047-subject-and-names.eml": Expected("Bjorn.Astrom@example.se", "Hej! Bitte"),
    "bounce-dsn.eml": Expected(
        "MAILER-DAEMON@mail.example.net",
        "This is the mail system",
        ("attachment-1.txt", "[Ticket#10042] Printer on 3rd floor.eml"),
        flags=AUTOMATIC_BOUNCE,
    ),
    "exchange-ndr.eml": Expected(
        "postmaster@contoso.onmicrosoft.com",
        "Your message to former.employee@fabrikam.com couldn't be delivered.",
        ("attachment-1.txt", "attachment-2.txt"),
        True,
        AUTOMATIC_BOUNCE,
    ),
    "autoreply-ooo.eml": Expected("LeeG@fabrikam.com", "I am out of the office", (), True, AUTO_REPLY),
    "autoreply-german.eml": Expected(
        "k.becker@example.de", "Vielen Dank für Ihre Nachricht.", flags=AUTO_REPLY
    ),
    "mailing-list.eml": Expected(
        "announce@example.org", "The mail relays will be restarted", flags=frozenset({"bulk"})
    ),
    "reply-chain.eml": Expected("AlexW@contoso.com", "It happened again"),
    "reply-with-ticket-number.eml": Expected("MeganB@contoso.com", "Thanks, the printer works again."),
    "huge-attachment.eml": Expected("DiegoS@contoso.com", "The logs are attached.", ("build.log.gz",)),
    "no-message-id.eml": Expected("nestor.wilke@example.com", "The scanner on the 2nd floor"),
    "no-from.eml": Expected(None, "Name: Pradeep Gupta"),
    "nested-multipart.eml": Expected(
        "grady.archie@example.com", "See the attached chain.", ("attachment-1.eml",), repaired=True
    ),
    "forwarded-message-rfc822.eml": Expected(
        "JohannaL@contoso.com", "Is this invoice genuine?", ("Invoice 2026-0311 overdue.eml",)
    ),
    "hostile-html.eml": Expected("no-reply@phish.example", "Please verify your account.", (), True),
    "filename-path-traversal.eml": Expected(
        "mallory@example.net",
        "Four files.",
        ("passwd", "evil.exe", "invoice .pdf.exe", "_CON.txt", "photogpj.exe"),
    ),
    "zip-attachment.eml": Expected("AlexW@contoso.com", "Zipped report attached.", ("report.zip",)),
}


def test_every_corpus_file_has_an_expected_outcome() -> None:
    assert sorted(path.name for path in CORPUS.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_corpus_file_parses_as_expected(name: str) -> None:
    expected = EXPECTED[name]
    mail = parse_corpus(name)
    assert (mail.sender.email if mail.sender else None) == expected.sender
    assert mail.body_text.startswith(expected.text_starts)
    assert tuple(attachment.filename for attachment in mail.attachments) == expected.attachments
    assert (mail.body_html is not None) == expected.has_html
    assert bool(mail.defects) == expected.repaired


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_corpus_file_is_classified_as_expected(name: str) -> None:
    result = classify(parse_corpus(name), own_addresses=OWN)
    flags = {"auto_reply": result.auto_reply, "bulk": result.bulk, "bounce": result.bounce}
    assert {flag for flag, raised in flags.items() if raised} == EXPECTED[name].flags
    assert not result.loop
