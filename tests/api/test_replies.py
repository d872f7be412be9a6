"""Replies over the API are queued with their mail, exactly as from the web UI (outbox.queue_reply)."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from postdesk.db.models import OutboundMessage
from postdesk.runtime import Runtime
from tests.api.conftest import make_channel, make_ticket


def test_a_reply_is_stored_and_its_mail_queued(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    channel_id = make_channel(db_runtime)
    number = make_ticket(db_runtime, "Invoice charged twice", channel_id=channel_id)
    response = api_client.post(
        f"/api/v1/tickets/{number}/replies",
        json={
            "body": "Hello Jana,\n\nwe have refunded the second charge.",
            "attachments": [
                {
                    "filename": "refund.txt",
                    "content_type": "text/plain",
                    "content_base64": base64.b64encode(b"ok").decode(),
                }
            ],
        },
        headers=admin_headers,
    )
    assert response.status_code == 201, response.text
    reply = response.json()
    assert (reply["direction"], reply["internal"], reply["author"]) == ("outbound", False, "boss@example.com")
    assert "jana.novak@example.org" in reply["to"]
    assert reply["delivery"]["status"] == "queued"
    assert reply["delivery"]["attempts"] == 0
    assert [a["filename"] for a in reply["attachments"]] == ["refund.txt"]
    with db_runtime.sessions() as session:
        queued = session.scalars(select(OutboundMessage)).one()
        assert queued.article_id == reply["id"]
        assert queued.recipients == "jana.novak@example.org"
    shown = api_client.get(f"/api/v1/tickets/{number}", headers=admin_headers).json()
    assert shown["state"] == "open"
    assert shown["articles"][-1]["delivery"]["status"] == "queued"


def test_a_reply_that_cannot_be_sent_is_422_with_the_reason_and_stores_nothing(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Phone call")  # no mailbox connected at all
    response = api_client.post(
        f"/api/v1/tickets/{number}/replies", json={"body": "Hi"}, headers=admin_headers
    )
    assert response.status_code == 422
    assert "no mailbox to reply from" in response.json()["detail"]
    with db_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboundMessage)) == 0
    assert len(api_client.get(f"/api/v1/tickets/{number}", headers=admin_headers).json()["articles"]) == 1


def test_an_attachment_that_is_not_base64_is_refused(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    number = make_ticket(db_runtime, "Phone call", channel_id=make_channel(db_runtime))
    response = api_client.post(
        f"/api/v1/tickets/{number}/replies",
        json={"body": "Hi", "attachments": [{"filename": "x.bin", "content_base64": "not base64!"}]},
        headers=admin_headers,
    )
    assert response.status_code == 422
    assert response.json() == {"detail": "The attachment 'x.bin' is not valid base64."}
