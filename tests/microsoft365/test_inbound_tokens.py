"""Access tokens during fetching: reused while valid, refreshed once when IMAP refuses one."""

from __future__ import annotations

from postdesk.ingest.fetch import default_mailbox, fetch_channel
from postdesk.runtime import Runtime
from postdesk.sandbox import RegisteredApp, SandboxDirectory
from postdesk.transports.errors import TransportError
from postdesk.transports.imap import ImapMailbox
from tests.microsoft365.conftest import channels


def _grants(directory: SandboxDirectory, app: RegisteredApp) -> int:
    return sum(1 for grant in directory.refresh_tokens.values() if grant.client_id == app.client_id)


class RefusingMailbox(ImapMailbox):
    """Refuses the first ``refusals`` sign-ins the way Exchange answers a stale token."""

    refusals = 1

    def login(self, username: str, access_token: str) -> None:
        if RefusingMailbox.refusals > 0:
            RefusingMailbox.refusals -= 1
            raise TransportError("AUTHENTICATE failed.", needs_reauth=True)
        super().login(username, access_token)


def refusing_factory(refusals: int):  # type: ignore[no-untyped-def]
    RefusingMailbox.refusals = refusals

    def build(runtime: Runtime) -> ImapMailbox:
        real = default_mailbox(runtime)
        return RefusingMailbox(real.endpoint, ssl_context=real._ssl_context)

    return build


def test_polling_reuses_the_access_token_instead_of_refreshing_each_time(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    before = _grants(directory, entra_app)
    for _ in range(3):
        assert fetch_channel(m365_runtime, channel_id).error is None
    assert _grants(directory, entra_app) == before


def test_a_refused_token_is_refreshed_once_and_the_fetch_goes_on(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    before = _grants(directory, entra_app)
    result = fetch_channel(m365_runtime, channel_id, mailbox_factory=refusing_factory(1))
    assert result.error is None
    assert _grants(directory, entra_app) == before + 1


def test_a_token_refused_even_after_refreshing_explains_the_exchange_setting(
    m365_runtime: Runtime, channel_id: int, mailbox_user: str
) -> None:
    result = fetch_channel(m365_runtime, channel_id, mailbox_factory=refusing_factory(2))
    assert result.error is not None
    assert f"Set-CASMailbox -Identity {mailbox_user} -ImapEnabled $true" in result.error
    [channel] = channels(m365_runtime)
    assert channel.status.value == "error"
    assert channel.last_error == result.error
