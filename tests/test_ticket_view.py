"""The ticket view shows mail HTML only sanitised, and attachments only as downloads."""

from __future__ import annotations

from fastapi.testclient import TestClient

from postdesk.db.models import Attachment, Direction, Role, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.storage import store_bytes
from postdesk.tickets.people import get_or_create_group
from postdesk.tickets.service import NewArticle, create_ticket, get_or_create_customer
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, add_user, sign_in

HOSTILE = (
    '<p onclick="steal()">Hello <b>team</b></p><script>alert(1)</script>'
    '<a href="javascript:alert(2)">click</a><img src="https://tracker.example/p.gif">'
)


def _ticket_with_html_and_attachment(runtime: Runtime, *, group: str | None = None) -> tuple[int, int]:
    payload = b"<html><script>alert(3)</script></html>"
    digest = store_bytes(runtime.settings.attachments_dir, payload)
    with transaction(runtime.sessions) as session:
        ticket = create_ticket(
            session,
            title="HTML mail",
            customer=get_or_create_customer(session, "c@example.org"),
            group=get_or_create_group(session, group) if group else None,
            first_article=NewArticle(direction=Direction.INBOUND, body_text="Hello team", body_html=HOSTILE),
        )
        attachment = Attachment(
            article_id=ticket.articles[0].id,
            filename="invoice.html",
            content_type="text/html",
            size=len(payload),
            sha256=digest,
        )
        session.add(attachment)
        session.flush()
        return ticket.number, attachment.id


def test_mail_html_is_shown_sanitised(client: TestClient, runtime: Runtime, admin: User) -> None:
    number, _ = _ticket_with_html_and_attachment(runtime)
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get(f"/tickets/{number}").text
    assert "<b>team</b>" in page
    for hostile in ("<script>alert(1)", "onclick=", "javascript:alert", '<img src="https://tracker.example'):
        assert hostile not in page


def test_an_attachment_is_always_a_download(client: TestClient, runtime: Runtime, admin: User) -> None:
    number, attachment_id = _ticket_with_html_and_attachment(runtime)
    sign_in(client, admin.email, ADMIN_PASSWORD)
    assert f'href="/attachments/{attachment_id}"' in client.get(f"/tickets/{number}").text
    response = client.get(f"/attachments/{attachment_id}")
    assert response.status_code == 200
    assert response.content == b"<html><script>alert(3)</script></html>"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"].startswith('attachment; filename="invoice.html"')


def test_an_agent_cannot_download_another_groups_attachment(client: TestClient, runtime: Runtime) -> None:
    _, attachment_id = _ticket_with_html_and_attachment(runtime, group="Legal")
    add_user(runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    sign_in(client, "agent@example.com", AGENT_PASSWORD)
    assert client.get(f"/attachments/{attachment_id}").status_code == 404
