"""An agent answers a customer's mail in headless Chromium: the reply goes out over SMTP, the page shows
"Delivered" without reloading, a note is one key away, and refusals and redirects survive htmx."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from playwright.sync_api import ConsoleMessage, FilePayload, Page, Request, expect
from sqlalchemy import select

from postdesk.db.models import Role, User
from postdesk.db.session import transaction
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.tickets.people import get_or_create_group
from tests.browser.conftest import MailDesk, sign_in_page
from tests.conftest import AGENT_PASSWORD, add_user
from tests.microsoft365.conftest import receive_mail
from tests.support.dovecot import inbox

pytestmark = pytest.mark.browser
QUESTION_ID = "<browser-question-1@fabrikam.onmicrosoft.com>"
# A wait, not a timing claim: the background sender plus htmx's 2 s polling usually take 2–4 s.
DELIVERED_WITHIN_MS = 20_000
_numbers = itertools.count(1)


@dataclass
class Desk(MailDesk):
    customer: str
    ticket_number: int


@pytest.fixture
def desk(mail_desk: MailDesk, dovecot: DovecotServer) -> Desk:
    """Postdesk on a real port with a connected mailbox, an agent, and a ticket opened by a customer's
    mail."""
    add_user(mail_desk.runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    customer = f"browser-customer{next(_numbers)}@fabrikam.onmicrosoft.com"
    ticket = receive_mail(
        mail_desk.runtime,
        dovecot,
        mail_desk.channel_id,
        mail_desk.mailbox,
        sender=f"Jana Novák <{customer}>",
        subject="Printer on fire",
        message_id=QUESTION_ID,
    )
    return Desk(
        mail_desk.url, mail_desk.runtime, mail_desk.mailbox, mail_desk.channel_id, customer, ticket.number
    )


def test_an_agent_replies_with_an_attachment_and_sees_it_delivered_then_adds_a_note(
    page: Page, desk: Desk, dovecot: DovecotServer
) -> None:
    elsewhere: list[str] = []
    page.on("request", lambda request: _same_origin(request, desk.url, elsewhere))
    problems: list[str] = []
    page.on("console", lambda message: _console_problem(message, problems))
    page.on("pageerror", lambda error: problems.append(str(error)))

    _sign_in_as_agent(page, desk)
    page.get_by_role("link", name="Printer on fire").click()
    expect(page.get_by_role("heading", name="Printer on fire")).to_be_visible()
    ticket_url = page.url
    expect(page.get_by_label("To", exact=True)).to_have_value(desk.customer)

    # Everything below must happen by htmx swaps: a full load would forget this.
    page.evaluate("window.postdeskTestMarker = 'same document'")
    page.get_by_label("Message", exact=True).fill("We sent a technician; the plan is attached.")
    plan: FilePayload = {"name": "plan.pdf", "mimeType": "application/pdf", "buffer": b"%PDF-1.4 plan"}
    page.get_by_label("Attachments").set_input_files(files=[plan])
    page.get_by_label("Message", exact=True).press("Control+Enter")

    reply = page.locator("article.outbound").filter(has_text="We sent a technician")
    expect(reply.locator(".delivery .badge")).to_have_text("Delivered", timeout=DELIVERED_WITHIN_MS)
    expect(reply.get_by_role("link", name="plan.pdf")).to_be_visible()
    assert page.evaluate("window.postdeskTestMarker") == "same document"
    assert page.url == ticket_url

    [mail] = inbox(dovecot, desk.customer)
    assert mail["In-Reply-To"] == QUESTION_ID
    assert mail["Subject"] == f"Re: [Ticket#{desk.ticket_number}] Printer on fire"
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None and "We sent a technician; the plan is attached." in body.get_content()
    [attachment] = mail.iter_attachments()
    assert attachment.get_filename() == "plan.pdf"
    assert attachment.get_content() == b"%PDF-1.4 plan"

    # "n" (outside any field) switches to the note composer and puts the cursor in it.
    page.locator("h1").click()
    page.keyboard.press("n")
    note_field = page.get_by_label("Internal note")
    expect(note_field).to_be_focused()
    expect(page.get_by_label("To", exact=True)).to_have_count(0)
    page.keyboard.type("Customer is a VIP; call before visiting.")
    page.get_by_role("button", name="Add note").click()
    note = page.locator("article.note").filter(has_text="Customer is a VIP")
    expect(note).to_contain_text("Internal note · only agents see this")
    assert page.evaluate("window.postdeskTestMarker") == "same document"
    assert len(inbox(dovecot, desk.customer)) == 1  # a note is never mailed

    assert elsewhere == []
    assert problems == []


def test_a_refused_reply_shows_the_reason_and_keeps_what_the_agent_typed(page: Page, desk: Desk) -> None:
    _sign_in_as_agent(page, desk)
    page.goto(f"{desk.url}/tickets/{desk.ticket_number}")
    page.evaluate("window.postdeskTestMarker = 'same document'")
    page.get_by_label("To", exact=True).fill("not an address")
    page.get_by_label("Message", exact=True).fill("Three careful paragraphs.")
    page.get_by_role("button", name="Send reply").click()
    expect(page.get_by_role("alert")).to_contain_text("not an email address")
    expect(page.get_by_label("Message", exact=True)).to_have_value("Three careful paragraphs.")
    expect(page.get_by_label("To", exact=True)).to_have_value("not an address")
    assert page.evaluate("window.postdeskTestMarker") == "same document"


def test_an_agent_who_moves_a_ticket_out_of_their_groups_lands_on_the_ticket_list(
    page: Page, desk: Desk
) -> None:
    with transaction(desk.runtime.sessions) as session:
        agent = session.scalar(select(User).where(User.email == "agent@example.com"))
        assert agent is not None
        agent.groups.append(get_or_create_group(session, "Support"))
        get_or_create_group(session, "Legal")
    _sign_in_as_agent(page, desk)
    page.goto(f"{desk.url}/tickets/{desk.ticket_number}")
    page.get_by_label("Group").select_option(label="Legal")
    page.get_by_role("button", name="Update").click()
    page.wait_for_url(f"{desk.url}/tickets")
    expect(page.get_by_role("link", name="Printer on fire")).to_have_count(0)


def _sign_in_as_agent(page: Page, desk: Desk) -> None:
    sign_in_page(page, desk.url, "agent@example.com", AGENT_PASSWORD)
    expect(page.get_by_role("link", name="Printer on fire")).to_be_visible()


def _same_origin(request: Request, origin: str, elsewhere: list[str]) -> None:
    if not request.url.startswith(f"{origin}/"):
        elsewhere.append(request.url)


def _console_problem(message: ConsoleMessage, problems: list[str]) -> None:
    if message.type == "error":
        problems.append(message.text)
