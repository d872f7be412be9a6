"""Composing replies: headers a mail client threads on, one ticket reference, no header injection."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postdesk.mail.compose import (
    AddressError,
    OutgoingAttachment,
    OutgoingMail,
    check_address,
    compose,
    new_message_id,
    parse_recipients,
    references_for,
    reply_subject,
)

WHEN = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _mail(**changes: object) -> OutgoingMail:
    fields: dict[str, object] = {
        "sender_address": "support@contoso.com",
        "sender_name": "Contoso Support",
        "to": ("anna@example.org",),
        "cc": (),
        "subject": "Re: [Ticket#10001] Printer",
        "body_text": "Hello Anna,\nfixed.",
        "message_id": "<reply-1@contoso.com>",
        "date": WHEN,
    }
    fields.update(changes)
    return OutgoingMail(**fields)  # type: ignore[arg-type]


def _parsed(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_it_writes_the_headers_a_mail_client_threads_on() -> None:
    raw = compose(
        _mail(in_reply_to="<orig@example.org>", references=("<first@example.org>", "<orig@example.org>"))
    )
    message = _parsed(raw)
    assert message["From"] == "Contoso Support <support@contoso.com>"
    assert message["To"] == "anna@example.org"
    assert message["Message-ID"] == "<reply-1@contoso.com>"
    assert message["In-Reply-To"] == "<orig@example.org>"
    assert message["References"] == "<first@example.org> <orig@example.org>"
    assert message["Auto-Submitted"] is None  # an agent's reply is not automatic mail
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_automatic_mail_says_so() -> None:
    assert _parsed(compose(_mail(auto_submitted="auto-replied")))["Auto-Submitted"] == "auto-replied"


def test_attachments_keep_their_names_and_bytes() -> None:
    payload = bytes(range(256)) * 10
    message = _parsed(
        compose(_mail(attachments=(OutgoingAttachment("Rechnung März.pdf", payload, "application/pdf"),)))
    )
    [part] = list(message.iter_attachments())
    assert part.get_filename() == "Rechnung März.pdf"
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == payload


@pytest.mark.parametrize(
    "field",
    ["sender_name", "subject"],
)
def test_a_line_break_in_a_field_never_becomes_a_header(field: str) -> None:
    raw = compose(_mail(**{field: "Hi\r\nBcc: victim@example.net\nX-Evil: 1"}))
    message = _parsed(raw)
    assert message["Bcc"] is None
    assert message["X-Evil"] is None


@given(st.text(max_size=200))
def test_no_subject_or_name_can_add_a_header(text: str) -> None:
    message = _parsed(compose(_mail(subject=text, sender_name=text)))
    assert sorted(set(message.keys())) == sorted(
        {
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "MIME-Version",
            "Content-Type",
            "Content-Transfer-Encoding",
        }
    )


def test_recipients_are_read_as_people_type_them() -> None:
    assert parse_recipients(
        'Anna <anna@Example.ORG>; bob@example.com\n"Doe, Jo" <jo@x.io>, anna@example.org'
    ) == (
        "anna@example.org",
        "bob@example.com",
        "jo@x.io",
    )
    assert parse_recipients(" , ; ") == ()


@pytest.mark.parametrize("typed", ["nope", "a@b", "a b@c.de", "<>", "anna@example.org\x00"])
def test_a_recipient_that_is_not_an_address_is_refused_by_name(typed: str) -> None:
    with pytest.raises(AddressError):
        parse_recipients(typed)


def test_an_address_with_a_line_break_is_refused() -> None:
    with pytest.raises(AddressError):
        check_address("anna@example.org\r\nBcc: x@y.z")


def test_the_ticket_reference_is_added_once() -> None:
    assert reply_subject("Printer broken", 10001, prefix="Ticket#") == "Re: [Ticket#10001] Printer broken"
    assert (
        reply_subject("RE: AW: [Ticket#10001] Printer", 10001, prefix="Ticket#")
        == "Re: [Ticket#10001] Printer"
    )
    assert reply_subject("Printer", 10001, prefix="Ticket#", forward=True) == "Fwd: [Ticket#10001] Printer"
    assert reply_subject("", 7, prefix="Case#") == "Re: [Case#7] (no subject)"


def test_references_keep_the_first_and_the_newest() -> None:
    chain = " ".join(f"<m{n}@x>" for n in range(40))
    references = references_for("<parent@x>", chain)
    assert len(references) == 20
    assert references[0] == "<m0@x>" and references[-1] == "<parent@x>"
    assert references_for("<p@x>", None) == ("<p@x>",)


def test_message_ids_are_unique_and_in_the_mailbox_domain() -> None:
    ids = {new_message_id("Support@Contoso.COM") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(mid.endswith("@contoso.com>") and mid.startswith("<") for mid in ids)
