"""Fixtures for the sandbox identity platform: one HTTPS server for the session, real MSAL, and a
tiny scripted browser that fills in the sign-in and consent pages."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msal
import pytest
import requests

from postdesk.sandbox import CONTOSO_TENANT_ID, RegisteredApp, SandboxDirectory, SandboxServer
from tests.support.sandbox_browser import Browser
from tests.support.sandbox_browser import callback_parameters as support_callback_parameters

# MSAL ships no type hints, so its objects are Any here.
MsalFactory = Callable[..., Any]
REDIRECT_URI = "https://desk.example.test/auth/microsoft365/callback"
OUTLOOK_SCOPES = [
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
]


def callback_parameters(response: httpx.Response) -> dict[str, str]:
    return support_callback_parameters(response, REDIRECT_URI)


@pytest.fixture
def web_app(directory: SandboxDirectory) -> RegisteredApp:
    """A fresh single-tenant app registration in Contoso, so consents never leak between tests."""
    return directory.register_app(display_name="Postdesk (test)", redirect_uris=[REDIRECT_URI])


@pytest.fixture
def http_session(sandbox: SandboxServer) -> Iterator[requests.Session]:
    # MSAL's own verify= is ignored when REQUESTS_CA_BUNDLE is set, so trust goes on the session.
    session = requests.Session()
    session.trust_env = False
    session.verify = str(sandbox.ca_path)
    yield session
    session.close()


@pytest.fixture
def browser(sandbox: SandboxServer) -> Iterator[Browser]:
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(verify=context, trust_env=False, follow_redirects=False, timeout=10) as client:
        yield Browser(client, redirect_uri=REDIRECT_URI)


@pytest.fixture
def make_msal(sandbox: SandboxServer, http_session: requests.Session) -> MsalFactory:
    """Build a real MSAL confidential client for an app; a new one per call, because MSAL caches
    discovery documents and HTTP 400 answers per instance."""

    def factory(
        app: RegisteredApp, *, credential: object = None, tenant: str = CONTOSO_TENANT_ID, **options: Any
    ) -> Any:
        return msal.ConfidentialClientApplication(
            app.client_id,
            client_credential=credential if credential is not None else app.client_secrets[0].value,
            authority=f"{sandbox.base_url}/{tenant}",
            instance_discovery=options.pop("instance_discovery", False),
            http_client=http_session,
            **options,
        )

    return factory
