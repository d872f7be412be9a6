"""The weekly token heartbeat keeps idle mailboxes signed in and reports a lost sign-in in plain words."""

from __future__ import annotations

from datetime import timedelta

from postdesk.db.models import Channel, ChannelStatus
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.microsoft.connect import current_registration
from postdesk.microsoft.identity import MicrosoftIdentity
from postdesk.microsoft.tokens import TokenError, acquire_access_token
from postdesk.runtime import Runtime
from postdesk.sandbox import SandboxDirectory
from postdesk.worker.heartbeat import refresh_stale_tokens
from tests.microsoft365.conftest import channels


def _refresh_now(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        registration = current_registration(session)
        assert registration is not None
        channel = session.query(Channel).one()
        acquire_access_token(
            session, MicrosoftIdentity(runtime.settings, registration), channel, force_refresh=True
        )


def test_a_mailbox_left_alone_for_91_days_stays_signed_in_with_the_heartbeat(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory
) -> None:
    for week in range(1, 14):  # 13 weeks = 91 days, with no fetch at all
        directory.clock_offset = timedelta(days=7 * week)
        assert refresh_stale_tokens(m365_runtime, now=utcnow() + directory.clock_offset) == 1
    _refresh_now(m365_runtime)  # would raise AADSTS700082 had the token lapsed
    [channel] = channels(m365_runtime)
    assert channel.status is ChannelStatus.OK


def test_without_the_heartbeat_91_idle_days_end_the_sign_in_and_the_admin_is_told(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory
) -> None:
    directory.clock_offset = timedelta(days=91)
    try:
        _refresh_now(m365_runtime)
    except TokenError as exc:
        assert "AADSTS700082" in exc.reference
    else:
        raise AssertionError("the sandbox should have refused a refresh token unused for 91 days")
    assert refresh_stale_tokens(m365_runtime, now=utcnow() + directory.clock_offset) == 0
    [channel] = channels(m365_runtime)
    assert channel.status is ChannelStatus.NEEDS_REAUTH
    assert channel.last_error is not None and "Re-authenticate" in channel.last_error


def test_a_recently_refreshed_mailbox_is_left_alone(m365_runtime: Runtime, channel_id: int) -> None:
    assert refresh_stale_tokens(m365_runtime, now=utcnow() + timedelta(days=6)) == 0


def test_a_disabled_mailbox_is_kept_signed_in_but_stays_disabled(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).status = ChannelStatus.DISABLED  # type: ignore[union-attr]
    directory.clock_offset = timedelta(days=8)
    assert refresh_stale_tokens(m365_runtime, now=utcnow() + directory.clock_offset) == 1
    directory.revoke_refresh_tokens(mailbox_user)
    directory.clock_offset = timedelta(days=16)
    assert refresh_stale_tokens(m365_runtime, now=utcnow() + directory.clock_offset) == 0
    [channel] = channels(m365_runtime)
    assert channel.status is ChannelStatus.DISABLED
    assert channel.last_error is not None and "AADSTS50173" in channel.last_error
