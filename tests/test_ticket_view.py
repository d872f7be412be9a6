"""The ticket view shows mail HTML only sanitised, and attachments only as downloads."""

from __future__ import annotations

import re

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


def _frame_url(page: str) -> str:
    """The src of the article's sandboxed mail frame, which must be the page's only view of mail HTML."""
    frame = re.search(r"<iframe [^>]*>", page)
    assert frame is not None, "the HTML mail is not in a frame"
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox"' in frame.group(0)
    source = re.search(r'src="([^"]+)"', frame.group(0))
    assert source is not None
    return source.group(1)


def test_mail_html_is_shown_sanitised_in_a_sandboxed_frame(
    client: TestClient, runtime: Runtime, admin: User
) -> None:
    number, _ = _ticket_with_html_and_attachment(runtime)
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get(f"/tickets/{number}").text
    # None of the mail's markup is in the page itself, hostile or not.
    for markup in ("<b>team</b>", "steal()", "alert(", "tracker.example"):
        assert markup not in page
    frame_url = _frame_url(page)
    assert re.fullmatch(rf"/tickets/{number}/articles/\d+/body", frame_url)
    body = client.get(frame_url)
    assert body.status_code == 200
    assert body.headers["content-type"].startswith("text/html")
    assert "<b>team</b>" in body.text
    for hostile in (
        "<script",
        "alert(1)",
        "onclick=",
        "javascript:alert",
        '<img src="https://tracker.example',
    ):
        assert hostile not in body.text


def test_the_mail_frame_has_its_own_strict_content_security_policy(
    client: TestClient, runtime: Runtime, admin: User
) -> None:
    number, _ = _ticket_with_html_and_attachment(runtime)
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get(f"/tickets/{number}")
    assert "frame-src 'self'" in page.headers["content-security-policy"]
    body = client.get(_frame_url(page.text))
    policy = {
        directive.split()[0]: directive.split()[1:]
        for directive in body.headers["content-security-policy"].split(";")
    }
    assert policy["default-src"] == ["'none'"]
    assert "script-src" not in policy  # default-src 'none': no script of any kind
    assert policy["img-src"] == ["data:"]
    assert policy["style-src"] == ["'unsafe-inline'"]
    assert policy["frame-ancestors"] == ["'self'"]
    assert policy["form-action"] == ["'none'"]
    assert policy["sandbox"] == ["allow-popups", "allow-popups-to-escape-sandbox"]
    assert body.headers["x-frame-options"] == "SAMEORIGIN"
    assert body.headers["referrer-policy"] == "no-referrer"


def test_remote_images_load_only_after_the_agent_asks(
    client: TestClient, runtime: Runtime, admin: User
) -> None:
    number, _ = _ticket_with_html_and_attachment(runtime)
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get(f"/tickets/{number}").text
    frame_url = _frame_url(page)
    assert "Remote images are blocked" in page
    show = re.search(r'<a href="([^"]+)" target="([^"]+)" data-show-images>Show remote images</a>', page)
    assert show is not None
    assert show.group(1) == f"{frame_url}?images=1"
    assert f'name="{show.group(2)}"' in page  # the link reloads the frame, with or without JavaScript
    blocked = client.get(frame_url)
    assert 'data-remote-src="https://tracker.example/p.gif"' in blocked.text
    assert "https:" not in blocked.headers["content-security-policy"]
    shown = client.get(show.group(1))
    assert '<img src="https://tracker.example/p.gif"' in shown.text
    assert "img-src data: https:;" in shown.headers["content-security-policy"]
    assert "onclick=" not in shown.text and "<script" not in shown.text


def test_an_agent_cannot_open_the_mail_frame_of_another_groups_ticket(
    client: TestClient, runtime: Runtime
) -> None:
    number, attachment_id = _ticket_with_html_and_attachment(runtime, group="Legal")
    with runtime.sessions() as session:
        article_id = session.get_one(Attachment, attachment_id).article_id
    add_user(runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    sign_in(client, "agent@example.com", AGENT_PASSWORD)
    for url in (
        f"/tickets/{number}/articles/{article_id}/body",
        f"/tickets/{number}/articles/{article_id}/body?images=1",
    ):
        response = client.get(url)
        assert response.status_code == 404
        assert "team" not in response.text


def test_a_signed_out_visitor_gets_no_mail_frame(client: TestClient, runtime: Runtime) -> None:
    number, attachment_id = _ticket_with_html_and_attachment(runtime)
    with runtime.sessions() as session:
        article_id = session.get_one(Attachment, attachment_id).article_id
    response = client.get(f"/tickets/{number}/articles/{article_id}/body", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=")


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
