"""Token scopes (issue #9): a read-only token reads and is refused every change; a write token does
whatever its owner may, and no more. Chosen on the API tokens page or with `postdesk token create --scope`."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select

from postdesk.db.models import ApiToken, Article, OutboundMessage, Role, Ticket, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.security.api_tokens import TokenError, create_token, parse_scope, revoke_token, scope_allows
from tests.api.conftest import bearer, make_channel, make_ticket, person, quarantine
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in
from tests.support.cli import run_postdesk

SECRET = re.compile(r'value="(pd_[\w-]{40})"')
NEW_TICKET = {
    "customer_email": "jana.novak@example.org",
    "title": "Phone call: refund",
    "body": "Jana called about the refund.",
}


def scoped_token(runtime: Runtime, user: User, scope: str, *, name: str = "script") -> str:
    with transaction(runtime.sessions) as session:
        owner = session.get(User, user.id)
        assert owner is not None
        return create_token(session, owner, name=name, scope=scope).secret


def assert_read_only_refusal(response: Response) -> None:
    assert response.status_code == 403, response.text
    detail = response.json()["detail"]
    assert "read-only" in detail
    assert "--scope write" in detail and "/account/api-tokens" in detail  # how to get a write token
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]


def _writes(api_client: TestClient, number: int, headers: dict[str, str]) -> list[Response]:
    return [
        api_client.post("/api/v1/tickets", json=NEW_TICKET, headers=headers),
        api_client.patch(f"/api/v1/tickets/{number}", json={"state": "closed"}, headers=headers),
        api_client.post(f"/api/v1/tickets/{number}/replies", json={"body": "Refunded."}, headers=headers),
        api_client.post(f"/api/v1/tickets/{number}/notes", json={"body": "Approved."}, headers=headers),
    ]


# -- the API ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["read", "write"])
def test_me_tells_a_script_what_its_token_may_do(
    api_client: TestClient, db_runtime: Runtime, scope: str
) -> None:
    headers = bearer(scoped_token(db_runtime, person(db_runtime, "ana@example.com"), scope))
    answer = api_client.get("/api/v1/me", headers=headers)
    assert answer.status_code == 200
    assert answer.json()["token_scope"] == scope


def test_a_read_only_token_lists_and_gets_tickets(api_client: TestClient, db_runtime: Runtime) -> None:
    number = make_ticket(db_runtime, "Invoice charged twice")
    headers = bearer(scoped_token(db_runtime, person(db_runtime, "ana@example.com"), "read"))
    listing = api_client.get("/api/v1/tickets", headers=headers)
    assert listing.status_code == 200, listing.text
    assert [item["number"] for item in listing.json()["items"]] == [number]
    ticket = api_client.get(f"/api/v1/tickets/{number}", headers=headers)
    assert ticket.status_code == 200, ticket.text
    assert ticket.json()["title"] == "Invoice charged twice"


def test_a_read_only_token_cannot_create_change_reply_or_note_and_nothing_changes(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    number = make_ticket(db_runtime, "Invoice charged twice", channel_id=make_channel(db_runtime))
    headers = bearer(scoped_token(db_runtime, person(db_runtime, "ana@example.com"), "read"))
    for response in _writes(api_client, number, headers):
        assert_read_only_refusal(response)
    with db_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Ticket)) == 1
        assert session.scalar(select(func.count()).select_from(Article)) == 1
        assert session.scalar(select(func.count()).select_from(OutboundMessage)) == 0
        assert session.scalars(select(Ticket)).one().state == "new"


def test_a_write_token_can_create_change_reply_and_note(api_client: TestClient, db_runtime: Runtime) -> None:
    number = make_ticket(db_runtime, "Invoice charged twice", channel_id=make_channel(db_runtime))
    headers = bearer(scoped_token(db_runtime, person(db_runtime, "ana@example.com"), "write"))
    created, patched, replied, noted = _writes(api_client, number, headers)
    assert (created.status_code, patched.status_code) == (201, 200), created.text + patched.text
    assert (replied.status_code, noted.status_code) == (201, 201), replied.text + noted.text
    assert patched.json()["state"] == "closed"


def test_a_read_only_token_is_refused_before_the_body_is_validated(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    # A 422 listing the fields would tell a read-only script how to build a write it may not make.
    headers = bearer(scoped_token(db_runtime, person(db_runtime, "ana@example.com"), "read"))
    assert_read_only_refusal(api_client.post("/api/v1/tickets", json={}, headers=headers))


def test_an_agents_write_token_still_cannot_use_admin_endpoints(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    agent = person(db_runtime, "ana@example.com")
    message_id = quarantine(db_runtime, make_channel(db_runtime), b"Subject: x\r\n\r\nx", reason="too big")
    headers = bearer(scoped_token(db_runtime, agent, "write"))
    for response in (
        api_client.get("/api/v1/channels", headers=headers),
        api_client.get("/api/v1/quarantine", headers=headers),
        api_client.post(f"/api/v1/quarantine/{message_id}/reprocess", headers=headers),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["detail"] == "Only administrators can use this endpoint."


def test_an_admins_read_only_token_reads_admin_endpoints_but_cannot_reprocess(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    boss = person(db_runtime, "boss@example.com", role=Role.ADMIN)
    message_id = quarantine(db_runtime, make_channel(db_runtime), b"Subject: x\r\n\r\nx", reason="too big")
    headers = bearer(scoped_token(db_runtime, boss, "read"))
    assert api_client.get("/api/v1/channels", headers=headers).status_code == 200
    assert api_client.get("/api/v1/quarantine", headers=headers).json()["total"] == 1
    assert_read_only_refusal(api_client.post(f"/api/v1/quarantine/{message_id}/reprocess", headers=headers))


def test_a_revoked_read_only_token_is_401_not_403(api_client: TestClient, db_runtime: Runtime) -> None:
    number = make_ticket(db_runtime, "Invoice charged twice")
    secret = scoped_token(db_runtime, person(db_runtime, "ana@example.com"), "read")
    with transaction(db_runtime.sessions) as session:
        assert revoke_token(session, session.scalars(select(ApiToken.id)).one()) is not None
    for response in (
        api_client.get("/api/v1/tickets", headers=bearer(secret)),
        api_client.patch(f"/api/v1/tickets/{number}", json={"state": "closed"}, headers=bearer(secret)),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["detail"] == "This API token was revoked."


def test_a_token_created_without_a_scope_can_write_as_before(
    api_client: TestClient, db_runtime: Runtime
) -> None:
    with transaction(db_runtime.sessions) as session:
        owner = session.get(User, person(db_runtime, "ana@example.com").id)
        assert owner is not None
        created = create_token(session, owner, name="old script")
        assert created.token.scope == "write"
    response = api_client.post("/api/v1/tickets", json=NEW_TICKET, headers=bearer(created.secret))
    assert response.status_code == 201, response.text


# -- the rules on their own -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "get"])
def test_read_allows_the_safe_methods(method: str) -> None:
    assert scope_allows("read", method)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "post"])
def test_read_refuses_every_other_method_and_write_allows_it(method: str) -> None:
    assert not scope_allows("read", method)
    assert scope_allows("write", method)


@pytest.mark.parametrize("stored", ["admin", "WRITE", "", "write "])
def test_a_scope_this_version_does_not_know_fails_closed(stored: str) -> None:
    assert not scope_allows(stored, "POST")
    assert scope_allows(stored, "GET")


def test_parse_scope_accepts_the_two_scopes_and_explains_anything_else() -> None:
    assert (parse_scope("read"), parse_scope(" Write ")) == ("read", "write")
    with pytest.raises(TokenError, match=r"unknown scope 'admin'; choose read or write"):
        parse_scope("admin")
    with pytest.raises(TokenError, match="choose the token's access"):
        parse_scope("")


# -- the command line ------------------------------------------------------------------------------


def test_token_create_scope_read_is_listed_and_only_reads(
    runtime: Runtime, admin: User, client: TestClient
) -> None:
    created = run_postdesk(
        runtime.settings, "token", "create", admin.email, "--name", "Dashboard", "--scope", "read"
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert "(read)" in created.stderr
    assert client.get("/api/v1/tickets", headers=bearer(secret)).status_code == 200
    assert_read_only_refusal(client.post("/api/v1/tickets", json=NEW_TICKET, headers=bearer(secret)))
    listed = run_postdesk(runtime.settings, "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["scope"]) == ("Dashboard", "read")
    table = run_postdesk(runtime.settings, "token", "list")
    assert "Scope" in table.stdout
    # Narrow terminals shorten the other cells; the scope sits between the token and its status.
    assert re.search(r"│ pd_\S+\s*│ read\s*│ active\s*│", table.stdout), table.stdout


def test_token_create_without_scope_makes_a_write_token(runtime: Runtime, admin: User) -> None:
    created = run_postdesk(runtime.settings, "token", "create", admin.email, "--name", "CRM", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["scope"] == "write"


def test_token_create_refuses_an_unknown_scope_with_exit_code_2(runtime: Runtime, admin: User) -> None:
    result = run_postdesk(runtime.settings, "token", "create", admin.email, "--name", "x", "--scope", "admin")
    assert result.returncode == 2
    assert "--scope: unknown scope 'admin'; choose read or write" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert json.loads(run_postdesk(runtime.settings, "token", "list", "--json").stdout) == []


# -- the API tokens page ---------------------------------------------------------------------------


def _post_form(client: TestClient, **fields: str) -> Response:
    page = client.get("/account/api-tokens")
    response: Response = client.post(
        "/account/api-tokens", data={**fields, "csrf_token": csrf_from(page.text)}
    )
    return response


def test_the_form_offers_read_only_first_and_chooses_nothing_for_you(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get("/account/api-tokens").text
    select_html = re.search(r'<select id="token-scope" name="scope" required[^>]*>(.*?)</select>', page, re.S)
    assert select_html is not None, page
    options = re.findall(r'<option value="([^"]*)"([^>]*)>([^<]*)</option>', select_html.group(1))
    assert [(value, label) for value, _, label in options] == [
        ("", "Choose…"),
        ("read", "Read only"),
        ("write", "Read and write"),
    ]
    assert [value for value, attributes, _ in options if "selected" in attributes] == [""]


def test_a_read_only_token_made_on_the_page_is_listed_and_only_reads(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    response = _post_form(client, name="Dashboard", expires="30", scope="read")
    assert response.status_code == 201, response.text
    found = SECRET.search(response.text)
    assert found is not None
    secret = found.group(1)
    assert client.get("/api/v1/tickets", headers=bearer(secret)).status_code == 200
    assert_read_only_refusal(client.post("/api/v1/tickets", json=NEW_TICKET, headers=bearer(secret)))
    row = re.search(r'<tr id="token-\d+">(.*?)</tr>', client.get("/account/api-tokens").text, re.S)
    assert row is not None
    cells = [
        re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    ]
    assert cells[:1] + cells[2:3] == ["Dashboard", "Read only"]


@pytest.mark.parametrize(
    ("scope", "reason"),
    [
        (None, "choose the token&#39;s access: read only, or read and write"),
        ("admin", "unknown scope &#39;admin&#39;; choose read or write"),
    ],
)
def test_the_page_refuses_a_missing_or_unknown_scope_and_keeps_the_form(
    client: TestClient, admin: User, scope: str | None, reason: str
) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    fields = {"name": "Dashboard", "expires": "365"} | ({"scope": scope} if scope is not None else {})
    response = _post_form(client, **fields)
    assert response.status_code == 422
    assert f"The token was not created: {reason}." in response.text
    assert SECRET.search(response.text) is None
    assert 'value="Dashboard"' in response.text
    assert '<option value="365" selected>' in response.text
    assert "You have no API tokens." in response.text
