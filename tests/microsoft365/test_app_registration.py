"""The "Connect Microsoft 365 App" form, the certificate credential, admin consent and the CLI."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.testclient import TestClient
from sqlalchemy import text

from postdesk.db.models import MicrosoftApp, User
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in
from tests.microsoft365.conftest import ADELE, BASE_URL, SignIn, channels
from tests.support.cli import run_postdesk

GOOD_CLIENT_ID = "1b7e8f3a-1111-2222-3333-444455556666"
GOOD_SECRET = "Abc8Q~k2Jr0sT4vX6zB8dF0hK2mP4rT6vY8aC0eG"


@pytest.fixture
def admin_client(m365_runtime: Runtime, m365_admin: User) -> Iterator[TestClient]:
    with TestClient(create_app(m365_runtime), base_url=BASE_URL) as client:
        sign_in(client, m365_admin.email, ADMIN_PASSWORD)
        yield client


def save_form(client: TestClient, **fields: str) -> str:
    token = csrf_from(client.get("/channels").text)
    values = {
        "client_id": GOOD_CLIENT_ID,
        "tenant": "contoso.onmicrosoft.com",
        "client_secret": GOOD_SECRET,
        "cloud": "global",
        "account_types": "single",
        "csrf_token": token,
    }
    values.update(fields)
    return html.unescape(client.post("/channels/microsoft365/app", data=values).text)


def test_the_form_shows_the_callback_url_and_the_permissions_to_grant(admin_client: TestClient) -> None:
    page = html.unescape(admin_client.get("/channels").text)
    assert 'value="http://127.0.0.1:8025/auth/microsoft365/callback"' in page
    assert "Web" in page and "platform" in page
    for permission in ("openid", "email", "profile", "offline_access", "IMAP.AccessAsUser.All", "SMTP.Send"):
        assert f"<code>{permission}</code>" in page
    assert "Personal Microsoft accounts only" in page and "not supported" in page


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"client_id": "not-a-guid"}, "The Application (client) ID is a GUID"),
        (
            {"client_secret": "9a8b7c6d-1111-2222-3333-444455556666"},
            "You pasted the Secret ID; paste the secret Value",
        ),
        ({"tenant": ""}, "AADSTS50194"),
        ({"tenant": "consumers"}, "“Personal Microsoft accounts only” is not supported"),
        ({"client_secret": ""}, "secret"),
    ],
)
def test_classic_mistakes_are_caught_before_they_become_aadsts_errors(
    admin_client: TestClient, m365_runtime: Runtime, fields: dict[str, str], message: str
) -> None:
    page = save_form(admin_client, **fields)
    assert message in page
    with m365_runtime.sessions() as session:
        assert session.query(MicrosoftApp).count() == 0


def test_a_plain_http_public_url_is_saved_with_a_warning(m365_settings: object, tmp_path: Path) -> None:
    from postdesk.runtime import bootstrap
    from tests.conftest import add_user

    settings = m365_settings.model_copy(update={"base_url": "http://helpdesk.example.com"})  # type: ignore[attr-defined]
    runtime = bootstrap(settings, apply_migrations=True)
    from postdesk.db.models import Role

    add_user(runtime, "admin@example.com", ADMIN_PASSWORD, role=Role.ADMIN)
    with TestClient(create_app(runtime), base_url="http://helpdesk.example.com") as client:
        sign_in(client, "admin@example.com", ADMIN_PASSWORD)
        page = save_form(client)
    assert "Use https" in page
    assert "The app registration was saved" in page


def test_saving_keeps_the_stored_secret_when_the_field_is_left_empty(
    admin_client: TestClient, m365_runtime: Runtime
) -> None:
    save_form(admin_client)
    save_form(admin_client, client_secret="", tenant=CONTOSO_TENANT_ID, secret_expires="2027-06-30")
    with m365_runtime.sessions() as session:
        app = session.query(MicrosoftApp).one()
        assert (app.client_secret, app.tenant) == (GOOD_SECRET, CONTOSO_TENANT_ID)
        assert app.client_secret_expires_at is not None
        assert app.client_secret_expires_at.date().isoformat() == "2027-06-30"
    assert GOOD_SECRET not in admin_client.get("/channels").text


def test_a_generated_certificate_signs_in_without_any_secret(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    token = csrf_from(signin.desk.get("/channels").text)
    signin.desk.post("/channels/microsoft365/certificate", data={"csrf_token": token})
    download = signin.desk.get("/channels/microsoft365/certificate.cer")
    assert download.headers["content-disposition"] == 'attachment; filename="postdesk.cer"'
    certificate = x509.load_der_x509_certificate(download.content)
    directory.add_certificate(entra_app.client_id, download.content)
    signin.desk.post(
        "/channels/microsoft365/credential", data={"csrf_token": token, "credential": "certificate"}
    )
    assert (
        'Signing in with: <strong id="credential-kind">the certificate' in signin.desk.get("/channels").text
    )
    entra_app.client_secrets.clear()  # the admin deletes the secret in the portal
    with m365_runtime.sessions() as session:
        stored = session.query(MicrosoftApp).one()
        assert stored.certificate_private_key is not None and "PRIVATE KEY" in stored.certificate_private_key
        raw_key = session.execute(text("SELECT certificate_private_key FROM microsoft_apps")).scalar_one()
        assert raw_key.startswith("pd1:")
    assert certificate.not_valid_after_utc > certificate.not_valid_before_utc
    assert signin.connect(ADELE).status_code == 303
    assert [c.email for c in channels(m365_runtime)] == [ADELE]


def test_a_new_certificate_is_not_used_until_the_admin_switches_to_it(
    signin: SignIn, m365_runtime: Runtime
) -> None:
    token = csrf_from(signin.desk.get("/channels").text)
    signin.desk.post("/channels/microsoft365/certificate", data={"csrf_token": token})
    # Not uploaded to the app registration yet: the secret must keep working.
    assert signin.connect(ADELE).status_code == 303
    with m365_runtime.sessions() as session:
        assert session.query(MicrosoftApp).one().credential_kind == "secret"


def test_admin_consent_goes_to_the_tenant_adminconsent_endpoint_and_comes_back(signin: SignIn) -> None:
    start = signin.desk.get("/channels/microsoft365/admin-consent", follow_redirects=False)
    location = start.headers["location"]
    assert "/contoso.onmicrosoft.com/v2.0/adminconsent?" in location
    page = signin.browser.open(location)
    page = signin.browser.press(page, login="megan.bowen@contoso.onmicrosoft.com", decision="accept")
    assert page.status_code == 302, page.text
    back = signin.desk.get(page.headers["location"].replace(BASE_URL, ""), follow_redirects=False)
    assert back.headers["location"] == "/channels?notice=consented"


def test_enable_disable_and_delete_with_confirmation(signin: SignIn, m365_runtime: Runtime) -> None:
    signin.connect(ADELE)
    [channel] = channels(m365_runtime)
    token = csrf_from(signin.desk.get("/channels").text)
    signin.desk.post(f"/channels/{channel.id}/disable", data={"csrf_token": token})
    assert channels(m365_runtime)[0].status.value == "disabled"
    signin.desk.post(f"/channels/{channel.id}/enable", data={"csrf_token": token})
    assert channels(m365_runtime)[0].status.value == "ok"
    refused = signin.desk.post(f"/channels/{channel.id}/delete", data={"csrf_token": token, "confirm": "yes"})
    assert refused.status_code == 422
    signin.desk.post(f"/channels/{channel.id}/delete", data={"csrf_token": token, "confirm": ADELE})
    assert channels(m365_runtime) == []


def test_the_cli_sets_and_shows_the_app_without_printing_the_secret(
    m365_runtime: Runtime, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(GOOD_SECRET + "\n")
    result = run_postdesk(
        m365_runtime.settings,
        "microsoft365",
        "app",
        "set",
        "--client-id",
        GOOD_CLIENT_ID,
        "--tenant",
        "Contoso.onmicrosoft.com",
        "--client-secret-file",
        str(secret_file),
        "--secret-expires",
        "2027-01-31",
    )
    assert result.returncode == 0, result.stderr
    assert "auth/microsoft365/callback" in result.stdout
    shown = run_postdesk(m365_runtime.settings, "microsoft365", "app", "show", "--json")
    app = json.loads(shown.stdout)
    assert app["client_id"] == GOOD_CLIENT_ID
    assert app["tenant"] == "contoso.onmicrosoft.com"
    assert app["credential"] == "secret"
    assert GOOD_SECRET not in shown.stdout


def test_the_cli_refuses_a_pasted_secret_id(m365_runtime: Runtime, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("9a8b7c6d-1111-2222-3333-444455556666")
    result = run_postdesk(
        m365_runtime.settings,
        "microsoft365",
        "app",
        "set",
        "--client-id",
        GOOD_CLIENT_ID,
        "--tenant",
        "contoso.onmicrosoft.com",
        "--client-secret-file",
        str(secret_file),
    )
    assert result.returncode == 1
    assert "Secret ID" in result.stderr


def test_channel_list_json_has_the_documented_fields(signin: SignIn, m365_runtime: Runtime) -> None:
    signin.connect(ADELE)
    result = run_postdesk(m365_runtime.settings, "channel", "list", "--json")
    assert result.returncode == 0, result.stderr
    [channel] = json.loads(result.stdout)
    assert {"id", "email", "transport", "status", "last_fetch_at", "last_error"} <= set(channel)
    assert (channel["email"], channel["transport"], channel["status"]) == (ADELE, "imap", "ok")
