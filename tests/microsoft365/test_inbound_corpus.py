"""Every corpus message delivered to a real Dovecot and fetched over IMAP XOAUTH2 ends as its table row says.

Each test connects a fresh sandbox mailbox, fetches once (which records where the folder stands), then
delivers the corpus file byte for byte and fetches again, so the mail is new mail, not backlog.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import select

from postdesk.db.models import (
    Article,
    Direction,
    InboundMessage,
    InboundStatus,
    Ticket,
    TicketCounter,
    TicketState,
)
from postdesk.db.session import transaction
from postdesk.ingest.fetch import FetchResult
from postdesk.mail import sanitise_html
from postdesk.runtime import Runtime
from postdesk.storage import read_bytes
from postdesk.tickets.service import NewArticle, create_ticket, get_or_create_customer
from tests.mail import CORPUS, corpus_bytes, parse_corpus
from tests.microsoft365.conftest import fetch, tickets
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

UNKNOWN_BOUNCE = "a delivery failure report for a message Postdesk does not know"
OWN_MAILBOX = "sent by one of Postdesk's own mailboxes and not part of a known ticket"


@dataclass(frozen=True)
class Expected:
    """A new ticket with this title and customer (and article flag), or quarantine for a reason."""

    title: str | None = None
    customer: str | None = None
    auto_generated: bool = False
    quarantined: str | None = None  # the start of the quarantine reason


EXPECTED = {
    # Apple Mail with two inline screenshots: an ordinary ticket.
    "apple-mail-inline-images.eml": Expected("Screenshots of the error", "renee.dubois@example.fr"),
    # A German out-of-office (subject prefix, no Auto-Submitted header): a ticket flagged automatic.
    "autoreply-german.eml": Expected(
        "Automatische Antwort: Drucker im 3. OG", "k.becker@example.de", auto_generated=True
    ),
    # Outlook's automatic reply naming a ticket number that does not exist here: a flagged new ticket.
    "autoreply-ooo.eml": Expected(
        "Automatic reply: [Ticket#10042] Printer on 3rd floor", "leeg@fabrikam.com", auto_generated=True
    ),
    # A Postfix DSN about a message Postdesk never sent (from this desk's point of view): quarantine.
    "bounce-dsn.eml": Expected(quarantined=UNKNOWN_BOUNCE),
    # Latin-1 bytes in a part declared UTF-8: repaired and a ticket.
    "broken-charset-declared-utf8-is-latin1.eml": Expected("Factura de marzo", "jose.garcia@example.es"),
    # An Exchange Online NDR about an unknown message: quarantine.
    "exchange-ndr.eml": Expected(quarantined=UNKNOWN_BOUNCE),
    # Attachment names with path separators, NULs and bidi overrides: a ticket with safe names.
    "filename-path-traversal.eml": Expected("Files", "mallory@example.net"),
    # A forward with the original attached as message/rfc822: a ticket with an .eml attachment.
    "forwarded-message-rfc822.eml": Expected("Fw: Suspicious invoice", "johannal@contoso.com"),
    # Phishing HTML full of script: a ticket whose HTML is kept raw and sanitised on display.
    "hostile-html.eml": Expected("Your account", "no-reply@phish.example"),
    # A compressed log attachment (small here; the size limit has its own tests): a ticket.
    "huge-attachment.eml": Expected("Log files from the build server", "diegos@contoso.com"),
    # ISO-2022-JP headers and body: a ticket with the decoded Japanese subject.
    "iso-2022-jp.eml": Expected("お問い合わせ：請求書の再発行", "taro.yamada@example.co.jp"),
    # A mailing list post (List-Id, Precedence: list): a ticket flagged automatic.
    "mailing-list.eml": Expected(
        "[it-announce] Maintenance window on Saturday", "announce@example.org", auto_generated=True
    ),
    # Forwards nested three deep: a ticket.
    "nested-multipart.eml": Expected("Fwd: Fwd: Fwd: the contract, again", "grady.archie@example.com"),
    # A web form's mail with no From at all: still a ticket (customer checked separately).
    "no-from.eml": Expected("Form submission from the website", None),
    # No Message-ID header: still a ticket.
    "no-message-id.eml": Expected("Scanner on 2nd floor jams", "nestor.wilke@example.com"),
    # Outlook HTML-only with an embedded image: a ticket.
    "outlook-html-only.eml": Expected("Laptop will not dock", "meganb@contoso.com"),
    # Outlook multipart/alternative: a ticket.
    "outlook-plain-and-html.eml": Expected("VPN client asks for password every hour", "adelev@contoso.com"),
    # A reply to messages Postdesk does not hold: a new ticket with the subject as written.
    "reply-chain.eml": Expected("Re: Re: AW: VPN drops every hour", "alexw@contoso.com"),
    # A reply naming ticket 10042, which does not exist in a fresh desk: a new ticket.
    "reply-with-ticket-number.eml": Expected("RE: [Ticket#10042] Printer", "meganb@contoso.com"),
    # RFC 2047 subject and names, and a Reply-To naming one person: the Reply-To is the customer.
    "rfc2047-subject-and-names.eml": Expected(
        "Änderung der Rechnungsadresse für Filiale Zürich", "ivan.petrov@example.ru"
    ),
    # 8-bit bytes with no charset declared: a ticket.
    "unknown-8bit.eml": Expected("Quote for 12 licences", "pat@example.net"),
    # Outlook's TNEF winmail.dat: a ticket with the .dat kept as an attachment.
    "winmail-dat.eml": Expected("Signed order form", "isaiahl@fabrikam.com"),
    # A zip attachment: a ticket.
    "zip-attachment.eml": Expected("Quarterly report (zipped)", "alexw@contoso.com"),
}
TICKET_FILES = sorted(name for name, expected in EXPECTED.items() if expected.quarantined is None)
WITH_ATTACHMENTS = [name for name in TICKET_FILES if parse_corpus(name).attachments]


def deliver_and_fetch(
    runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox: str, *raws: bytes
) -> FetchResult:
    dovecot.deliver_many(mailbox, raws)
    result = fetch(runtime, channel_id)
    assert result.fetched == len(raws)
    return result


def articles(runtime: Runtime) -> list[Article]:
    with runtime.sessions() as session:
        return list(session.scalars(select(Article).order_by(Article.id)))


def inbound_rows(runtime: Runtime) -> list[InboundMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def customer_of(runtime: Runtime, ticket_id: int) -> str:
    with runtime.sessions() as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        return ticket.customer.email


def test_every_corpus_file_has_a_row_in_the_table() -> None:
    assert sorted(path.name for path in CORPUS.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", TICKET_FILES)
def test_a_corpus_message_becomes_a_ticket_with_the_expected_title_customer_and_flag(
    name: str, m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    expected = EXPECTED[name]
    result = deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes(name))
    assert (result.processed.tickets, result.processed.quarantined) == (1, 0)
    [ticket] = tickets(m365_runtime)
    assert ticket.title == expected.title
    if expected.customer is not None:
        assert customer_of(m365_runtime, ticket.id) == expected.customer
    [article] = articles(m365_runtime)
    assert article.ticket_id == ticket.id
    assert article.direction is Direction.INBOUND
    assert article.auto_generated is expected.auto_generated
    assert article.body_text.startswith(parse_corpus(name).body_text[:20])
    [row] = inbound_rows(m365_runtime)
    assert (row.status, row.article_id) == (InboundStatus.PROCESSED, article.id)


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - set(TICKET_FILES)))
def test_a_bounce_about_a_message_postdesk_does_not_know_is_quarantined_with_a_reason(
    name: str, m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    result = deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes(name))
    assert (result.processed.tickets, result.processed.quarantined) == (0, 1)
    assert tickets(m365_runtime) == []
    [row] = inbound_rows(m365_runtime)
    assert row.status is InboundStatus.QUARANTINED
    assert (row.reason or "").startswith(EXPECTED[name].quarantined or "?")
    assert read_bytes(m365_runtime.settings.spool_dir, row.sha256) == corpus_bytes(name)


@pytest.mark.parametrize(
    ("name", "original_message_id"),
    [
        ("bounce-dsn.eml", "<ticket-10042-article-3@helpdesk.contoso.com>"),
        (
            "exchange-ndr.eml",
            "<DB9PR04MB84125B7C1D2E3F4A5B6C7D8E9F@DB9PR04MB8412.eurprd04.prod.outlook.com>",
        ),
    ],
)
def test_a_bounce_about_a_message_postdesk_sent_is_a_flagged_follow_up_on_that_ticket(
    name: str,
    original_message_id: str,
    m365_runtime: Runtime,
    channel_id: int,
    dovecot: DovecotServer,
    mailbox_user: str,
) -> None:
    with transaction(m365_runtime.sessions) as session:
        sent = create_ticket(
            session,
            title="Printer on 3rd floor",
            customer=get_or_create_customer(session, "no.such.user@example.net"),
            first_article=NewArticle(
                direction=Direction.OUTBOUND,
                body_text="Dear customer, the printer has been replaced.",
                subject="Printer on 3rd floor",
                message_id=original_message_id,
            ),
        )
        session.flush()
        ticket_id = sent.id
    result = deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes(name))
    assert (result.processed.follow_ups, result.processed.quarantined) == (1, 0)
    assert [t.id for t in tickets(m365_runtime)] == [ticket_id]
    _, bounce = articles(m365_runtime)
    assert bounce.ticket_id == ticket_id
    assert bounce.auto_generated


def test_a_reply_naming_an_existing_ticket_number_is_a_follow_up_on_that_ticket(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.add(TicketCounter(id=1, last_number=10041))  # a desk that has handed out 10041 numbers
    deliver_and_fetch(
        m365_runtime,
        channel_id,
        dovecot,
        mailbox_user,
        customer_mail(to=mailbox_user, subject="Printer", sender="Megan Bowen <MeganB@contoso.com>"),
    )
    [ticket] = tickets(m365_runtime)
    assert ticket.number == 10042
    result = deliver_and_fetch(
        m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes("reply-with-ticket-number.eml")
    )
    assert (result.processed.tickets, result.processed.follow_ups) == (0, 1)
    _, reply = articles(m365_runtime)
    assert reply.ticket_id == ticket.id
    assert reply.body_text.startswith("Thanks, the printer works again.")


def test_an_out_of_office_about_an_existing_ticket_is_a_flagged_follow_up_that_does_not_reopen_it(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.add(TicketCounter(id=1, last_number=10041))
    # Lee's own ticket: a ticket number in a subject lets in only people who took part in the ticket.
    question = customer_mail(to=mailbox_user, subject="Printer", sender="Lee Gu <LeeG@fabrikam.com>")
    deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, question)
    [ticket] = tickets(m365_runtime)
    with transaction(m365_runtime.sessions) as session:
        session.get(Ticket, ticket.id).state = TicketState.CLOSED  # type: ignore[union-attr]
    result = deliver_and_fetch(
        m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes("autoreply-ooo.eml")
    )
    assert result.processed.follow_ups == 1
    _, reply = articles(m365_runtime)
    assert (reply.ticket_id, reply.auto_generated) == (ticket.id, True)
    assert [t.state for t in tickets(m365_runtime)] == [TicketState.CLOSED]


def test_hostile_html_is_stored_as_sent_but_sanitises_to_markup_without_script(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes("hostile-html.eml"))
    [article] = articles(m365_runtime)
    assert article.body_html is not None and "<script>" in article.body_html
    shown = sanitise_html(article.body_html).lower()
    assert "Please verify your account." in sanitise_html(article.body_html)
    for dangerous in ("<script", "javascript:", "onload", "onerror", "<iframe", "<form", "<base"):
        assert dangerous not in shown, dangerous


@pytest.mark.parametrize("name", WITH_ATTACHMENTS)
def test_attachments_are_stored_with_safe_names_and_their_exact_bytes(
    name: str, m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes(name))
    parsed = parse_corpus(name).attachments
    [article] = articles(m365_runtime)
    with m365_runtime.sessions() as session:
        stored = list(session.get(Article, article.id).attachments)  # type: ignore[union-attr]
    assert [a.filename for a in stored] == [p.filename for p in parsed]
    for attachment, part in zip(stored, parsed, strict=True):
        assert attachment.filename.strip() and not attachment.filename.startswith(".")
        assert not any(bad in attachment.filename for bad in ("/", "\\", "\x00", "\r", "\n", "\u202e"))
        content = read_bytes(m365_runtime.settings.attachments_dir, attachment.sha256)
        assert content == part.content
        assert attachment.size == len(part.content)


def test_mail_without_a_from_header_gets_a_non_empty_customer_address(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, corpus_bytes("no-from.eml"))
    [ticket] = tickets(m365_runtime)
    assert "@" in customer_of(m365_runtime, ticket.id)


def _received(raw: bytes, hop: str) -> bytes:
    """The same message as it arrives along another path: one more Received header on top."""
    return f"Received: from {hop} by mx.contoso.com; Fri, 20 Mar 2026 13:37:05 +0000\r\n".encode() + raw


@pytest.mark.parametrize("together", [True, False], ids=["in-one-fetch", "in-two-fetches"])
def test_a_message_delivered_twice_with_the_same_message_id_is_one_article_and_one_duplicate(
    together: bool, m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    raw = corpus_bytes("outlook-plain-and-html.eml")
    copies = [_received(raw, "relay1.example.net"), _received(raw, "relay2.example.net")]
    if together:
        result = deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, *copies)
        assert (result.processed.tickets, result.processed.duplicates) == (1, 1)
    else:
        assert deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, copies[0]).processed.tickets
        result = deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, copies[1])
        assert (result.processed.tickets, result.processed.duplicates) == (0, 1)
    [article] = articles(m365_runtime)
    first, second = inbound_rows(m365_runtime)
    assert (first.status, first.article_id) == (InboundStatus.PROCESSED, article.id)
    assert (second.status, second.article_id) == (InboundStatus.DUPLICATE, article.id)


def test_the_identical_bytes_delivered_twice_become_one_article(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    raw = corpus_bytes("zip-attachment.eml")
    deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, raw, raw)
    assert len(articles(m365_runtime)) == 1
    assert [t.title for t in tickets(m365_runtime)] == ["Quarterly report (zipped)"]


def test_mail_from_a_connected_mailbox_address_is_quarantined_and_never_a_ticket(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    own = customer_mail(
        to=mailbox_user,
        subject="Forwarded by an inbox rule",
        sender=f"Help Desk <{mailbox_user.upper()}>",  # addresses compare without regard to case
    )
    result = deliver_and_fetch(m365_runtime, channel_id, dovecot, mailbox_user, own)
    assert (result.processed.tickets, result.processed.quarantined) == (0, 1)
    assert tickets(m365_runtime) == []
    [row] = inbound_rows(m365_runtime)
    assert row.status is InboundStatus.QUARANTINED
    assert (row.reason or "").startswith(OWN_MAILBOX)
