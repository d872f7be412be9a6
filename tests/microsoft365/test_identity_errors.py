"""Microsoft's refusals reach the admin as plain words, the fix, and the IDs support asks for."""

from __future__ import annotations

import html

import pytest

from postdesk.microsoft.errors import IdentityError, explain
from postdesk.runtime import Runtime
from postdesk.sandbox import SandboxDirectory
from tests.microsoft365.conftest import ADELE, SignIn, channels

# (AADSTS code, OAuth error, HTTP status) as Microsoft's token endpoint answers them.
TOKEN_ENDPOINT_ERRORS = [
    (50011, "invalid_request", 400),
    (500113, "invalid_request", 400),
    (50194, "invalid_request", 400),
    (700016, "unauthorized_client", 400),
    (7000215, "invalid_client", 401),
    (7000222, "invalid_client", 401),
    (7000218, "invalid_client", 401),
    (9002325, "invalid_request", 400),
    (65001, "invalid_grant", 400),
    (65004, "access_denied", 400),
    (90094, "invalid_grant", 400),
    (50020, "invalid_request", 400),
    (53003, "invalid_grant", 400),
    (50076, "invalid_grant", 400),
    (70008, "invalid_grant", 400),
    (700082, "invalid_grant", 400),
    (50173, "invalid_grant", 400),
    (70043, "invalid_grant", 400),
]


@pytest.mark.parametrize(("code", "error", "status"), TOKEN_ENDPOINT_ERRORS)
def test_a_token_endpoint_refusal_is_explained_with_its_fix_and_ids(
    signin: SignIn, directory: SandboxDirectory, m365_runtime: Runtime, code: int, error: str, status: int
) -> None:
    params = signin.at_microsoft(ADELE)
    directory.fail_next("token", error=error, aadsts=code, description="Injected by the test.", status=status)
    response = signin.back_at_postdesk(params)
    assert response.status_code == 400
    page = html.unescape(response.text)
    expected = explain(
        IdentityError(error=error, aadsts=code),
        context={
            "redirect_uri": "http://127.0.0.1:8025/auth/microsoft365/callback",
        },
    )
    assert expected.title in page
    assert f"AADSTS{code}" in page
    assert "Trace ID" in page and "Correlation ID" in page
    assert "How to fix it:" in page
    assert channels(m365_runtime) == []


def test_cancelling_at_the_consent_page_is_explained_as_a_cancellation(
    signin: SignIn, m365_runtime: Runtime
) -> None:
    params = signin.at_microsoft("support@contoso.onmicrosoft.com", consent="cancel")
    assert params["error"] == "access_denied"
    response = signin.back_at_postdesk(params)
    assert response.status_code == 400
    expected = explain(IdentityError.from_redirect(params))
    assert expected.title in html.unescape(response.text)
    assert channels(m365_runtime) == []


def test_an_authorize_endpoint_refusal_comes_back_explained(
    signin: SignIn, directory: SandboxDirectory
) -> None:
    directory.fail_next(
        "authorize",
        error="interaction_required",
        aadsts=50076,
        description="Due to a configuration change made by your administrator, or because you "
        "moved to a new location, you must use multi-factor authentication.",
    )
    url = signin.authorize_url()
    page = signin.browser.open(url)
    from urllib.parse import parse_qsl, urlsplit

    assert page.status_code == 302, page.text
    params = dict(parse_qsl(urlsplit(page.headers["location"]).query))
    response = signin.back_at_postdesk(params)
    assert response.status_code == 400
    assert "AADSTS50076" in response.text
    assert explain(IdentityError.from_redirect(params)).title in html.unescape(response.text)
