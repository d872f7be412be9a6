"""Every mailbox's event log says who changed the app's credentials and when, never the secret."""

from __future__ import annotations

from sqlalchemy import select

from postdesk.db.models import ChannelEvent
from postdesk.runtime import Runtime
from postdesk.sandbox import RegisteredApp, SandboxDirectory
from tests.conftest import csrf_from
from tests.microsoft365.conftest import ADELE, MEGAN, SignIn


def test_a_new_client_secret_is_logged_on_every_mailbox_by_whom(
    signin: SignIn, m365_runtime: Runtime, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    signin.connect(ADELE)
    signin.connect(MEGAN)
    new_secret = directory.add_client_secret(entra_app.client_id)
    page = signin.desk.get("/channels")
    saved = signin.desk.post(
        "/channels/microsoft365/app",
        data={
            "client_id": entra_app.client_id,
            "tenant": "contoso.onmicrosoft.com",
            "client_secret": new_secret.value,
            "secret_expires": "2028-05-31",
            "csrf_token": csrf_from(page.text),
        },
        follow_redirects=False,
    )
    assert saved.status_code == 303, saved.text
    with m365_runtime.sessions() as session:
        events = session.scalars(select(ChannelEvent).where(ChannelEvent.kind == "credentials")).all()
        assert len(events) == 2  # one per mailbox
        for event in events:
            assert event.actor is not None and event.actor.email == "admin@example.com"
            assert "new client secret (expires 2028-05-31)" in event.message
            assert new_secret.value not in event.message
        channel_id = events[0].channel_id
    detail = signin.desk.get(f"/channels/{channel_id}").text
    assert "new client secret (expires 2028-05-31)" in detail and "admin@example.com" in detail
    assert new_secret.value not in detail
