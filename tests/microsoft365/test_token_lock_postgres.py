"""On PostgreSQL, separate processes never redeem one mailbox's refresh token at the same time: the
per-channel thread lock is replaced by fresh locks (as in separate processes) and the advisory lock in
the database must serialise them on its own."""

from __future__ import annotations

import threading

import pytest

from postdesk.config import Settings
from postdesk.microsoft import tokens
from postdesk.runtime import Runtime
from postdesk.sandbox import RegisteredApp, SandboxDirectory
from tests.conftest import _fresh_postgres_database
from tests.microsoft365.test_token_lifecycle import _expire_cached_access_tokens, _token

pytestmark = pytest.mark.postgres


@pytest.fixture
def m365_settings(m365_settings: Settings, postgres_url: str) -> Settings:
    """The usual desk, on a PostgreSQL database of its own."""
    return m365_settings.model_copy(update={"database_url": _fresh_postgres_database(postgres_url)})


def test_processes_take_turns_redeeming_the_refresh_token(
    m365_runtime: Runtime,
    channel_id: int,
    directory: SandboxDirectory,
    entra_app: RegisteredApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert m365_runtime.engine.dialect.name == "postgresql"
    monkeypatch.setattr(tokens, "_channel_lock", lambda _channel_id: threading.RLock())
    _expire_cached_access_tokens(m365_runtime)
    issued_before = {g.token for g in directory.refresh_tokens.values() if g.client_id == entra_app.client_id}
    start = threading.Barrier(4)
    failures: list[BaseException] = []

    def fetch_token() -> None:
        start.wait()
        try:
            _token(m365_runtime, force=False)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=fetch_token) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    issued = {g.token for g in directory.refresh_tokens.values() if g.client_id == entra_app.client_id}
    assert len(issued - issued_before) == 1
