"""Hostile mail through the real ingest step, and what the agent then sees of it (issue #9).

Each message is stored and processed as fetched mail is (spool, pipeline, SQLite), then looked at the way
an agent does: the ticket page, the sandboxed frame that shows the mail's HTML, and attachment downloads.
The committed cases live in ``corpus/hostile/`` (outside the tables of test_corpus.py); the gigantic
ones are built here. A few run on PostgreSQL too, which refuses values SQLite takes without a word.
"""

from __future__ import annotations

import base64
import io
import re
import time
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from postdesk.db.models import (
    Article,
    Channel,
    InboundMessage,
    InboundStatus,
    Ticket,
    TicketState,
    User,
)
from postdesk.ingest import process
from postdesk.ingest.pipeline import Inbound
from postdesk.ingest.quarantine import reprocess
from postdesk.mail import parse_message
from postdesk.runtime import Runtime
from postdesk.storage import read_bytes
from postdesk.tickets.service import NewArticle
from tests.conftest import ADMIN_PASSWORD, sign_in
from tests.fuzz.fuzz_ingest import Ending, IngestBench, problems
from tests.mail import CORPUS

HOSTILE = CORPUS / "hostile"
DESK = "support@contoso.com"
FIRST_TICKET = 10001


def hostile_bytes(name: str) -> bytes:
    return (HOSTILE / name).read_bytes()


@pytest.fixture
def bench(runtime: Runtime) -> IngestBench:
    return IngestBench(runtime, email=DESK)


@pytest.fixture
def agent(client: TestClient, admin: User) -> TestClient:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    return client


def ingest(bench: IngestBench, raw: bytes) -> Ending:
    """Store and process one message; it must end as an article or in quarantine, never by a crash."""
    [ending] = bench.ingest([raw])
    assert problems(ending) == []
    return ending


def article_of(runtime: Runtime, ending: Ending) -> Article:
    assert ending.status is InboundStatus.PROCESSED, ending.reason
    with runtime.sessions() as session:
        article = session.scalars(select(Article).where(Article.id == ending.article_id)).one()
        article.ticket.customer  # noqa: B018  (loaded while the session is open)
        list(article.attachments)
        session.expunge_all()
        return article


def ticket_page(agent: TestClient, article: Article) -> str:
    response = agent.get(f"/tickets/{article.ticket.number}")
    assert response.status_code == 200
    page: str = response.text
    return page


def mail_frame(agent: TestClient, article: Article, *, images: bool = False) -> tuple[str, dict[str, str]]:
    """The sandboxed document that shows the article's HTML: its text and its Content-Security-Policy."""
    url = f"/tickets/{article.ticket.number}/articles/{article.id}/body" + ("?images=1" if images else "")
    assert f'src="{url}"' in ticket_page(agent, article) or images
    response = agent.get(url)
    assert response.status_code == 200
    policy = {
        directive.split()[0]: " ".join(directive.split()[1:])
        for directive in response.headers["content-security-policy"].split(";")
        if directive.strip()
    }
    return response.text, policy


def body_of(frame: str) -> str:
    return frame.split("<body>", 1)[1]


_EVENT_HANDLER = re.compile(r"<[^>]*\son[a-z]+\s*=", re.IGNORECASE)


def assert_inert(frame: str) -> None:
    """Nothing in the mail's part of the frame can run, load a document, submit or redirect."""
    mail = body_of(frame).lower()
    for markup in ("<script", "<iframe", "<object", "<embed", "<form", "<meta", "<base", "<link", "<svg"):
        assert markup not in mail
    for words in ("javascript:", "vbscript:", "data:text", "data:image/svg", "srcdoc", "formaction"):
        assert words not in mail
    assert not _EVENT_HANDLER.search(mail)


# --- script, CSS, links, SVG, remote images --------------------------------------------------------


def test_script_and_event_handlers_never_reach_the_agents_browser(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    article = article_of(runtime, ingest(bench, hostile_bytes("script-and-event-handlers.eml")))
    page = ticket_page(agent, article)
    for markup in ("steal()", "<b>today</b>", "phish.example/kit.js"):
        assert markup not in page  # the mail's HTML is only ever in the frame
    frame, policy = mail_frame(agent, article)
    assert_inert(frame)
    assert "steal()" not in frame
    assert "Your password expires <b>today</b>." in frame
    assert "Regards, IT" in frame
    assert policy["default-src"] == "'none'"
    assert "script-src" not in policy
    assert article.body_text.startswith("Your password expires today.")


def test_css_tricks_are_reduced_to_harmless_formatting(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    article = article_of(runtime, ingest(bench, hostile_bytes("css-tricks.eml")))
    frame, policy = mail_frame(agent, article)
    mail = body_of(frame)
    styles = " ".join(re.findall(r'style="([^"]*)"', mail))
    for trick in ("position", "z-index", "fixed", "expression", "url", "behavior", "binding", "\\"):
        assert trick not in styles
    assert "@import" not in mail
    assert "<style" not in mail and "<link" not in mail
    assert "lookalike.example" not in mail  # no style sheet, background or pixel from the sender
    # The overlay's words are still there, as ordinary text in the flow of the message.
    assert '<div style="width:100%;height:100%;background-color:white">Your session expired.' in mail
    assert '<p style="color:red">The invoice is attached.</p>' in mail
    assert policy["img-src"] == "data:"
    assert policy["style-src"] == "'unsafe-inline'"  # style attributes only: no sheet can load


def test_javascript_and_data_links_keep_their_text_but_lose_their_target(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    article = article_of(runtime, ingest(bench, hostile_bytes("javascript-and-data-links.eml")))
    frame, _ = mail_frame(agent, article)
    assert_inert(frame)
    mail = body_of(frame)
    for text in (
        "plain",
        "mixed case",
        "tab entity",
        "decimal entities",
        "data html",
        "data svg",
        "cid link",
    ):
        assert f">{text}</a>" in mail
    assert re.findall(r'href="([^"]*)"', mail) == ["https://contoso.com/help"]
    assert "data:" not in mail and "cid:" not in mail
    for link in re.findall(r"<a [^>]*>", mail):
        assert 'target="_blank"' in link and 'rel="noopener noreferrer nofollow"' in link


def test_svg_never_runs_inline_in_the_mail_or_from_postdesks_origin_as_an_attachment(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    raw = hostile_bytes("svg-inline-and-attached.eml")
    article = article_of(runtime, ingest(bench, raw))
    frame, _ = mail_frame(agent, article)
    assert_inert(frame)
    assert "alert(" not in frame
    assert '<img alt="data svg">' in body_of(frame)  # the data: SVG image lost its source
    files = {attachment.filename: attachment for attachment in article.attachments}
    assert sorted(files) == ["chart.svg", "image-1.svg"]
    assert files["image-1.svg"].inline and not files["chart.svg"].inline
    page = ticket_page(agent, article)
    assert f'href="/attachments/{files["chart.svg"].id}" download>chart.svg</a>' in page
    assert f"/attachments/{files['image-1.svg'].id}" not in page  # inline parts are not listed
    svg = parse_message(raw).attachments[1].content
    for attachment in files.values():
        download = agent.get(f"/attachments/{attachment.id}")
        assert download.status_code == 200
        # Never image/svg+xml, never inline: a browser must not render it as a page of our origin.
        assert download.headers["content-type"] == "application/octet-stream"
        assert download.headers["content-disposition"].startswith("attachment;")
        assert download.headers["x-content-type-options"] == "nosniff"
        assert download.content == svg  # kept as sent, script and all: it is evidence


def test_remote_images_are_not_loaded_until_the_agent_asks(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    article = article_of(runtime, ingest(bench, hostile_bytes("remote-images-tracking.eml")))
    assert "Remote images are blocked" in ticket_page(agent, article)
    blocked, policy = mail_frame(agent, article)
    mail = body_of(blocked)
    assert not re.search(r'\ssrc="(?:https?:)?//', mail)  # the browser fetches nothing from the sender
    assert not re.search(r"srcset|background=|poster=|<video|<input|<source", mail)
    assert 'data-remote-src="https://tracker.shop.example/open.gif?u=42"' in mail
    assert policy["img-src"] == "data:"  # and the frame's policy would block any that slipped through
    shown, policy = mail_frame(agent, article, images=True)
    assert '<img src="https://tracker.shop.example/open.gif?u=42"' in body_of(shown)
    assert policy["img-src"] == "data: https:"  # plain http stays blocked even then
    # What never was an <img src> does not come back when images are allowed.
    for tracker in (
        "protocol-relative",
        "srcset.gif",
        "source.gif",
        "table.gif",
        "td.gif",
        "poster",
        "input",
    ):
        assert tracker not in shown


# --- filenames and NUL bytes -------------------------------------------------------------------------


def test_hostile_attachment_filenames_become_plain_names(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    article = article_of(runtime, ingest(bench, hostile_bytes("hostile-filenames.eml")))
    names = [attachment.filename for attachment in article.attachments]
    assert names == [
        "authorized_keys",  # ../../../../home/postdesk/.ssh/authorized_keys
        "boot.ini",  # ..\..\boot.ini
        "attachment-3.bin",  # ".." leaves nothing
        "report.pdf.exe",  # NULs removed: the real extension shows
        "a" * 196 + ".pdf",  # 300 characters shortened to 200 bytes, extension kept
        "invoicefdp.scr",  # the right-to-left override that showed "invoicercs.pdf" is gone
        "zerowidth.txt",
        "html",  # a folded name that tried to smuggle in a header line
        "htaccess",  # no hidden dot-files
    ]
    for attachment in article.attachments:
        assert not any(unicodedata.category(c) in {"Cc", "Cf"} for c in attachment.filename)
        disposition = agent.get(f"/attachments/{attachment.id}").headers["content-disposition"]
        assert "\r" not in disposition and "\n" not in disposition
        assert unquote(disposition.split("filename*=UTF-8''", 1)[1]) == attachment.filename


def test_nul_bytes_are_removed_from_what_the_agent_reads_and_kept_in_the_stored_bytes(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    raw = hostile_bytes("nul-bytes.eml")
    ending = ingest(bench, raw)
    article = article_of(runtime, ending)
    assert article.ticket.title == "Printer jammed"
    assert article.body_text == "The printer jammed again."
    assert article.sender == "Nul Person <nul.person@example.org>"
    assert "\x00" not in (article.body_html or "x\x00")
    [attachment] = article.attachments
    assert attachment.filename == "log.txt"
    # The attachment is the sender's bytes, NUL included; only text meant for reading is cleaned.
    assert read_bytes(runtime.settings.attachments_dir, attachment.sha256) == b"binary\x00content"
    assert ending.spooled == raw
    assert "Printer jammed" in ticket_page(agent, article)


# --- gigantic and deeply nested mail -----------------------------------------------------------------


def nested(levels: int, *, kind: str) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\nthe innermost part"
    for level in range(levels):
        if kind == "message":
            body = b"Content-Type: message/rfc822\r\n\r\nSubject: level %d\r\n%s" % (level, body)
        else:
            boundary = b"level-%d" % level if kind == "multipart" else b"same"
            body = b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n--%s\r\n%s\r\n--%s--\r\n' % (
                boundary, boundary, body, boundary
            )  # fmt: skip
    return (
        b"From: Deep Diver <deep@example.org>\r\nSubject: Deep\r\nMessage-ID: <deep@example.org>\r\n" + body
    )


@pytest.mark.parametrize("kind", ["multipart", "message", "same-boundary"])
@pytest.mark.timeout(120)  # a guard against a hang, not a speed target
def test_a_thousand_levels_of_nesting_end_in_a_ticket_in_bounded_time(
    bench: IngestBench, runtime: Runtime, kind: str
) -> None:
    started = time.monotonic()
    article = article_of(runtime, ingest(bench, nested(1000, kind=kind)))
    assert time.monotonic() - started < 60
    assert article.ticket.title == "Deep"
    assert article.sender == "Deep Diver <deep@example.org>"


@pytest.mark.timeout(120)
def test_a_one_megabyte_subject_becomes_a_ticket_with_a_shortened_title(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    raw = b"From: a@example.org\r\nSubject: " + b"Printer " * 131_072 + b"\r\n\r\nThe printer again."
    started = time.monotonic()
    article = article_of(runtime, ingest(bench, raw))
    assert time.monotonic() - started < 30
    assert len(raw) > 1_000_000
    assert len(article.subject) <= 64 * 1024
    assert len(article.ticket.title) <= 998 and article.ticket.title.startswith("Printer Printer")
    assert article.body_text == "The printer again."
    assert ticket_page(agent, article).count("Printer") < 5000  # the page shows the short title


@pytest.mark.timeout(120)
def test_ten_thousand_header_fields_end_in_a_ticket_in_bounded_time(
    bench: IngestBench, runtime: Runtime
) -> None:
    fields = b"".join(b"X-Filler-%d: value %d\r\n" % (n, n) for n in range(10_000))
    received = b"".join(
        b"Received: from relay%d.example by mx.example; Mon, 30 Mar 2026\r\n" % n for n in range(5000)
    )
    raw = b"From: many@example.org\r\nSubject: Many headers\r\n" + fields + received + b"\r\nBody."
    started = time.monotonic()
    article = article_of(runtime, ingest(bench, raw))
    assert time.monotonic() - started < 30
    assert (article.ticket.title, article.body_text) == ("Many headers", "Body.")


# --- zip bombs ---------------------------------------------------------------------------------------


def compressed_zeros(megabytes: int) -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as bomb:
        bomb.writestr("zeros.bin", bytes(megabytes * 1024 * 1024))
    return archive.getvalue()


def with_attachment(filename: str, content_type: str, content: bytes) -> bytes:
    encoded = base64.encodebytes(content).replace(b"\n", b"\r\n")
    return (
        b"From: Zed <zed@example.org>\r\nSubject: Logs\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="z"\r\n\r\n'
        b"--z\r\nContent-Type: text/plain\r\n\r\nLogs attached.\r\n"
        b"--z\r\nContent-Type: %s\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="%s"\r\n\r\n%s--z--\r\n'
    ) % (content_type.encode(), filename.encode(), encoded)


def directory_size(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


@pytest.mark.timeout(120)
def test_a_zip_bomb_is_stored_as_sent_and_never_unpacked(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    bomb = compressed_zeros(200)  # 200 MB of zeros in about 200 KB
    article = article_of(runtime, ingest(bench, with_attachment("logs.zip", "application/zip", bomb)))
    [attachment] = article.attachments
    assert (attachment.filename, attachment.content_type) == ("logs.zip", "application/zip")
    assert attachment.size == len(bomb)
    assert read_bytes(runtime.settings.attachments_dir, attachment.sha256) == bomb
    assert directory_size(runtime.settings.attachments_dir) < 2 * len(bomb)  # nothing was expanded
    assert agent.get(f"/attachments/{attachment.id}").content == bomb


# --- forged Postdesk and loop headers ---------------------------------------------------------------


def test_a_customers_forged_x_loop_naming_the_desk_becomes_a_ticket_marked_automatic(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    # Postdesk writes no X-Loop, so a loop header naming the desk proves nothing: the mail becomes a
    # ticket, marked automatic with the headers as the reason, so it is never answered automatically.
    article = article_of(runtime, ingest(bench, hostile_bytes("forged-x-loop.eml")))
    assert article.ticket.title == "Our VPN is down"
    assert article.ticket.customer.email == "olga@customer.example"
    assert article.auto_generated
    assert article.classification == (
        "x-loop names our address, x-ms-exchange-inbox-rules-loop names our address"
    )
    page = ticket_page(agent, article)
    assert "Automatic mail" in page and 'title="x-loop names our address, ' in page


def test_mail_from_the_desks_own_address_is_quarantined_naming_the_rule_and_an_admin_can_release_it(
    bench: IngestBench, runtime: Runtime, agent: TestClient
) -> None:
    raw = hostile_bytes("forged-x-loop.eml").replace(
        b"From: Olga Customer <olga@customer.example>", b"From: Contoso Support <SUPPORT@contoso.com>"
    )
    ending = ingest(bench, raw)
    assert ending.status is InboundStatus.QUARANTINED and ending.spooled == raw
    assert ending.reason.startswith(
        "sent by one of Postdesk's own mailboxes and not part of a known ticket: From is support@contoso.com."
    )
    with runtime.sessions() as session:
        row = session.scalars(select(InboundMessage)).one()
    assert "Our VPN is down" in agent.get("/quarantine").text
    assert agent.get(f"/quarantine/{row.id}/raw").content == raw
    # Re-running the rules alone gives the same verdict; the admin's reprocess overrides it.
    again, _ = reprocess(runtime, row.id, override_loop=False)
    assert again is not None and (again.status, again.reason) == (InboundStatus.QUARANTINED, ending.reason)
    released, counts = reprocess(runtime, row.id)
    assert released is not None and released.status is InboundStatus.PROCESSED
    assert counts.tickets == 1
    assert released.reason and released.reason.startswith("opened ticket")


def test_a_forged_x_postdesk_ticket_header_alone_changes_nothing(
    bench: IngestBench, runtime: Runtime
) -> None:
    victim = article_of(runtime, ingest(bench, b"From: victim@example.org\r\nSubject: Password\r\n\r\nHelp."))
    assert victim.ticket.number == FIRST_TICKET
    raw = re.sub(
        rb"X-Loop: .*\r\n|X-MS-Exchange-Inbox-Rules-Loop: .*\r\n", b"", hostile_bytes("forged-x-loop.eml")
    )
    assert b"X-Postdesk-Ticket: 10001" in raw
    article = article_of(runtime, ingest(bench, raw))
    assert article.ticket.number != FIRST_TICKET  # a ticket of her own, as any customer's first mail
    assert article.ticket.customer.email == "olga@customer.example"
    assert not article.auto_generated


def test_a_stranger_naming_another_customers_ticket_number_gets_a_ticket_of_their_own(
    bench: IngestBench, runtime: Runtime
) -> None:
    # Were the number enough, the stranger's mail would reopen the victim's ticket and the agent's reply
    # would go to the stranger with the conversation quoted (more in tests/ingest/).
    article_of(runtime, ingest(bench, b"From: victim@example.org\r\nSubject: Password\r\n\r\nHelp."))
    with runtime.sessions.begin() as session:  # closed: the forged mail would reopen it, too
        session.execute(update(Ticket).values(state=TicketState.CLOSED))
    article = article_of(runtime, ingest(bench, hostile_bytes("forged-ticket-number.eml")))
    assert article.ticket.number != FIRST_TICKET
    assert article.ticket.customer.email == "mallory@attacker.example"
    assert article.sender == "Mallory <mallory@attacker.example>"
    with runtime.sessions() as session:
        victim = session.scalars(select(Ticket).where(Ticket.number == FIRST_TICKET)).one()
        assert (victim.state, len(victim.articles)) == (TicketState.CLOSED, 1)


# --- values that only PostgreSQL refuses -------------------------------------------------------------


@pytest.fixture
def db_bench(db_runtime: Runtime) -> IngestBench:
    return IngestBench(db_runtime, email=DESK)


LONG_VALUES = {
    "display name of 300 characters": b'From: "'
    + b"N" * 300
    + b'" <long.name@example.org>\r\nSubject: x\r\n\r\nx',
    "domain of 400 characters": b"From: x@" + b"d" * 400 + b".example\r\nSubject: x\r\n\r\nx",
    "message id of 997 characters": b"From: a@example.org\r\nMessage-ID: <" + b"i" * 997 + b">\r\n\r\nx",
    "content type of 300 characters": b"From: a@example.org\r\nContent-Type: x/" + b"y" * 300 + b"\r\n\r\nx",
    "NUL bytes everywhere": hostile_bytes("nul-bytes.eml"),
    "ticket number past 64 bits": b"From: a@example.org\r\nSubject: [Ticket#" + b"9" * 40 + b"]\r\n\r\nx",
}


@pytest.mark.parametrize("raw", LONG_VALUES.values(), ids=LONG_VALUES.keys())
def test_values_longer_than_their_columns_or_with_nul_bytes_become_articles_on_every_database(
    db_bench: IngestBench, raw: bytes
) -> None:
    ending = ingest(db_bench, raw)
    assert ending.status is InboundStatus.PROCESSED


def test_a_bounce_quoting_a_message_id_with_a_nul_byte_is_judged_like_any_bounce_on_every_database(
    db_bench: IngestBench,
) -> None:
    # Found by the fuzzer (#9): the id of the returned original was looked up with its NUL, and
    # PostgreSQL refuses NUL even as a query parameter.
    raw = (
        b"From: MAILER-DAEMON@mail.example.net\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="r"\r\n\r\n'
        b"--r\r\nContent-Type: text/plain\r\n\r\nThe mail could not be delivered.\r\n"
        b"--r\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: support@contoso.com\r\nMessage-ID: <ticket\x00@contoso.com>\r\n\r\nHello\r\n--r--\r\n"
    )
    ending = ingest(db_bench, raw)
    assert ending.status is InboundStatus.QUARANTINED
    assert ending.reason.startswith("a delivery failure report for a message Postdesk does not know")


def test_a_ticket_number_too_large_for_the_ticket_number_column_opens_a_ticket_on_every_database(
    db_bench: IngestBench,
) -> None:
    # Issue #9: numbers up to 18 digits were looked up in tickets.number, a 32-bit integer column, and
    # PostgreSQL refused the query (integer out of range), so the message was quarantined.
    ending = ingest(db_bench, b"From: a@example.org\r\nSubject: Re: [Ticket#99999999999] Help\r\n\r\nx")
    assert ending.status is InboundStatus.PROCESSED


def test_an_oversized_message_with_nul_bytes_in_its_header_is_quarantined_on_every_database(
    db_bench: IngestBench, db_runtime: Runtime
) -> None:
    with db_runtime.sessions.begin() as session:
        session.execute(update(Channel).values(max_message_bytes=100))
    raw = (
        b"From: Nul\x00 <nul@example.org>\r\nSubject: big\x00 one\r\nMessage-ID: <a\x00b@x>\r\n\r\n"
        + b"x" * 200
    )
    ending = ingest(db_bench, raw)
    assert ending.status is InboundStatus.QUARANTINED and "limit" in ending.reason
    with db_runtime.sessions() as session:
        row = session.scalars(select(InboundMessage)).one()
    assert (row.subject, row.sender) == ("big one", "Nul <nul@example.org>")


@pytest.fixture
def unstorable_message_ids(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Articles of mail whose subject says "unstorable" get a Message-ID longer than its column."""
    original = process._new_article

    def new_article(inbound: Inbound) -> NewArticle:
        article = original(inbound)
        if "unstorable" in article.subject:
            return replace(article, message_id="<" + "x" * 2000 + ">")
        return article

    monkeypatch.setattr(process, "_new_article", new_article)
    yield


def test_a_value_the_database_refuses_quarantines_that_message_and_not_the_rest(
    db_bench: IngestBench, db_runtime: Runtime, unstorable_message_ids: None
) -> None:
    if db_runtime.engine.dialect.name == "sqlite":
        pytest.skip("SQLite stores a value of any length")
    raws = [
        b"From: a@example.org\r\nSubject: %s\r\n\r\nx" % subject
        for subject in (b"one", b"unstorable", b"two")
    ]
    [one, unstorable, two] = db_bench.ingest(raws)  # one batch: it fails, then goes a message at a time
    assert (one.status, two.status) == (InboundStatus.PROCESSED, InboundStatus.PROCESSED)
    assert unstorable.status is InboundStatus.QUARANTINED
    assert unstorable.reason.startswith("Postdesk could not store it: the database refused one of its values")
    assert "x" * 100 not in unstorable.reason  # the driver's words, not the statement and its values
    assert unstorable.spooled == raws[1]
