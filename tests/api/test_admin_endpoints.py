"""Channels and quarantine over the API: admins only."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from postdesk.db.models import Channel, ChannelStatus
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from tests.api.conftest import bearer, make_channel, person, quarantine, token_for

MAIL = (
    b"From: Jana Novak <jana.novak@example.org>\r\nTo: support@example.com\r\n"
    b"Subject: Scanned contract\r\nMessage-ID: <contract@mail.example.org>\r\n"
    b"Date: Mon, 02 Mar 2026 09:00:00 +0000\r\n\r\nPlease find the contract attached.\r\n"
)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/channels"),
        ("GET", "/api/v1/channels/1"),
        ("GET", "/api/v1/quarantine"),
        ("POST", "/api/v1/quarantine/1/reprocess"),
    ],
)
def test_agents_get_403_on_admin_endpoints(
    api_client: TestClient, db_runtime: Runtime, method: str, path: str
) -> None:
    channel_id = make_channel(db_runtime)
    quarantine(db_runtime, channel_id, MAIL, reason="Postdesk could not process it")
    headers = bearer(token_for(db_runtime, person(db_runtime, "ana@example.com")))
    response = api_client.request(method, path, headers=headers)
    assert response.status_code == 403
    assert response.json() == {"detail": "Only administrators can use this endpoint."}


def test_channels_are_listed_with_the_fields_of_channel_list_json(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    first = make_channel(db_runtime, "support@example.com")
    second = make_channel(db_runtime, "billing@example.com")
    with transaction(db_runtime.sessions) as session:
        channel = session.get(Channel, second)
        assert channel is not None
        channel.status = ChannelStatus.NEEDS_REAUTH
        channel.last_error = "Sign in again: the refresh token was revoked."
    response = api_client.get("/api/v1/channels?per_page=1&page=2", headers=admin_headers)
    assert response.status_code == 200
    listed = response.json()
    assert (listed["total"], listed["pages"]) == (2, 2)
    [item] = listed["items"]
    assert {"id", "email", "transport", "status", "last_fetch_at", "last_error"} <= set(item)
    assert (item["id"], item["email"], item["transport"], item["status"]) == (
        second,
        "billing@example.com",
        "imap",
        "needs_reauth",
    )
    assert item["last_error"] == "Sign in again: the refresh token was revoked."
    assert first != second


def test_a_channels_status_has_its_fetch_details(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    channel_id = make_channel(db_runtime)
    status = api_client.get(f"/api/v1/channels/{channel_id}", headers=admin_headers).json()
    assert (status["id"], status["status"], status["folder"], status["last_fetch_at"]) == (
        channel_id,
        "ok",
        "INBOX",
        None,
    )
    assert api_client.get("/api/v1/channels/999", headers=admin_headers).status_code == 404


def test_quarantined_mail_is_listed_with_its_reason(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    channel_id = make_channel(db_runtime)
    older = quarantine(db_runtime, channel_id, MAIL, reason="too large", uid=1)
    newer = quarantine(db_runtime, channel_id, MAIL + b"x", reason="a mail loop", uid=2)
    listed = api_client.get("/api/v1/quarantine", headers=admin_headers).json()
    assert listed["total"] == 2
    assert [(r["id"], r["reason"]) for r in listed["items"]] == [(newer, "a mail loop"), (older, "too large")]
    assert listed["items"][0]["channel"] == "support@example.com"
    assert listed["items"][0]["subject"] == "Scanned contract"
    paged = api_client.get("/api/v1/quarantine?per_page=1&page=2", headers=admin_headers).json()
    assert [r["id"] for r in paged["items"]] == [older]
    other = api_client.get(f"/api/v1/quarantine?channel_id={channel_id + 1}", headers=admin_headers).json()
    assert other["total"] == 0


def test_reprocess_releases_a_message_into_a_ticket(
    api_client: TestClient, db_runtime: Runtime, admin_headers: dict[str, str]
) -> None:
    message_id = quarantine(
        db_runtime, make_channel(db_runtime), MAIL, reason="Postdesk could not process it"
    )
    response = api_client.post(f"/api/v1/quarantine/{message_id}/reprocess", headers=admin_headers)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["id"], result["status"]) == (message_id, "processed")
    assert result["ticket_number"] is not None
    ticket = api_client.get(f"/api/v1/tickets/{result['ticket_number']}", headers=admin_headers).json()
    assert ticket["title"] == "Scanned contract"
    assert api_client.get("/api/v1/quarantine", headers=admin_headers).json()["total"] == 0
    again = api_client.post(f"/api/v1/quarantine/{message_id}/reprocess", headers=admin_headers)
    assert again.status_code == 404
    assert again.json() == {"detail": f"Message {message_id} is not in quarantine."}
