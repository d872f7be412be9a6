"""Each mailbox's token cache: refreshed through MSAL, rotated tokens kept, nothing readable at rest."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import text

from postdesk.db.models import Channel, MicrosoftApp
from postdesk.db.session import transaction
from postdesk.microsoft.connect import SignInError, check_id_token, current_registration
from postdesk.microsoft.identity import MicrosoftIdentity
from postdesk.microsoft.tokens import TokenError, acquire_access_token
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, FABRIKAM_TENANT_ID, RegisteredApp, SandboxDirectory
from postdesk.security.redact import configure_logging
from tests.microsoft365.conftest import ADELE, MEGAN, SignIn


def _refresh(runtime: Runtime, email: str, *, force: bool = True) -> str:
    with transaction(runtime.sessions) as session:
        registration = current_registration(session)
        assert registration is not None
        channel = session.query(Channel).filter_by(email=email).one()
        token = acquire_access_token(
            session, MicrosoftIdentity(runtime.settings, registration), channel, force_refresh=force
        )
        return token.value


def _refresh_tokens_of(directory: SandboxDirectory, client_id: str) -> set[str]:
    return {grant.token for grant in directory.refresh_tokens.values() if grant.client_id == client_id}


def test_a_refresh_stores_the_rotated_refresh_token(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    signin.connect(ADELE)
    with m365_runtime.sessions() as session:
        before = session.query(Channel).one().token_cache
    issued_before = _refresh_tokens_of(directory, entra_app.client_id)
    access_token = _refresh(m365_runtime, ADELE)
    assert access_token.count(".") == 2  # a JWT for the Outlook resource
    newest = _refresh_tokens_of(directory, entra_app.client_id) - issued_before
    assert len(newest) == 1
    with m365_runtime.sessions() as session:
        after = session.query(Channel).one().token_cache
    assert after != before
    assert after is not None and newest.pop() in after


def test_a_valid_access_token_is_reused_instead_of_refreshing_every_time(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    signin.connect(ADELE)
    first = _refresh(m365_runtime, ADELE, force=False)
    issued = _refresh_tokens_of(directory, entra_app.client_id)
    assert _refresh(m365_runtime, ADELE, force=False) == first
    assert _refresh_tokens_of(directory, entra_app.client_id) == issued


def test_rotating_the_client_secret_applies_to_every_mailbox_at_once(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    signin.connect(ADELE)
    signin.connect(MEGAN)
    new_secret = directory.add_client_secret(entra_app.client_id)
    del entra_app.client_secrets[0]  # the admin deletes the old secret in the portal
    with pytest.raises(TokenError) as refused:
        _refresh(m365_runtime, ADELE)
    assert "AADSTS7000215" in refused.value.reference
    with transaction(m365_runtime.sessions) as session:
        session.query(MicrosoftApp).one().client_secret = new_secret.value
    assert _refresh(m365_runtime, ADELE)
    assert _refresh(m365_runtime, MEGAN)


def test_a_revoked_sign_in_needs_reauthentication(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory
) -> None:
    signin.connect(ADELE)
    directory.revoke_refresh_tokens(ADELE)
    with pytest.raises(TokenError) as refused:
        _refresh(m365_runtime, ADELE)
    assert refused.value.explanation.channel_status == "needs_reauth"
    assert "AADSTS50173" in refused.value.reference


def test_no_token_or_secret_is_readable_in_the_database_or_the_logs(
    signin: SignIn,
    m365_runtime: Runtime,
    directory: SandboxDirectory,
    entra_app: RegisteredApp,
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure_logging("DEBUG")
    try:
        signin.connect(ADELE)
        access_token = _refresh(m365_runtime, ADELE)
        logging.getLogger("postdesk.test").debug("token response %s", {"access_token": access_token})
    finally:
        logging.getLogger().handlers.clear()
    secrets = {
        entra_app.client_secrets[0].value,
        access_token,
        *_refresh_tokens_of(directory, entra_app.client_id),
    }
    with m365_runtime.engine.connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    database = Path(m365_runtime.engine.url.database or "")
    stored = b"".join(path.read_bytes() for path in database.parent.glob(database.name + "*"))
    logs = capfd.readouterr()
    for secret in secrets:
        assert secret.encode() not in stored
        assert secret not in logs.err and secret not in logs.out


IDENTITY_CLAIMS = {
    "aud": "",
    "tid": CONTOSO_TENANT_ID,
    "oid": "0f1e2d3c-0000-0000-0000-000000000001",
    "preferred_username": "Adele.Vance@contoso.onmicrosoft.com",
    "name": "Adele Vance",
}


def _identity(runtime: Runtime, tenant: str) -> MicrosoftIdentity:
    app = MicrosoftApp(
        client_id="11111111-2222-3333-4444-555555555555",
        tenant=tenant,
        cloud="global",
        client_secret="x" * 40,
    )
    return MicrosoftIdentity(runtime.settings, app)


def _claims(identity: MicrosoftIdentity, **changes: str) -> dict[str, str]:
    claims = {
        **IDENTITY_CLAIMS,
        "aud": identity.registration.client_id,
        "iss": identity.expected_issuer(CONTOSO_TENANT_ID),
    }
    claims.update(changes)
    return claims


def test_the_id_token_is_accepted_when_tenant_audience_and_issuer_match(m365_runtime: Runtime) -> None:
    identity = _identity(m365_runtime, CONTOSO_TENANT_ID)
    account = check_id_token(identity, _claims(identity))
    assert (account.username, account.tenant_id) == ("adele.vance@contoso.onmicrosoft.com", CONTOSO_TENANT_ID)


@pytest.mark.parametrize(
    ("changes", "title"),
    [
        ({"aud": "99999999-2222-3333-4444-555555555555"}, "The sign-in was for another app"),
        ({"iss": "https://evil.example/" + CONTOSO_TENANT_ID + "/v2.0"}, "unexpected issuer"),
        ({"tid": FABRIKAM_TENANT_ID, "iss": "FABRIKAM"}, "The account belongs to another organisation"),
        ({"preferred_username": "", "email": ""}, "The account has no mailbox address"),
    ],
)
def test_the_id_token_is_refused_when_a_claim_is_wrong(
    m365_runtime: Runtime, changes: dict[str, str], title: str
) -> None:
    identity = _identity(m365_runtime, CONTOSO_TENANT_ID)
    if changes.get("iss") == "FABRIKAM":
        changes["iss"] = identity.expected_issuer(FABRIKAM_TENANT_ID)
    with pytest.raises(SignInError, match=title):
        check_id_token(identity, _claims(identity, **changes))


def test_a_multitenant_app_accepts_any_organisation(m365_runtime: Runtime) -> None:
    identity = _identity(m365_runtime, "organizations")
    claims = _claims(identity, tid=FABRIKAM_TENANT_ID, iss=identity.expected_issuer(FABRIKAM_TENANT_ID))
    assert check_id_token(identity, claims).tenant_id == FABRIKAM_TENANT_ID
