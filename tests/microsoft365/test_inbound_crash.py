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
    command = [sys.executable, "-m", "postdesk", "channel", "fetch", str(channel.id)]
    message_ids: list[str] = []
    progress_at_kills: list[tuple[int, int]] = []
    mid_work = 0
    # Rounds of 500 messages until at least two kills have landed in the middle of the work (stored
    # but not all made articles); batches of 200 make a round occasionally finish between two kills.
    for round_number in range(3):
        batch = [f"<crash-{round_number}-{n}@example.org>" for n in range(MESSAGES)]
        message_ids += batch
        dovecot.deliver_many(
            mailbox_user,
            [customer_mail(to=mailbox_user, subject=f"Crash {mid}", message_id=mid) for mid in batch],
        )
        kills = _kill_until_done(command, m365_runtime, dovecot, mailbox_user, chance, len(message_ids))
        progress_at_kills += kills
        mid_work += len(_mid_work(kills, len(message_ids)))
        if mid_work >= 2:
            break
    print(f"(inbound rows, articles) at each kill: {progress_at_kills}")
    assert mid_work >= 2, "no kill landed in the middle of the work; the test proved nothing"
    with m365_runtime.sessions() as session:
        stored = Counter(session.scalars(select(Article.message_id).where(Article.channel_id == channel.id)))
        leftovers = session.scalars(
            select(InboundMessage).where(InboundMessage.status == InboundStatus.STORED)
        ).all()
    assert leftovers == []
    assert set(stored) == set(message_ids), f"missing: {sorted(set(message_ids) - set(stored))[:5]}"
    assert max(stored.values()) == 1, f"duplicated: {[m for m, n in stored.items() if n > 1][:5]}"
    assert dovecot.message_count(mailbox_user) == 0


def _kill_until_done(
    command: list[str],
    runtime: Runtime,
    dovecot: DovecotServer,
    mailbox: str,
    chance: random.Random,
    expected: int,
) -> list[tuple[int, int]]:
    """Run the fetch again and again, killing it when the work has moved on by a random amount."""
    progress_at_kills: list[tuple[int, int]] = []
    for _attempt in range(60):
        if _all_done(runtime) and _progress(runtime)[1] == expected and not dovecot.message_count(mailbox):
            break
        process = subprocess.Popen(
            command,
            env=environment_for(runtime.settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Watching progress rather than the clock keeps the kills inside the work on a slow machine as
        # well as a fast one.
        rows, articles = _progress(runtime)
        if rows < expected:
            target = (rows + chance.randint(1, expected - rows), -1)
        else:
            target = (-1, articles + chance.randint(1, max(1, expected - articles)))
        if _wait_for(process, runtime, target):
            process.send_signal(signal.SIGKILL)
            process.wait()
            progress_at_kills.append(_progress(runtime))
            continue
        if process.returncode == 0 and _all_done(runtime):
            break
    return progress_at_kills


def _mid_work(progress_at_kills: list[tuple[int, int]], expected: int) -> list[tuple[int, int]]:
    """Kills after something was stored and before everything became an article (all stored and none
    processed counts too: that is the moment between fetching and processing)."""
    return [(rows, articles) for rows, articles in progress_at_kills if rows > 0 and articles < expected]


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
