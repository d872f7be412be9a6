"""Adding Microsoft 365 mailboxes by signing in, against the sandbox identity platform."""

from __future__ import annotations

from fastapi.testclient import TestClient

from postdesk.db.models import ChannelEvent, ChannelStatus
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID
from tests.microsoft365.conftest import ADELE, MEGAN, SignIn, channels


def test_signing_in_connects_the_mailbox(signin: SignIn, m365_runtime: Runtime) -> None:
    response = signin.connect(ADELE)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/channels?notice=connected")
    [channel] = channels(m365_runtime)
    assert (channel.email, channel.display_name, channel.status) == (ADELE, "Adele Vance", ChannelStatus.OK)
    assert channel.tenant_id == CONTOSO_TENANT_ID
    assert channel.account_oid
    assert channel.connected_at is not None
    page = signin.desk.get("/channels").text
    assert ADELE in page and "Connected" in page


def test_any_number_of_mailboxes_can_be_added(signin: SignIn, m365_runtime: Runtime) -> None:
    signin.connect(ADELE)
    signin.connect(MEGAN)
    signin.connect("support@contoso.onmicrosoft.com")
    assert [c.email for c in channels(m365_runtime)] == [ADELE, MEGAN, "support@contoso.onmicrosoft.com"]


def test_the_authorize_request_uses_pkce_state_nonce_and_the_outlook_scopes(signin: SignIn) -> None:
    from urllib.parse import parse_qs, urlsplit

    url = signin.authorize_url("?login_hint=adele.vance%40contoso.onmicrosoft.com")
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()}
    # MSAL takes the endpoint from the tenant's discovery document, which names the tenant by GUID.
    assert parts.path == f"/{CONTOSO_TENANT_ID}/oauth2/v2.0/authorize"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) >= 43
    assert query["state"] and query["nonce"]
    assert query["prompt"] == "select_account"
    assert query["login_hint"] == ADELE
    assert query["redirect_uri"] == "http://127.0.0.1:8025/auth/microsoft365/callback"
    scopes = set(query["scope"].split())
    assert {
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
        "offline_access",
        "openid",
        "profile",
        "email",
    } <= scopes


def test_reauthenticating_as_the_same_mailbox_keeps_the_channel(
    signin: SignIn, m365_runtime: Runtime
) -> None:
    signin.connect(ADELE)
    [channel] = channels(m365_runtime)
    response = signin.connect(ADELE, query=f"?channel={channel.id}")
    assert response.headers["location"].startswith("/channels?notice=reauthenticated")
    [again] = channels(m365_runtime)
    assert again.id == channel.id
    assert again.token_cache != channel.token_cache
    with m365_runtime.sessions() as session:
        kinds = [e.kind for e in session.query(ChannelEvent).order_by(ChannelEvent.id)]
    assert kinds == ["connected", "reauthenticated"]


def test_reauthenticating_as_another_account_is_refused(signin: SignIn, m365_runtime: Runtime) -> None:
    signin.connect(ADELE)
    [channel] = channels(m365_runtime)
    response = signin.connect(MEGAN, query=f"?channel={channel.id}")
    assert response.status_code == 400
    assert "You signed in as a different mailbox" in response.text
    assert f"This channel is {ADELE}, but you signed in as {MEGAN}" in response.text
    [unchanged] = channels(m365_runtime)
    assert (unchanged.email, unchanged.account_oid, unchanged.token_cache) == (
        ADELE,
        channel.account_oid,
        channel.token_cache,
    )


def test_a_state_that_postdesk_never_issued_is_refused(signin: SignIn, m365_runtime: Runtime) -> None:
    params = signin.at_microsoft(ADELE)
    response = signin.back_at_postdesk({**params, "state": "forged-state-value"})
    assert response.status_code == 400
    assert "This sign-in was not started here" in response.text
    assert channels(m365_runtime) == []


def test_a_missing_state_is_refused(signin: SignIn) -> None:
    params = signin.at_microsoft(ADELE)
    del params["state"]
    response = signin.back_at_postdesk(params)
    assert response.status_code == 400
    assert "has no state" in response.text


def test_a_replayed_callback_is_refused(signin: SignIn, m365_runtime: Runtime) -> None:
    params = signin.at_microsoft(ADELE)
    assert signin.back_at_postdesk(params).status_code == 303
    replay = signin.back_at_postdesk(params)
    assert replay.status_code == 400
    assert "already used" in replay.text


def test_a_callback_in_another_browser_session_is_refused(
    signin: SignIn, m365_runtime: Runtime, desk: TestClient
) -> None:
    from postdesk.db.models import Role
    from postdesk.web.app import create_app
    from tests.conftest import add_user, sign_in

    params = signin.at_microsoft(ADELE)
    add_user(m365_runtime, "other.admin@example.com", "other-admin-password", role=Role.ADMIN)
    with TestClient(create_app(m365_runtime), base_url="http://127.0.0.1:8025") as other:
        sign_in(other, "other.admin@example.com", "other-admin-password")
        response = other.get("/auth/microsoft365/callback", params=params, follow_redirects=False)
    assert response.status_code == 400
    assert "not started here" in response.text
    assert channels(m365_runtime) == []


def test_a_user_of_another_tenant_is_stopped_at_microsoft_and_nothing_connects(
    signin: SignIn, m365_runtime: Runtime
) -> None:
    page = signin.browser.open(signin.authorize_url())
    page = signin.browser.use_another_account(page, "alex.wilber@fabrikam.onmicrosoft.com")
    # Microsoft shows AADSTS50020 on its own page; the browser never comes back to Postdesk.
    assert page.status_code == 400
    assert "AADSTS50020" in page.text
    assert channels(m365_runtime) == []


def test_the_callback_needs_an_admin_session(signin: SignIn, m365_runtime: Runtime) -> None:
    params = signin.at_microsoft(ADELE)
    signin.desk.cookies.delete("postdesk_session")
    response = signin.back_at_postdesk(params)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/login?next=/auth/microsoft365/callback")
    assert channels(m365_runtime) == []
