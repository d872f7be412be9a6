"""After a realistic run, no token, secret, private key or password is readable anywhere Postdesk writes.

One desk does what an operator's first week does, in one data dir, with every log line at DEBUG going to
a file through Postdesk's own logging set-up: an admin saves the app's client secret in the web form,
connects a mailbox through the sandbox's Microsoft sign-in, mail is fetched from Dovecot, the app
switches to a generated certificate, a reply goes out through the SMTP stand-in, the admin creates an
API token and a script uses it, and the admin signs out and in again. Then every value the test knows to
be secret is searched for in the SQLite files, every file under the data dir, the log file and whatever
reached stdout/stderr: as written, URL-encoded, and inside base64 (SASL XOAUTH2, HTTP Basic).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import Channel, DeliveryStatus, MicrosoftApp
from postdesk.db.session import transaction
from postdesk.microsoft.connect import current_registration
from postdesk.microsoft.identity import MicrosoftIdentity
from postdesk.microsoft.tokens import acquire_access_token
from postdesk.runtime import Runtime
from postdesk.sandbox import RegisteredApp, SandboxDirectory
from postdesk.sandbox.identity import RefreshGrant
from postdesk.security.redact import configure_logging
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in

# The desk of tests/microsoft365: its fixtures are imported so this test can use them from here.
from tests.microsoft365.conftest import (  # noqa: F401 - fixtures, requested by name
    SECRET_KEY,
    SignIn,
    browser,
    desk,
    entra_app,
    m365_admin,
    m365_runtime,
    m365_settings,
    mailbox_user,
    receive_mail,
    signin,
    trusted_cas,
    wait_for_delivery,
)
from tests.support.dovecot import DovecotServer

_customers = itertools.count(1)
MIN_BASE64_NEEDLE = 16  # shorter fragments of an encoding could match by chance


@dataclass(frozen=True)
class Secret:
    name: str  # what it is, for the failure message; the value itself is never printed
    value: str


@pytest.fixture
def debug_log(tmp_path: Path) -> Iterator[Path]:
    """Postdesk's logging exactly as `postdesk serve --log-level DEBUG` sets it up (redaction filter
    included), writing to a file instead of stderr."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("alembic").level)
    path = tmp_path / "postdesk-debug.log"
    configure_logging("DEBUG")
    with path.open("w", encoding="utf-8") as stream:
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        try:
            yield path
        finally:
            root.handlers[:], level, alembic_level = saved
            root.setLevel(level)
            logging.getLogger("alembic").setLevel(alembic_level)


def _save_client_secret_in_the_form(
    admin_browser: TestClient, directory: SandboxDirectory, app: RegisteredApp
) -> str:
    secret = directory.add_client_secret(app.client_id).value
    page = admin_browser.get("/channels")
    saved = admin_browser.post(
        "/channels/microsoft365/app",
        data={
            "csrf_token": csrf_from(page.text),
            "client_id": app.client_id,
            "tenant": "contoso.onmicrosoft.com",
            "client_secret": secret,
            "cloud": "global",
            "account_types": "single",
        },
        follow_redirects=False,
    )
    assert saved.status_code in (200, 303), saved.text
    return secret


def _switch_to_a_generated_certificate(
    admin_browser: TestClient, directory: SandboxDirectory, app: RegisteredApp
) -> None:
    token = csrf_from(admin_browser.get("/channels").text)
    assert (
        admin_browser.post("/channels/microsoft365/certificate", data={"csrf_token": token}).status_code
        == 200
    )
    directory.add_certificate(
        app.client_id, admin_browser.get("/channels/microsoft365/certificate.cer").content
    )
    chosen = admin_browser.post(
        "/channels/microsoft365/credential", data={"csrf_token": token, "credential": "certificate"}
    )
    assert chosen.status_code == 200


def _refresh_with_the_certificate(runtime: Runtime, channel_id: int) -> str:
    with transaction(runtime.sessions) as session:
        registration = current_registration(session)
        assert registration is not None and registration.use_certificate
        channel = session.get_one(Channel, channel_id)
        identity = MicrosoftIdentity(runtime.settings, registration)
        return acquire_access_token(session, identity, channel, force_refresh=True).value


def _reply_by_mail(admin_browser: TestClient, runtime: Runtime, number: int, customer: str) -> None:
    page = admin_browser.get(f"/tickets/{number}")
    sent = admin_browser.post(
        f"/tickets/{number}/reply",
        data={
            "csrf_token": csrf_from(page.text),
            "kind": "reply",
            "body": "On it.",
            "to": customer,
            "cc": "",
        },
        follow_redirects=False,
    )
    assert sent.status_code == 303, sent.text
    article_id = int(sent.headers["location"].rsplit("#article-", 1)[1])
    assert wait_for_delivery(runtime, article_id, DeliveryStatus.SENT, DeliveryStatus.FAILED).status is (
        DeliveryStatus.SENT
    )


def _create_api_token_and_use_it(admin_browser: TestClient) -> str:
    page = admin_browser.get("/account/api-tokens")
    created = admin_browser.post(
        "/account/api-tokens",
        data={"csrf_token": csrf_from(page.text), "name": "nightly export", "scope": "read"},
    )
    found = re.search(r'id="new-token-secret"[^>]*value="(pd_[^"]+)"', created.text)
    assert found is not None, created.text
    with TestClient(admin_browser.app, base_url=str(admin_browser.base_url)) as script:
        assert script.get("/api/v1/tickets", headers={"Authorization": f"Bearer {found.group(1)}"}).is_success
    return found.group(1)


def _sign_out_and_in_again(admin_browser: TestClient) -> None:
    admin_browser.post("/logout", data={"csrf_token": csrf_from(admin_browser.get("/tickets").text)})
    sign_in(admin_browser, "admin@example.com", ADMIN_PASSWORD)


def _secrets_held_by_microsoft_and_postdesk(
    runtime: Runtime, directory: SandboxDirectory, app: RegisteredApp
) -> list[Secret]:
    """What the sandbox issued to this app, and what Postdesk holds decrypted: the token cache of every
    mailbox (access, refresh and ID tokens) and the certificate's private key."""
    found = [Secret("refresh token issued by Microsoft", grant.token) for grant in _grants(directory, app)]
    found += [
        Secret("authorization code", code.code)
        for code in directory.codes.values()
        if code.client_id == app.client_id
    ]
    with runtime.sessions() as session:
        for channel in session.scalars(select(Channel)):
            cache = json.loads(channel.token_cache or "{}")
            for section in ("AccessToken", "RefreshToken", "IdToken"):
                found += [
                    Secret(f"{section} in the token cache", entry["secret"])
                    for entry in cache.get(section, {}).values()
                ]
        registration = session.scalars(select(MicrosoftApp)).one()
        assert registration.certificate_private_key is not None
        found += [
            Secret("a line of the certificate's private key", line)
            for line in registration.certificate_private_key.splitlines()
            if line and not line.startswith("-----")
        ]
    return found


def _grants(directory: SandboxDirectory, app: RegisteredApp) -> list[RefreshGrant]:
    return [grant for grant in directory.refresh_tokens.values() if grant.client_id == app.client_id]


def _needles(value: str) -> Iterator[bytes]:
    """The value as written, URL-encoded, and as it shows up inside any base64 text (at each of the three
    alignments, without the characters its neighbours change)."""
    raw = value.encode()
    yield raw
    yield quote(value, safe="").encode()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        start = -(-offset * 4 // 3)
        end = len(encoded) - 4
        for alphabet in (encoded, encoded.replace(b"+", b"-").replace(b"/", b"_")):
            middle = alphabet[start:end]
            if len(middle) >= MIN_BASE64_NEEDLE:
                yield middle


def _hits(secrets: list[Secret], places: dict[str, bytes]) -> list[str]:
    hits = []
    for secret in secrets:
        for needle in dict.fromkeys(_needles(secret.value)):
            for place, content in places.items():
                offset = content.find(needle)
                if offset >= 0:
                    hits.append(f"{secret.name} ({len(secret.value)} characters) in {place} at byte {offset}")
    return hits


def test_no_token_secret_key_or_password_is_readable_after_a_full_run(
    request: pytest.FixtureRequest,
    debug_log: Path,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    capfd: pytest.CaptureFixture[str],
) -> None:
    trip: SignIn = request.getfixturevalue("signin")
    runtime: Runtime = request.getfixturevalue("m365_runtime")
    app: RegisteredApp = request.getfixturevalue("entra_app")
    mailbox: str = request.getfixturevalue("mailbox_user")
    admin_browser = trip.desk
    customer = f"scan-customer{next(_customers)}@fabrikam.onmicrosoft.com"

    client_secret = _save_client_secret_in_the_form(admin_browser, directory, app)
    assert trip.connect(mailbox).status_code == 303
    with runtime.sessions() as session:
        channel = session.scalars(select(Channel.id)).one()
    ticket = receive_mail(runtime, dovecot, channel, mailbox, sender=customer, subject="Printer on fire")
    _switch_to_a_generated_certificate(admin_browser, directory, app)
    access_token = _refresh_with_the_certificate(runtime, channel)
    _reply_by_mail(admin_browser, runtime, ticket.number, customer)
    api_token = _create_api_token_and_use_it(admin_browser)
    _sign_out_and_in_again(admin_browser)

    secrets = [
        Secret("client secret saved in the form", client_secret),
        *(Secret("client secret stored for the test", s.value) for s in app.client_secrets),
        Secret("access token returned by the refresh", access_token),
        Secret("API token", api_token),
        Secret("admin password", ADMIN_PASSWORD),
        Secret("POSTDESK_SECRET_KEY", SECRET_KEY),
        *_secrets_held_by_microsoft_and_postdesk(runtime, directory, app),
    ]
    assert {s.name for s in secrets} >= {
        "refresh token issued by Microsoft",
        "AccessToken in the token cache",
    }

    data_dir = runtime.settings.data_dir
    files = {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }
    assert "postdesk.sqlite3" in files and any(name.startswith("spool/") for name in files)
    logging.getLogger("postdesk.test").debug("end of the run")
    log = debug_log.read_bytes()
    assert b"DEBUG postdesk.test: end of the run" in log
    output = capfd.readouterr()
    places = {
        **{f"the data dir: {name}": content for name, content in files.items()},
        "the DEBUG log": log,
        "stdout": output.out.encode(),
        "stderr": output.err.encode(),
    }
    hits = _hits(secrets, places)
    assert not hits, "secrets readable where Postdesk writes:\n" + "\n".join(hits)
