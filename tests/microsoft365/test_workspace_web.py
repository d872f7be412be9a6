"""The agent's ticket view over HTTP: the composer, replies that reach the customer, delivery status, notes,
properties, and who may do what."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import Article, DeliveryStatus, Direction, OutboundMessage, Role, Ticket, User
from postdesk.db.session import transaction
from postdesk.outbox.queue import Draft
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox.submission import SubmissionServer
from postdesk.tickets.people import get_or_create_group
from postdesk.tickets.service import get_ticket
from postdesk.web.app import create_app
from tests.conftest import AGENT_PASSWORD, add_user, csrf_from, sign_in
from tests.microsoft365.conftest import (
    BASE_URL,
    QUESTION_ID,
    Inbox,
    changing_delivery,
    queue_draft,
    wait_for_delivery,
)


class _Elements(HTMLParser):
    """Every element's attributes by id, and the text of each textarea."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str]] = {}
        self.textareas: dict[str, str] = {}
        self._in_textarea: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if "id" in attributes:
            self.by_id[attributes["id"]] = {"tag": tag, **attributes}
        if tag == "textarea":
            self._in_textarea = attributes.get("id", "")
            self.textareas[self._in_textarea] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self._in_textarea = None

    def handle_data(self, data: str) -> None:
        if self._in_textarea is not None:
            self.textareas[self._in_textarea] += data


# `desk` (tests/microsoft365/conftest.py) is the admin's browser, the one that connected the mailbox.


@pytest.fixture
def question_cc(colleague: str, mailbox_user: str) -> tuple[str, ...]:
    """The customer's first mail copies a colleague, and the desk's own mailbox."""
    return (colleague, mailbox_user)


@pytest.fixture
def agent_desk(m365_runtime: Runtime) -> Iterator[TestClient]:
    """A second browser, with an agent (member of the group "Support" only) signed in."""
    add_user(m365_runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    with transaction(m365_runtime.sessions) as session:
        agent = session.scalar(select(User).where(User.email == "agent@example.com"))
        assert agent is not None
        agent.groups.append(get_or_create_group(session, "Support"))
        get_or_create_group(session, "Legal")
    with TestClient(create_app(m365_runtime), base_url=BASE_URL) as client:
        sign_in(client, "agent@example.com", AGENT_PASSWORD)
        yield client


def _first_article_id(runtime: Runtime, number: int) -> int:
    with runtime.sessions() as session:
        ticket = get_ticket(session, number)
        assert ticket is not None
        return ticket.articles[0].id


def _ticket(runtime: Runtime, number: int) -> Ticket:
    with runtime.sessions() as session:
        ticket = get_ticket(session, number)
        assert ticket is not None
        for related in (ticket.group, ticket.owner, ticket.articles):
            _ = related  # loaded before the session closes
        return ticket


def _deliveries(runtime: Runtime) -> list[OutboundMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(select(OutboundMessage).order_by(OutboundMessage.id)))


def _multipart(fields: dict[str, str], files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    """A form as Chromium encodes it: an empty file input is still a part, with ``filename=""``
    (httpx would leave the filename out, which a browser never does)."""
    boundary = "----PostdeskTestBoundary7MA4YWxkTrZu0gW"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode()
        for name, value in fields.items()
    ]
    for filename, content, content_type in files or [("", b"", "application/octet-stream")]:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="attachments"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts.append(head.encode() + content)
    body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _submit_composer(
    client: TestClient, number: int, fields: dict[str, str], files: list[tuple[str, bytes, str]] | None = None
) -> httpx.Response:
    body, content_type = _multipart(fields, files or [])
    response: httpx.Response = client.post(
        f"/tickets/{number}/reply",
        content=body,
        headers={"Content-Type": content_type},
        follow_redirects=False,
    )
    return response


def _send_reply(
    client: TestClient,
    runtime: Runtime,
    number: int,
    *,
    body: str,
    to: str,
    files: list[tuple[str, bytes, str]] | None = None,
) -> tuple[int, OutboundMessage]:
    """Send the composer form as the browser does (multipart, CSRF field from the page), expect the redirect
    to the new article, and wait until the background sender is done with its mail (sent or failed):
    the article's id and its outbound message."""
    page = client.get(f"/tickets/{number}")
    assert page.status_code == 200, page.text
    fields = {"csrf_token": csrf_from(page.text), "kind": "reply", "body": body, "to": to, "cc": ""}
    response = _submit_composer(client, number, fields, files)
    location = response.headers.get("location", response.text)
    assert response.status_code == 303, location
    assert location.startswith(f"/tickets/{number}#article-")
    article_id = _article_from_location(location)
    return article_id, wait_for_delivery(runtime, article_id, DeliveryStatus.SENT, DeliveryStatus.FAILED)


def _article_from_location(location: str) -> int:
    return int(location.rsplit("#article-", 1)[1])


def test_the_ticket_page_prefills_a_reply_to_the_customer(
    desk: TestClient, ticket_number: int, customer: str
) -> None:
    page = desk.get(f"/tickets/{ticket_number}")
    assert page.status_code == 200
    elements = _Elements(page.text)
    assert elements.by_id["compose-to"]["value"] == customer
    assert elements.by_id["compose-cc"]["value"] == ""
    composer = page.text[page.text.index('<section id="composer"') :]
    for label, key in (("Reply", "r"), ("Reply all", "a"), ("Forward", "f"), ("Note", "n")):
        assert f'data-shortcut="{key}"' in composer
        assert f">{label}</a>" in composer
    assert "Send reply" in composer


def test_the_reply_all_composer_copies_the_others_but_not_the_desk(
    desk: TestClient,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    colleague: str,
    mailbox_user: str,
) -> None:
    article_id = _first_article_id(m365_runtime, ticket_number)
    fragment = desk.get(f"/tickets/{ticket_number}/compose?kind=reply_all&article={article_id}")
    assert fragment.status_code == 200
    assert fragment.text.lstrip().startswith('<section id="composer"')
    assert "<html" not in fragment.text
    elements = _Elements(fragment.text)
    assert elements.by_id["compose-to"]["value"] == customer
    assert elements.by_id["compose-cc"]["value"] == colleague
    assert mailbox_user not in fragment.text
    assert f'name="article_id" value="{article_id}"' in fragment.text
    assert "Send to all" in fragment.text


def test_a_reply_with_an_attachment_reaches_the_customer_and_shows_delivered(
    desk: TestClient,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    customer_inbox: Inbox,
    smtp_submission: SubmissionServer,
) -> None:
    article_id, sent = _send_reply(
        desk,
        m365_runtime,
        ticket_number,
        body="We sent a technician.",
        to=customer,
        files=[("plan.pdf", b"%PDF-1.4 plan", "application/pdf")],
    )
    assert sent.status is DeliveryStatus.SENT, sent.last_error
    [reply] = customer_inbox()
    assert reply["In-Reply-To"] == QUESTION_ID
    assert reply["Message-ID"] == sent.message_id
    [attachment] = reply.iter_attachments()
    assert attachment.get_filename() == "plan.pdf"
    assert attachment.get_content() == b"%PDF-1.4 plan"
    page = desk.get(f"/tickets/{ticket_number}").text
    badge = _Elements(page).by_id[f"delivery-{article_id}"]
    assert "delivery-sent" in badge["class"] and "hx-trigger" not in badge
    assert "Delivered" in page
    assert "plan.pdf" in page


def test_a_refused_draft_answers_422_with_the_reason_and_keeps_what_the_agent_wrote(
    desk: TestClient, m365_runtime: Runtime, ticket_number: int, smtp_submission: SubmissionServer
) -> None:
    page = desk.get(f"/tickets/{ticket_number}")
    typed = "Dear Jana,\n\nthree paragraphs of <careful> work & thought."
    response = _submit_composer(
        desk,
        ticket_number,
        {
            "csrf_token": csrf_from(page.text),
            "kind": "reply",
            "to": "not an address",
            "cc": "",
            "body": typed,
        },
    )
    assert response.status_code == 422
    elements = _Elements(response.text)
    assert "not an email address" in response.text
    assert 'role="alert"' in response.text
    assert elements.textareas["compose-body"] == typed
    assert elements.by_id["compose-to"]["value"] == "not an address"
    assert _deliveries(m365_runtime) == []
    assert len(_ticket(m365_runtime, ticket_number).articles) == 1


def test_a_note_is_shown_as_internal_and_sends_no_mail(
    desk: TestClient,
    m365_runtime: Runtime,
    ticket_number: int,
    customer_inbox: Inbox,
    smtp_submission: SubmissionServer,
) -> None:
    composer = desk.get(f"/tickets/{ticket_number}/compose?kind=note")
    assert "compose-to" not in composer.text and "Add note" in composer.text
    page = desk.get(f"/tickets/{ticket_number}")
    response = desk.post(
        f"/tickets/{ticket_number}/reply",
        data={"csrf_token": csrf_from(page.text), "kind": "note", "body": "Customer is a VIP."},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    article_id = _article_from_location(response.headers["location"])
    shown = desk.get(f"/tickets/{ticket_number}").text
    article = shown[shown.index(f'id="article-{article_id}"') :].split("</article>")[0]
    assert "Internal note · only agents see this" in article
    assert "Customer is a VIP." in article
    assert "delivery" not in article
    assert _deliveries(m365_runtime) == []
    assert smtp_submission.accepted == []
    assert customer_inbox() == []


def test_the_properties_form_changes_state_owner_and_group(
    desk: TestClient, agent_desk: TestClient, m365_runtime: Runtime, ticket_number: int
) -> None:
    with m365_runtime.sessions() as session:
        agent = session.scalar(select(User).where(User.email == "agent@example.com"))
        support = get_or_create_group(session, "Support")
        assert agent is not None
        agent_id, support_id = agent.id, support.id
    page = desk.get(f"/tickets/{ticket_number}")
    response = desk.post(
        f"/tickets/{ticket_number}/properties",
        data={
            "csrf_token": csrf_from(page.text),
            "state": "pending_reminder",
            "owner": str(agent_id),
            "group": str(support_id),
        },
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"/tickets/{ticket_number}"
    ticket = _ticket(m365_runtime, ticket_number)
    assert (ticket.state.value, ticket.owner_id, ticket.group_id) == (
        "pending_reminder",
        agent_id,
        support_id,
    )
    shown = desk.get(f"/tickets/{ticket_number}").text
    assert "Pending reminder</span>" in shown and "owned by agent" in shown and "· Support" in shown


def test_an_agent_who_moves_a_ticket_out_of_their_groups_is_sent_to_the_list(
    agent_desk: TestClient, m365_runtime: Runtime, ticket_number: int
) -> None:
    with m365_runtime.sessions() as session:
        legal = get_or_create_group(session, "Legal")
        legal_id = legal.id
    page = agent_desk.get(f"/tickets/{ticket_number}")
    assert page.status_code == 200
    response = agent_desk.post(
        f"/tickets/{ticket_number}/properties",
        data={"csrf_token": csrf_from(page.text), "state": "open", "owner": "", "group": str(legal_id)},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/tickets"
    assert _ticket(m365_runtime, ticket_number).group_id == legal_id
    assert agent_desk.get(f"/tickets/{ticket_number}").status_code == 404


def test_with_htmx_an_agent_who_moves_a_ticket_out_of_sight_is_sent_to_the_list_by_hx_redirect(
    agent_desk: TestClient, m365_runtime: Runtime, ticket_number: int
) -> None:
    """htmx follows a 303 inside its request and would swap in nothing from the list page."""
    with m365_runtime.sessions() as session:
        legal_id = get_or_create_group(session, "Legal").id
    page = agent_desk.get(f"/tickets/{ticket_number}")
    response = agent_desk.post(
        f"/tickets/{ticket_number}/properties",
        data={"csrf_token": csrf_from(page.text), "state": "open", "owner": "", "group": str(legal_id)},
        headers={"HX-Request": "true"},
        follow_redirects=False,
    )
    assert response.status_code == 204
    assert response.headers["hx-redirect"] == "/tickets"
    assert _ticket(m365_runtime, ticket_number).group_id == legal_id


def test_a_failed_delivery_says_why_and_retry_sends_it(
    desk: TestClient,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    mailbox_user: str,
    customer_inbox: Inbox,
    smtp_submission: SubmissionServer,
) -> None:
    smtp_submission.set_smtp_auth_disabled(mailbox_user, True)
    article_id, failed = _send_reply(desk, m365_runtime, ticket_number, body="On it.", to=customer)
    assert failed.status is DeliveryStatus.FAILED
    page = desk.get(f"/tickets/{ticket_number}").text
    badge = page[page.index(f'id="delivery-{article_id}"') :].split("</p>")[0]
    assert "Not delivered" in badge
    assert "SMTP AUTH is turned off for this mailbox or the whole tenant" in badge
    assert "Server said: <code>535 5.7.139 Authentication unsuccessful" in badge
    assert "hx-trigger" not in badge
    retry_action = f'action="/tickets/{ticket_number}/articles/{article_id}/retry"'
    assert retry_action in badge and ">Retry</button>" in badge
    assert customer_inbox() == []

    smtp_submission.set_smtp_auth_disabled(mailbox_user, False)
    retried = desk.post(
        f"/tickets/{ticket_number}/articles/{article_id}/retry",
        data={"csrf_token": csrf_from(page)},
        follow_redirects=False,
    )
    assert retried.status_code == 303
    assert retried.headers["location"] == f"/tickets/{ticket_number}#article-{article_id}"
    sent = wait_for_delivery(m365_runtime, article_id, DeliveryStatus.SENT)
    assert sent.message_id == failed.message_id
    assert len(customer_inbox()) == 1
    page = desk.get(f"/tickets/{ticket_number}").text
    badge = page[page.index(f'id="delivery-{article_id}"') :].split("</p>")[0]
    assert "Delivered" in badge and "Not delivered" not in badge


def test_the_delivery_badge_polls_only_while_the_mail_is_on_its_way(
    desk: TestClient, m365_runtime: Runtime, ticket_number: int, smtp_submission: SubmissionServer
) -> None:
    # Queued outside the web: nothing sends it yet.
    article_id = queue_draft(m365_runtime, ticket_number, Draft(kind="reply", body_text="On it."))
    route = f"/tickets/{ticket_number}/articles/{article_id}/delivery"

    def badge() -> dict[str, str]:
        response = desk.get(route)
        assert response.status_code == 200
        assert "<html" not in response.text
        return _Elements(response.text).by_id[f"delivery-{article_id}"]

    queued = badge()
    assert queued["hx-trigger"] == "every 2s" and queued["hx-get"] == route
    with changing_delivery(m365_runtime, article_id) as row:
        row.status = DeliveryStatus.SENDING
    assert badge()["hx-trigger"] == "every 2s"
    with changing_delivery(m365_runtime, article_id) as row:
        row.status = DeliveryStatus.QUEUED
    assert send_due(m365_runtime).sent == 1
    sent = badge()
    assert "hx-trigger" not in sent and "delivery-sent" in sent["class"]
    inbound_id = _first_article_id(m365_runtime, ticket_number)
    assert desk.get(f"/tickets/{ticket_number}/articles/{inbound_id}/delivery").status_code == 404


def test_an_outbound_attachment_downloads_as_octet_stream(
    desk: TestClient,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    smtp_submission: SubmissionServer,
) -> None:
    article_id, _ = _send_reply(
        desk,
        m365_runtime,
        ticket_number,
        body="The page you asked for.",
        to=customer,
        files=[("page.html", b"<script>alert(1)</script>", "text/html")],
    )
    with m365_runtime.sessions() as session:
        article = session.get(Article, article_id)
        assert article is not None and article.direction is Direction.OUTBOUND
        [attachment] = article.attachments
        attachment_id = attachment.id
    assert f'href="/attachments/{attachment_id}"' in desk.get(f"/tickets/{ticket_number}").text
    download = desk.get(f"/attachments/{attachment_id}")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"].startswith('attachment; filename="page.html"')
    assert download.content == b"<script>alert(1)</script>"


def test_an_agent_cannot_reply_to_a_ticket_they_cannot_see(
    agent_desk: TestClient,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    smtp_submission: SubmissionServer,
) -> None:
    with transaction(m365_runtime.sessions) as session:
        ticket = get_ticket(session, ticket_number)
        assert ticket is not None
        ticket.group = get_or_create_group(session, "Legal")
    article_id = _first_article_id(m365_runtime, ticket_number)
    assert agent_desk.get(f"/tickets/{ticket_number}").status_code == 404
    assert agent_desk.get(f"/tickets/{ticket_number}/compose?kind=reply").status_code == 404
    token = csrf_from(agent_desk.get("/tickets").text)
    response = _submit_composer(
        agent_desk,
        ticket_number,
        {"csrf_token": token, "kind": "reply", "body": "Sneaky.", "to": customer, "cc": ""},
        [("plan.pdf", b"%PDF-1.4", "application/pdf")],
    )
    assert response.status_code == 404
    note = agent_desk.post(
        f"/tickets/{ticket_number}/reply",
        data={"csrf_token": token, "kind": "note", "body": "Sneaky note."},
        follow_redirects=False,
    )
    assert note.status_code == 404
    assert agent_desk.get(f"/tickets/{ticket_number}/articles/{article_id}/delivery").status_code == 404
    assert _deliveries(m365_runtime) == []
    assert len(_ticket(m365_runtime, ticket_number).articles) == 1
    assert smtp_submission.accepted == []
