"""The sandbox identity platform, exercised with real MSAL for Python and a scripted browser.

Each test checks one documented behaviour of the Microsoft identity platform v2.0 that Postdesk
depends on: discovery, the auth code flow with PKCE, refresh token rotation, client credentials with
secrets and certificates, and Microsoft's error answers (AADSTS numbers included).
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import requests
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from postdesk.sandbox import (
    CONTOSO_TENANT_ID,
    FABRIKAM_TENANT_ID,
    RegisteredApp,
    SandboxDirectory,
    SandboxServer,
    ensure_server_certificate,
)
from postdesk.sandbox.identity import ADELE_OID, new_client_secret_value
from tests.support.sandbox_browser import Browser

from .conftest import OUTLOOK_SCOPES, REDIRECT_URI, MsalFactory, callback_parameters

# MSAL recommends form_post on every auth code flow; these tests use both response modes on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:response_mode='form_post' is recommended:UserWarning")

ADELE = "adele.vance@contoso.onmicrosoft.com"
ALEX = "alex.wilber@fabrikam.onmicrosoft.com"


def sign_in_with_msal(
    make_msal: MsalFactory, browser: Browser, app: RegisteredApp, *, upn: str = ADELE, **flow_options: Any
) -> tuple[Any, dict[str, Any]]:
    """Run MSAL's auth code flow through the sandbox pages; return the MSAL app and its result."""
    client = make_msal(app)
    flow = client.initiate_auth_code_flow(
        scopes=OUTLOOK_SCOPES, redirect_uri=REDIRECT_URI, prompt="select_account", **flow_options
    )
    result = client.acquire_token_by_auth_code_flow(flow, browser.sign_in(flow["auth_uri"], upn=upn))
    return client, result


def verified_claims(http_session: requests.Session, sandbox: SandboxServer, token: str, audience: str) -> Any:
    keys = http_session.get(f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/discovery/v2.0/keys").json()["keys"]
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in keys if k["kid"] == kid)
    return jwt.decode(token, key.key, algorithms=["RS256"], audience=audience)


def auth_uri(
    sandbox: SandboxServer, app: RegisteredApp, *, tenant: str = CONTOSO_TENANT_ID, **params: str
) -> str:
    query = {
        "client_id": app.client_id,
        "response_type": "code",
        "redirect_uri": REDIRECT_URI,
        "scope": " ".join([*OUTLOOK_SCOPES, "openid", "offline_access"]),
        "state": "s-123",
        **params,
    }
    return f"{sandbox.base_url}/{tenant}/oauth2/v2.0/authorize?{urlencode(query)}"


def token_endpoint(sandbox: SandboxServer, tenant: str = CONTOSO_TENANT_ID) -> str:
    return f"{sandbox.base_url}/{tenant}/oauth2/v2.0/token"


def assert_error(result: dict[str, Any], error: str, aadsts: int) -> None:
    assert result.get("error") == error, result
    assert result.get("error_codes") == [aadsts], result
    assert result["error_description"].startswith(f"AADSTS{aadsts}: "), result


# -- discovery ------------------------------------------------------------------------------------


def test_it_publishes_openid_configuration_with_a_tenant_placeholder_for_common(
    sandbox: SandboxServer, http_session: requests.Session
) -> None:
    config = http_session.get(f"{sandbox.base_url}/common/v2.0/.well-known/openid-configuration").json()

    assert config["issuer"] == f"{sandbox.base_url}/{{tenantid}}/v2.0"
    assert config["authorization_endpoint"] == f"{sandbox.base_url}/common/oauth2/v2.0/authorize"
    assert config["token_endpoint"] == f"{sandbox.base_url}/common/oauth2/v2.0/token"
    assert config["jwks_uri"] == f"{sandbox.base_url}/common/discovery/v2.0/keys"
    assert config["tenant_region_scope"] is None
    assert "form_post" in config["response_modes_supported"]
    assert config["id_token_signing_alg_values_supported"] == ["RS256"]


def test_it_answers_a_tenant_named_by_domain_with_guid_based_metadata(
    sandbox: SandboxServer, http_session: requests.Session
) -> None:
    url = f"{sandbox.base_url}/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration"
    config = http_session.get(url).json()

    assert config["issuer"] == f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/v2.0"
    assert config["token_endpoint"] == token_endpoint(sandbox)


def test_it_answers_an_unknown_tenant_with_aadsts90002(
    sandbox: SandboxServer, http_session: requests.Session
) -> None:
    response = http_session.get(f"{sandbox.base_url}/nowhere.example/v2.0/.well-known/openid-configuration")

    assert response.status_code == 400
    assert_error(response.json(), "invalid_tenant", 90002)
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= response.json().keys()


def test_it_publishes_the_signing_key_as_a_jwks(
    sandbox: SandboxServer, http_session: requests.Session
) -> None:
    (key,) = http_session.get(f"{sandbox.base_url}/common/discovery/v2.0/keys").json()["keys"]

    assert key["kty"] == "RSA" and key["use"] == "sig"
    assert key["kid"] == key["x5t"] == sandbox.directory.signing_key.kid
    assert {"n", "e", "x5c"} <= key.keys()


def test_it_serves_instance_discovery_that_msal_accepts(
    sandbox: SandboxServer, web_app: RegisteredApp, make_msal: MsalFactory, http_session: requests.Session
) -> None:
    client = make_msal(web_app, instance_discovery=f"{sandbox.base_url}/common/discovery/instance")

    assert "access_token" in client.acquire_token_for_client(["https://outlook.office.com/.default"])
    unknown = http_session.get(
        f"{sandbox.base_url}/common/discovery/instance",
        params={
            "api-version": "1.1",
            "authorization_endpoint": "https://elsewhere.example/common/oauth2/v2.0/authorize",
        },
    )
    assert unknown.json()["error"] == "invalid_instance"


# -- authorization code flow ----------------------------------------------------------------------


def test_it_signs_a_user_in_through_msal_and_issues_outlook_tokens(
    sandbox: SandboxServer,
    web_app: RegisteredApp,
    make_msal: MsalFactory,
    browser: Browser,
    http_session: requests.Session,
) -> None:
    client, result = sign_in_with_msal(make_msal, browser, web_app)

    assert result["token_type"] == "Bearer" and result["expires_in"] > 3000
    assert result["scope"] == " ".join(OUTLOOK_SCOPES)
    identity = result["id_token_claims"]
    assert identity["aud"] == web_app.client_id
    assert identity["iss"] == f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/v2.0"
    assert (identity["tid"], identity["oid"], identity["ver"]) == (CONTOSO_TENANT_ID, ADELE_OID, "2.0")
    assert (identity["preferred_username"], identity["name"]) == (ADELE, "Adele Vance")
    assert identity["nonce"]
    access = verified_claims(http_session, sandbox, result["access_token"], "https://outlook.office.com")
    assert access["iss"] == f"https://sts.windows.net/{CONTOSO_TENANT_ID}/"
    assert access["scp"] == "IMAP.AccessAsUser.All SMTP.Send"
    assert (access["upn"], access["unique_name"], access["appid"], access["ver"]) == (
        ADELE,
        ADELE,
        web_app.client_id,
        "1.0",
    )
    (account,) = client.get_accounts()
    assert account["home_account_id"] == f"{ADELE_OID}.{CONTOSO_TENANT_ID}"


def test_it_returns_client_info_in_the_redirect_only_when_asked(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    plain = browser.sign_in(auth_uri(sandbox, web_app), upn=ADELE)
    asked = browser.sign_in(auth_uri(sandbox, web_app, client_info="1"), upn=ADELE)

    assert {"code", "state", "session_state"} <= plain.keys() and "client_info" not in plain
    decoded = json.loads(base64.urlsafe_b64decode(asked["client_info"] + "=="))
    assert decoded == {"uid": ADELE_OID, "utid": CONTOSO_TENANT_ID}


def test_it_rotates_the_refresh_token_and_keeps_the_old_one_valid(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    client, first = sign_in_with_msal(make_msal, browser, web_app)
    (account,) = client.get_accounts()

    refreshed = client.acquire_token_silent_with_error(OUTLOOK_SCOPES, account, force_refresh=True)

    assert refreshed["access_token"] != first["access_token"]
    assert refreshed["refresh_token"] != first["refresh_token"]
    # Microsoft does not revoke a refresh token on use: the first one still works.
    again = make_msal(web_app).acquire_token_by_refresh_token(first["refresh_token"], OUTLOOK_SCOPES)
    assert "access_token" in again, again


def test_it_narrows_scopes_on_refresh(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    _, first = sign_in_with_msal(make_msal, browser, web_app)

    narrowed = make_msal(web_app).acquire_token_by_refresh_token(first["refresh_token"], OUTLOOK_SCOPES[1:])

    assert narrowed["scope"] == "https://outlook.office.com/SMTP.Send"


def test_it_skips_the_consent_page_once_the_user_has_consented(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    browser.sign_in(auth_uri(sandbox, web_app), upn=ADELE)

    second = browser.press(browser.open(auth_uri(sandbox, web_app)), login=ADELE)

    assert "code" in callback_parameters(second)


def test_it_redirects_with_access_denied_when_the_user_cancels_consent(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    answer = browser.sign_in(auth_uri(sandbox, web_app), upn=ADELE, consent="cancel")

    assert answer["error"] == "access_denied"
    assert answer["error_description"].startswith("AADSTS65004: ")
    assert answer["state"] == "s-123" and "code" not in answer


def test_it_refuses_a_replayed_authorization_code_with_aadsts54005(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    client = make_msal(web_app)
    flow = client.initiate_auth_code_flow(scopes=OUTLOOK_SCOPES, redirect_uri=REDIRECT_URI)
    answer = browser.sign_in(flow["auth_uri"], upn=ADELE)
    assert "access_token" in client.acquire_token_by_auth_code_flow(dict(flow), answer)

    replay = make_msal(web_app).acquire_token_by_auth_code_flow(dict(flow), answer)

    assert_error(replay, "invalid_grant", 54005)


def test_it_refuses_a_code_verifier_that_does_not_match_with_aadsts501481(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    client = make_msal(web_app)
    flow = client.initiate_auth_code_flow(scopes=OUTLOOK_SCOPES, redirect_uri=REDIRECT_URI)
    answer = browser.sign_in(flow["auth_uri"], upn=ADELE)

    result = client.acquire_token_by_auth_code_flow({**flow, "code_verifier": "x" * 43}, answer)

    assert_error(result, "invalid_grant", 501481)


def test_it_answers_with_a_form_post_when_asked(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    client = make_msal(web_app)
    flow = client.initiate_auth_code_flow(
        scopes=OUTLOOK_SCOPES, redirect_uri=REDIRECT_URI, response_mode="form_post"
    )
    page = browser.press(browser.open(flow["auth_uri"]), login=ADELE)
    page = browser.press(page, decision="accept")

    assert page.status_code == 200
    assert "form-action 'self' https://desk.example.test" in page.headers["content-security-policy"]
    fields = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', page.text))
    assert "access_token" in client.acquire_token_by_auth_code_flow(flow, fields)


def test_it_answers_prompt_none_without_a_session_with_login_required(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    answer = callback_parameters(browser.open(auth_uri(sandbox, web_app, prompt="none")))

    assert answer["error"] == "login_required"
    assert answer["error_description"].startswith("AADSTS50058: ")


def test_it_signs_in_silently_with_prompt_none_after_an_interactive_sign_in(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    browser.sign_in(auth_uri(sandbox, web_app), upn=ADELE)

    answer = callback_parameters(browser.open(auth_uri(sandbox, web_app, prompt="none")))

    assert "code" in answer


def test_it_highlights_the_account_named_in_login_hint(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    page = browser.open(auth_uri(sandbox, web_app, login_hint="support@contoso.onmicrosoft.com"))

    assert "Postdesk sandbox — not Microsoft" in page.text
    first_account = re.search(r'name="login" value="([^"]+)"', page.text)
    assert first_account is not None and first_account.group(1) == "support@contoso.onmicrosoft.com"
    assert "account hinted" in page.text
    assert "<script" not in page.text


# -- sign-in audience and redirect URI checks -------------------------------------------------------


def test_it_refuses_a_user_of_another_tenant_on_a_single_tenant_app_with_aadsts50020(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    page = browser.use_another_account(browser.open(auth_uri(sandbox, web_app)), ALEX)

    assert "location" not in page.headers
    assert "AADSTS50020" in page.text and "does not exist in tenant" in page.text


def test_it_refuses_common_for_a_single_tenant_app_with_aadsts50194(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    page = browser.open(auth_uri(sandbox, web_app, tenant="common"))

    assert "location" not in page.headers and "AADSTS50194" in page.text


def test_it_refuses_consumers_for_a_work_account_app_with_aadsts9002332(
    sandbox: SandboxServer, directory: SandboxDirectory, browser: Browser
) -> None:
    app = directory.register_app(
        display_name="Multi", redirect_uris=[REDIRECT_URI], sign_in_audience="AzureADMultipleOrgs"
    )

    page = browser.open(auth_uri(sandbox, app, tenant="consumers"))

    assert "AADSTS9002332" in page.text


def test_it_lets_users_of_any_tenant_into_a_multi_tenant_app_through_organizations(
    sandbox: SandboxServer, directory: SandboxDirectory, browser: Browser
) -> None:
    app = directory.register_app(
        display_name="Multi", redirect_uris=[REDIRECT_URI], sign_in_audience="AzureADMultipleOrgs"
    )

    answer = browser.sign_in(auth_uri(sandbox, app, tenant="organizations"), upn=ALEX)

    assert "code" in answer


def test_it_shows_an_error_page_instead_of_redirecting_to_an_unregistered_redirect_uri(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    page = browser.open(auth_uri(sandbox, web_app, redirect_uri="https://attacker.example/steal"))

    assert page.status_code == 400 and "location" not in page.headers
    assert "AADSTS50011" in page.text


def test_it_shows_an_error_page_for_an_unknown_client_id(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    page = browser.open(auth_uri(sandbox, web_app, client_id="00000000-0000-0000-0000-000000000001"))

    assert "location" not in page.headers and "AADSTS700016" in page.text


def test_it_grants_admin_consent_for_the_whole_tenant(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    query = urlencode({"client_id": web_app.client_id, "redirect_uri": REDIRECT_URI, "state": "a-1"})
    page = browser.open(f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/adminconsent?{query}")

    answer = callback_parameters(browser.press(page, login="megan.bowen@contoso.onmicrosoft.com"))

    assert answer == {"admin_consent": "True", "tenant": CONTOSO_TENANT_ID, "state": "a-1"}
    # Adele now gets straight through without a consent page.
    assert "code" in callback_parameters(browser.press(browser.open(auth_uri(sandbox, web_app)), login=ADELE))


# -- client credentials and client authentication --------------------------------------------------


def test_it_issues_app_only_tokens_with_a_client_secret(
    sandbox: SandboxServer,
    directory: SandboxDirectory,
    make_msal: MsalFactory,
    http_session: requests.Session,
) -> None:
    app = directory.register_app(
        display_name="Daemon", application_permissions=["https://outlook.office.com/IMAP.AccessAsApp"]
    )

    result = make_msal(app).acquire_token_for_client(["https://outlook.office365.com/.default"])

    claims = verified_claims(http_session, sandbox, result["access_token"], "https://outlook.office365.com")
    assert claims["roles"] == ["IMAP.AccessAsApp"] and "scp" not in claims
    assert (claims["appid"], claims["appidacr"], claims["idtyp"]) == (app.client_id, "1", "app")
    assert "refresh_token" not in result


def _certificate_pair() -> tuple[str, str, str]:
    issued = trustme.CA().issue_cert("postdesk-client.example", key_type=trustme.KeyType.RSA)
    certificate = issued.cert_chain_pems[0].bytes().decode()
    thumbprint = x509.load_pem_x509_certificate(certificate.encode()).fingerprint(hashes.SHA1()).hex()  # noqa: S303
    return issued.private_key_pem.bytes().decode(), certificate, thumbprint


def test_it_issues_app_only_tokens_for_a_certificate_assertion_with_a_sha1_thumbprint(
    directory: SandboxDirectory, make_msal: MsalFactory
) -> None:
    private_key, certificate, thumbprint = _certificate_pair()
    app = directory.register_app(display_name="Daemon", with_secret=False, certificates=[certificate])

    client = make_msal(app, credential={"private_key": private_key, "thumbprint": thumbprint})
    result = client.acquire_token_for_client(["https://graph.microsoft.com/.default"])

    assert jwt.decode(result["access_token"], options={"verify_signature": False})["appidacr"] == "2"


def test_it_issues_app_only_tokens_for_a_ps256_assertion_with_a_public_certificate(
    directory: SandboxDirectory, make_msal: MsalFactory
) -> None:
    private_key, certificate, _ = _certificate_pair()
    app = directory.register_app(display_name="Daemon", with_secret=False, certificates=[certificate])

    client = make_msal(app, credential={"private_key": private_key, "public_certificate": certificate})

    assert "access_token" in client.acquire_token_for_client(["https://graph.microsoft.com/.default"])


def test_it_rejects_an_assertion_signed_by_an_unregistered_certificate_with_aadsts700027(
    directory: SandboxDirectory, make_msal: MsalFactory
) -> None:
    _, certificate, _ = _certificate_pair()
    other_key, _, other_thumbprint = _certificate_pair()
    app = directory.register_app(display_name="Daemon", with_secret=False, certificates=[certificate])

    client = make_msal(app, credential={"private_key": other_key, "thumbprint": other_thumbprint})

    assert_error(
        client.acquire_token_for_client(["https://graph.microsoft.com/.default"]), "invalid_client", 700027
    )


def test_it_rejects_a_wrong_client_secret_with_aadsts7000215(
    web_app: RegisteredApp, make_msal: MsalFactory
) -> None:
    result = make_msal(web_app, credential=new_client_secret_value()).acquire_token_for_client(
        ["https://graph.microsoft.com/.default"]
    )

    assert_error(result, "invalid_client", 7000215)


def test_it_rejects_an_expired_client_secret_with_aadsts7000222(
    directory: SandboxDirectory, web_app: RegisteredApp, make_msal: MsalFactory
) -> None:
    expired = directory.add_client_secret(web_app.client_id, expires_at=datetime.now(UTC) - timedelta(days=1))

    result = make_msal(web_app, credential=expired.value).acquire_token_for_client(
        ["https://graph.microsoft.com/.default"]
    )

    assert_error(result, "invalid_client", 7000222)


def test_it_asks_for_a_client_credential_with_aadsts7000218_and_http_401(
    sandbox: SandboxServer, web_app: RegisteredApp, http_session: requests.Session
) -> None:
    form = {
        "client_id": web_app.client_id,
        "grant_type": "client_credentials",
        "scope": "https://graph.microsoft.com/.default",
    }
    response = http_session.post(token_endpoint(sandbox), data=form)

    assert response.status_code == 401
    assert_error(response.json(), "invalid_client", 7000218)


def test_it_accepts_the_client_secret_in_http_basic_authentication(
    sandbox: SandboxServer, web_app: RegisteredApp, http_session: requests.Session
) -> None:
    form = {"grant_type": "client_credentials", "scope": "https://graph.microsoft.com/.default"}
    response = http_session.post(
        token_endpoint(sandbox), data=form, auth=(web_app.client_id, web_app.client_secrets[0].value)
    )

    assert response.status_code == 200 and response.json()["token_type"] == "Bearer"


def test_it_requires_a_default_scope_for_client_credentials_with_aadsts1002012(
    web_app: RegisteredApp, make_msal: MsalFactory
) -> None:
    result = make_msal(web_app).acquire_token_for_client(["https://graph.microsoft.com/Mail.Send"])

    assert_error(result, "invalid_scope", 1002012)


# -- refresh token lifetime -------------------------------------------------------------------------


def test_it_expires_a_refresh_token_left_unused_for_91_days_with_aadsts700082(
    directory: SandboxDirectory, web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    _, first = sign_in_with_msal(make_msal, browser, web_app)

    directory.clock_offset = timedelta(days=91)
    result = make_msal(web_app).acquire_token_by_refresh_token(first["refresh_token"], OUTLOOK_SCOPES)

    assert_error(result, "invalid_grant", 700082)


def test_it_keeps_a_refresh_token_used_within_90_days_alive(
    directory: SandboxDirectory, web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    _, first = sign_in_with_msal(make_msal, browser, web_app)
    directory.clock_offset = timedelta(days=60)
    assert "access_token" in make_msal(web_app).acquire_token_by_refresh_token(
        first["refresh_token"], OUTLOOK_SCOPES
    )

    directory.clock_offset = timedelta(days=120)
    result = make_msal(web_app).acquire_token_by_refresh_token(first["refresh_token"], OUTLOOK_SCOPES[:1])

    assert "access_token" in result, result


def test_it_rejects_refresh_tokens_revoked_through_the_control_api_with_aadsts50173(
    sandbox: SandboxServer,
    directory: SandboxDirectory,
    make_msal: MsalFactory,
    browser: Browser,
    http_session: requests.Session,
) -> None:
    # Megan is used here so that revoking her tokens cannot disturb other tests.
    app = directory.register_app(display_name="Postdesk (revocation)", redirect_uris=[REDIRECT_URI])
    _, first = sign_in_with_msal(make_msal, browser, app, upn="megan.bowen@contoso.onmicrosoft.com")

    revoked = http_session.post(
        f"{sandbox.base_url}/_sandbox/users/megan.bowen@contoso.onmicrosoft.com/revoke-sign-in-sessions"
    )
    result = make_msal(app).acquire_token_by_refresh_token(first["refresh_token"], OUTLOOK_SCOPES)

    assert revoked.json()["refresh_tokens_revoked"] >= 1
    assert_error(result, "invalid_grant", 50173)


def test_it_refuses_scopes_of_two_resources_in_one_token_request_with_aadsts28000(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    _, first = sign_in_with_msal(make_msal, browser, web_app)

    result = make_msal(web_app).acquire_token_by_refresh_token(
        first["refresh_token"], [*OUTLOOK_SCOPES, "https://graph.microsoft.com/Mail.Send"]
    )

    assert_error(result, "invalid_scope", 28000)


def test_it_refuses_a_refresh_for_permissions_never_consented_with_aadsts65001(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    _, first = sign_in_with_msal(make_msal, browser, web_app)

    result = make_msal(web_app).acquire_token_by_refresh_token(first["refresh_token"], ["Mail.Send"])

    assert_error(result, "invalid_grant", 65001)


# -- injected failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "aadsts"),
    [
        ("invalid_grant", 70008),
        ("interaction_required", 50076),
        ("invalid_client", 7000222),
        ("invalid_request", 90014),
    ],
)
def test_it_delivers_an_injected_token_error_to_msal(
    directory: SandboxDirectory, web_app: RegisteredApp, make_msal: MsalFactory, error: str, aadsts: int
) -> None:
    directory.fail_next("token", error=error, aadsts=aadsts, description="Injected by the test.")

    result = make_msal(web_app).acquire_token_for_client(["https://graph.microsoft.com/.default"])

    assert_error(result, error, aadsts)
    assert "Injected by the test." in result["error_description"]


def test_it_redirects_an_injected_authorize_error_to_the_app(
    directory: SandboxDirectory, web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    directory.fail_next("authorize", error="temporarily_unavailable", aadsts=90033, description="Try again.")
    client = make_msal(web_app)
    flow = client.initiate_auth_code_flow(scopes=OUTLOOK_SCOPES, redirect_uri=REDIRECT_URI)

    answer = callback_parameters(browser.open(flow["auth_uri"]))
    result = client.acquire_token_by_auth_code_flow(flow, answer)

    assert result["error"] == "temporarily_unavailable"
    assert result["error_description"].startswith("AADSTS90033: Try again.")


def test_it_shows_an_injected_admin_approval_error_on_its_own_page(
    sandbox: SandboxServer, directory: SandboxDirectory, web_app: RegisteredApp, browser: Browser
) -> None:
    directory.fail_next("authorize", error="access_denied", aadsts=90094, description="Need admin approval.")

    page = browser.open(auth_uri(sandbox, web_app))

    assert "location" not in page.headers and "AADSTS90094: Need admin approval." in page.text


def test_it_queues_injected_failures_in_order(
    sandbox: SandboxServer, web_app: RegisteredApp, http_session: requests.Session
) -> None:
    for aadsts in (50076, 70008):
        body = {"endpoint": "token", "error": "invalid_grant", "aadsts": aadsts, "description": "Queued."}
        assert http_session.post(f"{sandbox.base_url}/_sandbox/fail-next", json=body).status_code == 202
    form = {
        "client_id": web_app.client_id,
        "client_secret": web_app.client_secrets[0].value,
        "grant_type": "client_credentials",
        "scope": "https://graph.microsoft.com/.default",
    }

    codes = [
        http_session.post(token_endpoint(sandbox), data=form).json().get("error_codes") for _ in range(3)
    ]

    assert codes == [[50076], [70008], None]


def test_it_echoes_the_client_request_id_as_the_correlation_id(
    sandbox: SandboxServer, http_session: requests.Session
) -> None:
    correlation = "3f0c8b52-1e0f-4a4e-9a57-9d1a3d6b7c11"

    body = http_session.post(
        token_endpoint(sandbox),
        data={"grant_type": "client_credentials"},
        headers={"client-request-id": correlation},
    ).json()

    assert body["correlation_id"] == correlation
    assert f"Correlation ID: {correlation}" in body["error_description"]
    assert re.search(r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$", body["error_description"])


# -- control API and introspection ---------------------------------------------------------------------


def test_it_registers_an_app_through_the_control_api(
    sandbox: SandboxServer, http_session: requests.Session, make_msal: MsalFactory
) -> None:
    created = http_session.post(
        f"{sandbox.base_url}/_sandbox/apps", json={"display_name": "Demo", "redirect_uris": [REDIRECT_URI]}
    ).json()

    assert re.fullmatch(r"[A-Za-z0-9]{4}Q~[A-Za-z0-9_.~-]{34}", created["client_secret"])
    assert created["client_secret_id"] != created["client_secret"]
    app = sandbox.directory.apps[created["client_id"]]
    assert "access_token" in make_msal(app).acquire_token_for_client(["https://graph.microsoft.com/.default"])


def test_it_lists_users_and_moves_the_clock_through_the_control_api(
    sandbox: SandboxServer, directory: SandboxDirectory, http_session: requests.Session
) -> None:
    listing = http_session.get(f"{sandbox.base_url}/_sandbox/users").json()
    clock = http_session.post(f"{sandbox.base_url}/_sandbox/clock", json={"offset_seconds": 86400}).json()

    assert {u["upn"] for u in listing["users"]} >= {ADELE, ALEX, "support@contoso.onmicrosoft.com"}
    assert {t["tenant_id"] for t in listing["tenants"]} >= {CONTOSO_TENANT_ID, FABRIKAM_TENANT_ID}
    assert clock["offset_seconds"] == 86400 and directory.clock_offset == timedelta(days=1)


def test_it_introspects_access_tokens_for_dovecot(
    sandbox: SandboxServer,
    directory: SandboxDirectory,
    web_app: RegisteredApp,
    make_msal: MsalFactory,
    browser: Browser,
    http_session: requests.Session,
) -> None:
    _, result = sign_in_with_msal(make_msal, browser, web_app)
    url = f"{sandbox.base_url}/_sandbox/introspect"

    active = http_session.post(url, data={"token": result["access_token"]}).json()
    id_token = http_session.post(url, data={"token": result["id_token"]}).json()
    garbage = http_session.post(url, data={"token": "not-a-token"}).json()
    directory.clock_offset = timedelta(hours=2)
    expired = http_session.post(url, data={"token": result["access_token"]}).json()

    assert active["active"] is True
    assert (active["upn"], active["email"], active["client_id"]) == (ADELE, ADELE, web_app.client_id)
    assert (
        active["scope"] == "IMAP.AccessAsUser.All SMTP.Send" and active["aud"] == "https://outlook.office.com"
    )
    assert id_token == garbage == expired == {"active": False}


# -- TLS files -----------------------------------------------------------------------------------------


def test_it_reuses_its_tls_files_and_keeps_the_key_private(tmp_path: Path) -> None:
    first = ensure_server_certificate(tmp_path)
    before = first.cert_path.read_bytes()

    second = ensure_server_certificate(tmp_path)

    assert second.cert_path.read_bytes() == before
    assert stat.S_IMODE(os.stat(second.key_path).st_mode) == 0o600


def test_it_replaces_tls_files_that_no_longer_match(tmp_path: Path) -> None:
    first = ensure_server_certificate(tmp_path)
    before = first.cert_path.read_bytes()
    first.key_path.write_bytes(trustme.CA().issue_cert("localhost").private_key_pem.bytes())

    second = ensure_server_certificate(tmp_path)

    assert second.cert_path.read_bytes() != before


def test_it_returns_the_state_unchanged(
    sandbox: SandboxServer, web_app: RegisteredApp, browser: Browser
) -> None:
    answer = browser.sign_in(auth_uri(sandbox, web_app, state="a b&c=d"), upn=ADELE)

    assert answer["state"] == "a b&c=d"


def test_it_returns_graph_permissions_unqualified_with_the_oidc_scopes(
    web_app: RegisteredApp, make_msal: MsalFactory, browser: Browser
) -> None:
    client = make_msal(web_app)
    flow = client.initiate_auth_code_flow(scopes=["Mail.ReadWrite", "Mail.Send"], redirect_uri=REDIRECT_URI)

    result = client.acquire_token_by_auth_code_flow(flow, browser.sign_in(flow["auth_uri"], upn=ADELE))

    assert result["scope"] == "Mail.ReadWrite Mail.Send profile openid"
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["scp"] == "Mail.ReadWrite Mail.Send openid profile"
    again = make_msal(web_app).acquire_token_by_refresh_token(
        result["refresh_token"], ["https://graph.microsoft.com/.default"]
    )
    assert again["scope"] == "Mail.ReadWrite Mail.Send profile openid"
