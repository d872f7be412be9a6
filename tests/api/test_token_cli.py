"""``postdesk token create|list|revoke`` as an operator runs them; the token they print works at once."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from postdesk.db.models import User
from postdesk.runtime import Runtime
from tests.api.conftest import bearer
from tests.support.cli import run_postdesk


def test_token_create_prints_a_token_once_that_opens_the_api(
    runtime: Runtime, admin: User, client: TestClient
) -> None:
    result = run_postdesk(runtime.settings, "token", "create", admin.email, "--name", "CRM sync")
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert secret.startswith("pd_") and len(secret) == 43
    assert "cannot be shown again" in result.stderr
    assert client.get("/api/v1/me", headers=bearer(secret)).json()["email"] == admin.email


def test_token_create_json_and_list_json_never_show_the_secret_again(runtime: Runtime, admin: User) -> None:
    created = run_postdesk(
        runtime.settings,
        "token",
        "create",
        admin.email,
        "--name",
        "Nightly export",
        "--expires-days",
        "30",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)
    assert token["token"].startswith(token["prefix"])
    assert (token["user"], token["name"], token["status"]) == (admin.email, "Nightly export", "active")
    assert token["expires_at"] is not None
    listed = run_postdesk(runtime.settings, "token", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert set(row) == {
        "id", "user", "name", "prefix", "scope", "status", "created_at", "expires_at", "last_used_at",
        "revoked_at",
    }  # fmt: skip
    assert token["token"] not in listed.stdout
    assert row["id"] == token["id"]


def test_token_revoke_shuts_the_token_out(runtime: Runtime, admin: User, client: TestClient) -> None:
    token = json.loads(
        run_postdesk(runtime.settings, "token", "create", admin.email, "--name", "old", "--json").stdout
    )
    revoked = run_postdesk(runtime.settings, "token", "revoke", str(token["id"]))
    assert revoked.returncode == 0, revoked.stderr
    assert f"Revoked token {token['id']} (old) of {admin.email}." in revoked.stdout
    assert client.get("/api/v1/me", headers=bearer(token["token"])).status_code == 401
    [row] = json.loads(run_postdesk(runtime.settings, "token", "list", "--json").stdout)
    assert row["status"] == "revoked"


def test_token_commands_explain_unknown_people_and_tokens(runtime: Runtime, admin: User) -> None:
    nobody = run_postdesk(runtime.settings, "token", "create", "nobody@example.com", "--name", "x")
    assert nobody.returncode == 1
    assert "there is no user nobody@example.com" in nobody.stderr
    unnamed = run_postdesk(runtime.settings, "token", "create", admin.email, "--name", "  ")
    assert unnamed.returncode == 1
    assert "give the token a name" in unnamed.stderr
    missing = run_postdesk(runtime.settings, "token", "revoke", "999")
    assert missing.returncode == 1
    assert "no API token with ID 999" in missing.stderr
    assert "Traceback" not in nobody.stderr + unnamed.stderr + missing.stderr


def test_token_commands_explain_themselves_with_help(runtime: Runtime) -> None:
    for command in (["token"], ["token", "create"], ["token", "list"], ["token", "revoke"]):
        result = run_postdesk(runtime.settings, *command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
