"""Only a valid personal token opens the API; cookies never do, and CSRF still guards cookie sessions."""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import ApiToken, User
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime
from postdesk.security.api_tokens import authenticate, create_token
from postdesk.security.redact import RedactingFilter, redact
from tests.api.conftest import bearer, make_ticket, person, token_for
from tests.conftest import AGENT_PASSWORD, csrf_from, sign_in


def _token_row(runtime: Runtime, secret: str) -> ApiToken:
    with runtime.sessions() as session:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
        assert row is not None
        return row


def _assert_refused(response_status: int, body: dict[str, str], challenge: str, *, says: str) -> None:
    assert response_status == 401
    assert says in body["detail"]
    assert challenge.startswith("Bearer")


def test_a_request_without_a_token_gets_401_with_a_bearer_challenge(api_client: TestClient) -> None:
    response = api_client.get("/api/v1/tickets")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="postdesk"'
    assert "Authorization: Bearer" in response.json()["detail"]


@pytest.mark.parametrize(
    "header",
    ["Bearer pd_" + "x" * 40, "Bearer not-a-postdesk-token", "Basic dXNlcjpwYXNz", "Bearer"],
)
def test_a_wrong_token_gets_401(api_client: TestClient, admin_token: str, header: str) -> None:
    response = api_client.get("/api/v1/me", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert set(response.json()) == {"detail"}


def test_a_valid_token_identifies_its_owner(api_client: TestClient, db_runtime: Runtime) -> None:
    agent = person(db_runtime, "ana@example.com", groups=("Billing", "Support"))
    response = api_client.get("/api/v1/me", headers=bearer(token_for(db_runtime, agent)))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": agent.id,
        "email": "ana@example.com",
        "display_name": "ana",
        "role": "agent",
        "groups": ["Billing", "Support"],
        "token_scope": "write",
    }


def test_a_revoked_token_is_refused(api_client: TestClient, db_runtime: Runtime, admin_token: str) -> None:
    with transaction(db_runtime.sessions) as session:
        row = session.get(ApiToken, _token_row(db_runtime, admin_token).id)
        assert row is not None
        row.revoked_at = utcnow()
    response = api_client.get("/api/v1/me", headers=bearer(admin_token))
    _assert_refused(
        response.status_code, response.json(), response.headers["www-authenticate"], says="revoked"
    )
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_an_expired_token_is_refused(api_client: TestClient, db_runtime: Runtime) -> None:
    secret = token_for(
        db_runtime, person(db_runtime, "ana@example.com"), expires_at=utcnow() + timedelta(days=1)
    )
    assert api_client.get("/api/v1/me", headers=bearer(secret)).status_code == 200
    with transaction(db_runtime.sessions) as session:
        row = session.get(ApiToken, _token_row(db_runtime, secret).id)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    response = api_client.get("/api/v1/me", headers=bearer(secret))
    _assert_refused(
        response.status_code, response.json(), response.headers["www-authenticate"], says="expired"
    )


def test_the_token_of_a_deactivated_person_is_refused(api_client: TestClient, db_runtime: Runtime) -> None:
    agent = person(db_runtime, "ana@example.com")
    secret = token_for(db_runtime, agent)
    with transaction(db_runtime.sessions) as session:
        row = session.get(User, agent.id)
        assert row is not None
        row.is_active = False
    response = api_client.get("/api/v1/tickets", headers=bearer(secret))
    _assert_refused(
        response.status_code, response.json(), response.headers["www-authenticate"], says="deactivated"
    )


def test_only_the_hash_and_a_short_prefix_of_a_token_are_stored(db_runtime: Runtime) -> None:
    agent = person(db_runtime, "ana@example.com")
    secret = token_for(db_runtime, agent)
    assert secret.startswith("pd_")
    assert len(secret) == 43
    row = _token_row(db_runtime, secret)
    assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert row.prefix == secret[:10]
    stored = [str(getattr(row, column)) for column in ("name", "token_hash", "prefix")]
    assert all(secret not in value and secret[10:] not in value for value in stored)


def test_last_used_is_written_at_most_once_a_minute(db_runtime: Runtime) -> None:
    agent = person(db_runtime, "ana@example.com")
    secret = token_for(db_runtime, agent)
    start = utcnow()
    with db_runtime.sessions() as session:
        assert authenticate(session, secret, now=start).user is not None
        session.commit()
        assert authenticate(session, secret, now=start + timedelta(seconds=30)).user is not None
        assert not session.dirty
        assert authenticate(session, secret, now=start + timedelta(seconds=61)).user is not None
        session.commit()
    assert _token_row(db_runtime, secret).last_used_at == start + timedelta(seconds=61)


def test_a_token_cannot_be_made_for_a_deactivated_person(db_runtime: Runtime) -> None:
    agent = person(db_runtime, "ana@example.com")
    with transaction(db_runtime.sessions) as session:
        row = session.get(User, agent.id)
        assert row is not None
        row.is_active = False
        with pytest.raises(ValueError, match="deactivated"):
            create_token(session, row, name="late")


def test_api_calls_update_last_used(api_client: TestClient, db_runtime: Runtime, admin_token: str) -> None:
    assert _token_row(db_runtime, admin_token).last_used_at is None
    api_client.get("/api/v1/me", headers=bearer(admin_token))
    assert _token_row(db_runtime, admin_token).last_used_at is not None


# -- cookies and CSRF --------------------------------------------------------------------------


def test_a_signed_in_browser_session_does_not_open_the_api(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    person(db_runtime, "ana@example.com", password=AGENT_PASSWORD)
    sign_in(api_client, "ana@example.com", AGENT_PASSWORD)
    assert api_client.get("/tickets").status_code == 200  # the session works for the web pages
    assert api_client.get("/api/v1/me").status_code == 401


def test_a_cookie_session_post_to_the_api_still_needs_the_csrf_token(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    person(db_runtime, "ana@example.com", password=AGENT_PASSWORD)
    sign_in(api_client, "ana@example.com", AGENT_PASSWORD)
    forged = api_client.post(f"/api/v1/tickets/{number}/notes", json={"body": "forged"})
    assert forged.status_code == 403
    assert "expired or was sent from another site" in forged.json()["detail"]
    # With the CSRF token the cookie still does not authenticate: the API answers only to tokens.
    csrf = csrf_from(api_client.get("/tickets").text)
    with_csrf = api_client.post(
        f"/api/v1/tickets/{number}/notes", json={"body": "still no"}, headers={"X-CSRF-Token": csrf}
    )
    assert with_csrf.status_code == 401


def test_a_bearer_call_needs_no_csrf_token_even_with_a_session_cookie(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    number = make_ticket(db_runtime, "Printer on fire")
    agent = person(db_runtime, "ana@example.com", password=AGENT_PASSWORD)
    sign_in(api_client, "ana@example.com", AGENT_PASSWORD)
    response = api_client.post(
        f"/api/v1/tickets/{number}/notes",
        json={"body": "from a script"},
        headers=bearer(token_for(db_runtime, agent)),
    )
    assert response.status_code == 201, response.text


def test_a_bearer_header_does_not_lift_csrf_from_web_forms(api_client: TestClient, admin_token: str) -> None:
    response = api_client.post("/logout", headers=bearer(admin_token), data={})
    assert response.status_code == 403


# -- logs ----------------------------------------------------------------------------------------


def test_tokens_never_reach_the_log(db_runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    secret = token_for(db_runtime, person(db_runtime, "ana@example.com"))
    assert secret not in redact(f"calling with {secret} now")
    assert secret not in redact(f"Authorization: Bearer {secret}")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "token %s leaked", (secret,), None)
    RedactingFilter().filter(record)
    assert secret not in record.getMessage()
    assert "pd_[redacted]" in record.getMessage() or "[redacted]" in record.getMessage()
