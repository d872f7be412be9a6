"""The "API tokens" page: a signed-in person creates (seen once), lists and revokes their own tokens."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from postdesk.db.models import Role, User
from postdesk.runtime import Runtime
from tests.api.conftest import bearer, person, token_for
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, csrf_from, sign_in

SECRET = re.compile(r'value="(pd_[\w-]{40})"')


def _create(client: TestClient, name: str, expires: str = "90", scope: str = "write") -> str:
    page = client.get("/account/api-tokens")
    form = {"name": name, "expires": expires, "scope": scope, "csrf_token": csrf_from(page.text)}
    response = client.post("/account/api-tokens", data=form)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    found = SECRET.search(response.text)
    assert found is not None, response.text
    return found.group(1)


def test_every_signed_in_person_finds_the_page_in_the_nav(client: TestClient, runtime: Runtime) -> None:
    person(runtime, "ana@example.com", password=AGENT_PASSWORD)
    sign_in(client, "ana@example.com", AGENT_PASSWORD)
    assert 'href="/account/api-tokens"' in client.get("/tickets").text
    assert client.get("/account/api-tokens").status_code == 200


def test_a_created_token_is_shown_once_and_works(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    secret = _create(client, "CRM sync")
    assert client.get("/api/v1/me", headers=bearer(secret)).json()["email"] == admin.email
    again = client.get("/account/api-tokens").text
    assert secret not in again
    assert "CRM sync" in again
    assert f"{secret[:10]}…" in again


def test_the_list_shows_last_use_and_expiry(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    secret = _create(client, "Forever", expires="never")
    client.get("/api/v1/me", headers=bearer(secret))
    row = re.search(r'<tr id="token-\d+">(.*?)</tr>', client.get("/account/api-tokens").text, re.S)
    assert row is not None
    cells = [
        re.sub(r"<[^>]+>", "", cell).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    ]
    assert cells[0] == "Forever"
    assert cells[2] == "Read and write"  # access
    assert cells[4].endswith("UTC")  # last used
    assert cells[5] == "never"  # expires
    assert cells[6] == "active"


def test_revoking_on_the_page_shuts_the_token_out(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    secret = _create(client, "old")
    page = client.get("/account/api-tokens").text
    action = re.search(r'action="(/account/api-tokens/\d+/revoke)"', page)
    assert action is not None
    response = client.post(action.group(1), data={"csrf_token": csrf_from(page)}, follow_redirects=False)
    assert response.status_code == 303
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 401
    assert "revoked" in client.get("/account/api-tokens").text


def test_nobody_sees_or_revokes_someone_elses_token(
    client: TestClient, runtime: Runtime, admin: User
) -> None:
    theirs = person(runtime, "ana@example.com", role=Role.AGENT)
    secret = token_for(runtime, theirs, name="Ana's script")
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get("/account/api-tokens").text
    assert "Ana&#39;s script" not in page and "Ana's script" not in page
    response = client.post("/account/api-tokens/1/revoke", data={"csrf_token": csrf_from(page)})
    assert response.status_code == 404
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 200


def test_creating_a_token_needs_the_csrf_token(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    response = client.post("/account/api-tokens", data={"name": "forged"})
    assert response.status_code == 403


def test_a_token_needs_a_name(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get("/account/api-tokens")
    response = client.post("/account/api-tokens", data={"name": " ", "csrf_token": csrf_from(page.text)})
    assert response.status_code == 422
    assert "give the token a name" in response.text
    assert SECRET.search(response.text) is None


def test_signed_out_visitors_are_sent_to_the_login_page(client: TestClient) -> None:
    response = client.get("/account/api-tokens", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login")
