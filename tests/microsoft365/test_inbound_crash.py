"""kill -9 at random moments of a 500-message fetch: in the end every message is exactly one article."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

from sqlalchemy import func, select

from postdesk.db.models import Article, Channel, InboundMessage, InboundStatus
from postdesk.db.session import transaction
from postdesk.ingest.fetch import fetch_channel
from postdesk.runtime import Runtime
from tests.microsoft365.conftest import SignIn, channels
from tests.support.cli import environment_for
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

MESSAGES = 500


def test_killing_the_fetch_at_random_points_loses_and_duplicates_nothing(
    signin: SignIn, m365_runtime: Runtime, dovecot: DovecotServer, mailbox_user: str
) -> None:
    seed = int(os.environ.get("POSTDESK_CRASH_SEED", time.time_ns() % 1_000_000))
    print(f"crash test seed: {seed} (rerun with POSTDESK_CRASH_SEED={seed})")
    chance = random.Random(seed)
    assert signin.connect(mailbox_user).status_code == 303
    [channel] = channels(m365_runtime)
    with transaction(m365_runtime.sessions) as session:
        row = session.get(Channel, channel.id)
        assert row is not None
        row.delete_after_fetch = True  # the hardest mode: a lost message would be gone for good
    assert fetch_channel(m365_runtime, channel.id).error is None
    message_ids = [f"<crash-{n}@example.org>" for n in range(MESSAGES)]
    dovecot.deliver_many(
        mailbox_user,
        [
            customer_mail(to=mailbox_user, subject=f"Crash {n}", message_id=mid)
            for n, mid in enumerate(message_ids)
        ],
    )
    command = [sys.executable, "-m", "postdesk", "channel", "fetch", str(channel.id)]
    progress_at_kills: list[tuple[int, int]] = []
    for _attempt in range(60):
        if (
            _all_done(m365_runtime)
            and _progress(m365_runtime)[1] == MESSAGES
            and not dovecot.message_count(mailbox_user)
        ):
            break
        process = subprocess.Popen(
            command,
            env=environment_for(m365_runtime.settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill when the work has moved on by a random amount: a few more rows stored, or a few more
        # articles made. Watching progress rather than the clock keeps the kills inside the work on a
        # slow machine as well as a fast one.
        rows, articles = _progress(m365_runtime)
        if rows < MESSAGES:
            target = (rows + chance.randint(1, MESSAGES - rows), -1)
        else:
            target = (-1, articles + chance.randint(1, max(1, MESSAGES - articles)))
        if _wait_for(process, m365_runtime, target):
            process.send_signal(signal.SIGKILL)
            process.wait()
            progress_at_kills.append(_progress(m365_runtime))
            continue
        if process.returncode == 0 and _all_done(m365_runtime):
            break
    print(f"(inbound rows, articles) at each kill: {progress_at_kills}")
    # In the middle: something was stored, not everything became an article yet (all stored and none
    # processed counts too: that is the moment between fetching and processing).
    mid_work = [(rows, articles) for rows, articles in progress_at_kills if rows > 0 and articles < MESSAGES]
    assert len(mid_work) >= 2, "no kill landed in the middle of the work; the test proved nothing"
    with m365_runtime.sessions() as session:
        stored = Counter(session.scalars(select(Article.message_id).where(Article.channel_id == channel.id)))
        leftovers = session.scalars(
            select(InboundMessage).where(InboundMessage.status == InboundStatus.STORED)
        ).all()
    assert leftovers == []
    assert set(stored) == set(message_ids), f"missing: {sorted(set(message_ids) - set(stored))[:5]}"
    assert max(stored.values()) == 1, f"duplicated: {[m for m, n in stored.items() if n > 1][:5]}"
    assert dovecot.message_count(mailbox_user) == 0


def _wait_for(process: subprocess.Popen[bytes], runtime: Runtime, target: tuple[int, int]) -> bool:
    """Poll until progress reaches `target` (True: still running, kill it) or the process ends (False)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        rows, articles = _progress(runtime)
        if (target[0] >= 0 and rows >= target[0]) or (target[1] >= 0 and articles >= target[1]):
            return process.poll() is None
        time.sleep(0.01)
    return True


def _progress(runtime: Runtime) -> tuple[int, int]:
    with runtime.sessions() as session:
        rows = session.scalar(select(func.count()).select_from(InboundMessage)) or 0
        articles = session.scalar(select(func.count()).select_from(Article)) or 0
    return rows, articles


def _all_done(runtime: Runtime) -> bool:
    with runtime.sessions() as session:
        return not session.scalars(
            select(InboundMessage.id).where(InboundMessage.status == InboundStatus.STORED).limit(1)
        ).first()
