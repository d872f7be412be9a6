"""Token failures are classified; passing ones are retried quietly until they persist; one mailbox's
refresh token is never redeemed twice at once."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.microsoft.connect import current_registration
from postdesk.microsoft.errors import IdentityError, explain
from postdesk.microsoft.identity import MicrosoftIdentity
from postdesk.microsoft.tokens import (
    ESCALATE_AFTER,
    ESCALATE_COUNT,
    AccessToken,
    TokenError,
    acquire_access_token,
)
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import RegisteredApp, SandboxDirectory
from tests.microsoft365.conftest import channels
from tests.support.postgres import free_port


def _token(runtime: Runtime, *, force: bool = True, now_offset: timedelta = timedelta(0)) -> AccessToken:
    with transaction(runtime.sessions) as session:
        registration = current_registration(session)
        assert registration is not None
        channel = session.scalars(select(Channel)).one()
        return acquire_access_token(
            session,
            MicrosoftIdentity(runtime.settings, registration),
            channel,
            force_refresh=force,
            now=utcnow() + now_offset,
        )


def _channel(runtime: Runtime) -> Channel:
    [channel] = channels(runtime)
    return channel


def _expire_cached_access_tokens(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        channel = session.scalars(select(Channel)).one()
        cache = json.loads(channel.token_cache or "{}")
        for entry in cache.get("AccessToken", {}).values():
            entry["expires_on"] = entry["extended_expires_on"] = str(int(time.time()) - 60)
        channel.token_cache = json.dumps(cache)


def _busy(directory: SandboxDirectory) -> None:
    directory.fail_next(
        "token",
        error="temporarily_unavailable",
        aadsts=None,
        description="The server is temporarily unavailable. Try again later.",
        status=503,
    )


def test_a_passing_failure_is_retried_quietly_and_forgotten_after_a_success(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory
) -> None:
    _busy(directory)
    with pytest.raises(TokenError) as refused:
        _token(m365_runtime)
    assert refused.value.explanation.transient
    channel = _channel(m365_runtime)
    assert (channel.status, channel.last_error, channel.token_failures) == (ChannelStatus.OK, None, 1)
    refreshes = channel.token_refresh_count
    _token(m365_runtime)
    channel = _channel(m365_runtime)
    assert (channel.token_failures, channel.token_failing_since) == (0, None)
    assert channel.token_refresh_count == refreshes + 1


def test_a_passing_failure_that_persists_for_hours_is_escalated_to_the_admin(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory
) -> None:
    step = ESCALATE_AFTER / (ESCALATE_COUNT - 1)
    for attempt in range(ESCALATE_COUNT - 1):
        _busy(directory)
        with pytest.raises(TokenError):
            _token(m365_runtime, now_offset=step * attempt)
        assert _channel(m365_runtime).status is ChannelStatus.OK  # not yet: it may pass
    _busy(directory)
    with pytest.raises(TokenError) as refused:
        _token(m365_runtime, now_offset=ESCALATE_AFTER)
    assert "2.0 hours (5 attempts)" in refused.value.explanation.title
    channel = _channel(m365_runtime)
    assert channel.status is ChannelStatus.ERROR
    assert channel.last_error is not None and "HTTP Error: 503" in channel.last_error
    assert "status.cloud.microsoft" in channel.last_error
    with m365_runtime.sessions() as session:
        kinds = session.scalars(select(ChannelEvent.kind).where(ChannelEvent.channel_id == channel_id)).all()
    assert "error" in kinds
    _token(m365_runtime, now_offset=ESCALATE_AFTER + step)
    assert _channel(m365_runtime).token_failures == 0


@pytest.mark.parametrize(
    ("aadsts", "error", "status"),
    [
        (700082, "invalid_grant", ChannelStatus.NEEDS_REAUTH),  # unused for 90 days
        (70008, "invalid_grant", ChannelStatus.NEEDS_REAUTH),  # expired
        (50173, "invalid_grant", ChannelStatus.NEEDS_REAUTH),  # revoked by a password change
        (70043, "invalid_grant", ChannelStatus.NEEDS_REAUTH),  # Conditional Access sign-in frequency
        (65001, "invalid_grant", None),  # consent withdrawn
        (7000215, "invalid_client", ChannelStatus.ERROR),  # wrong secret
        (7000222, "invalid_client", ChannelStatus.ERROR),  # expired secret
        (50076, "interaction_required", None),  # MFA now required
        (53003, "access_denied", None),  # blocked by Conditional Access
        (700016, "unauthorized_client", ChannelStatus.ERROR),  # app deleted
    ],
)
def test_a_failure_that_needs_a_person_says_so_at_once(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    aadsts: int,
    error: str,
    status: ChannelStatus | None,
) -> None:
    description = f"AADSTS{aadsts}: injected by the test. Trace ID: 0 Correlation ID: 0 Timestamp: 2026-11-26"
    directory.fail_next("token", error=error, aadsts=aadsts, description=description, status=400)
    expected = explain(IdentityError(error=error, aadsts=aadsts, description=description))
    with pytest.raises(TokenError) as refused:
        _token(m365_runtime)
    assert not refused.value.explanation.transient
    channel = _channel(m365_runtime)
    assert channel.status is (status or ChannelStatus(expected.channel_status))
    assert channel.status is not ChannelStatus.OK
    assert channel.last_error is not None
    assert expected.fix in channel.last_error and f"AADSTS{aadsts}" in channel.last_error


def test_an_unreachable_identity_platform_is_a_passing_failure(
    m365_runtime: Runtime, channel_id: int
) -> None:
    closed = m365_runtime.settings.model_copy(
        update={"microsoft_login_url": f"https://127.0.0.1:{free_port()}"}
    )
    elsewhere = bootstrap(closed, apply_migrations=False)
    try:
        with pytest.raises(TokenError) as refused:
            _token(elsewhere)
    finally:
        elsewhere.engine.dispose()
    assert refused.value.explanation.transient
    assert "could not be reached" in refused.value.explanation.title
    assert _channel(m365_runtime).status is ChannelStatus.OK


def test_two_threads_never_redeem_the_same_refresh_token(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, entra_app: RegisteredApp
) -> None:
    _expire_cached_access_tokens(m365_runtime)  # every thread must now get a new one, or wait for it
    issued_before = {g.token for g in directory.refresh_tokens.values() if g.client_id == entra_app.client_id}
    start = threading.Barrier(4)
    tokens: list[str] = []
    failures: list[BaseException] = []

    def fetch_token() -> None:
        start.wait()
        try:
            tokens.append(_token(m365_runtime, force=False).value)
        except BaseException as exc:  # reported below, with the test's assertion
            failures.append(exc)

    threads = [threading.Thread(target=fetch_token) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    issued = {g.token for g in directory.refresh_tokens.values() if g.client_id == entra_app.client_id}
    assert len(issued - issued_before) == 1  # one redemption; the others used the token it stored
    assert len(set(tokens)) == 1
