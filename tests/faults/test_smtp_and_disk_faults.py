"""Faults on the way out and on the disk (issue #9): SMTP servers that answer 4xx or 5xx in the middle
of a transaction or hang up after the data, a spool the disk refuses, and `postdesk outbox flush`
killed again and again. Every reply reaches the customer exactly once or says in plain words why not.

What tests/microsoft365/test_outbound_smtp.py already proves is not repeated here: a busy greeting
and a 451 after the data for a single reply, a permanent refusal at AUTH, a crash or kill -9 after the
server took the message, and a (simulated) connection that broke mid-message and never reached it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from email.parser import BytesHeaderParser
from email.policy import default
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from postdesk import storage
from postdesk.db.models import (
    Article,
    Channel,
    ChannelStatus,
    DeliveryStatus,
    InboundMessage,
    OutboundMessage,
    Ticket,
)
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import fetch_channel
from postdesk.outbox.queue import Draft, ReplyNotStored, UploadedFile
from postdesk.outbox.sender import BACKOFF, send_due
from postdesk.runtime import Runtime
from postdesk.sandbox.submission import SENT_ITEMS, Stage, SubmissionServer
from tests.microsoft365 import conftest as m365
from tests.microsoft365.conftest import delivery_of, fetch, queue_draft, tickets
from tests.support.cli import run_postdesk, start_postdesk
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

# The Microsoft 365 tests' desk: a connected mailbox, a customer with a Dovecot inbox, their ticket.
m365_settings = m365.m365_settings
m365_runtime = m365.m365_runtime
m365_admin = m365.m365_admin
entra_app = m365.entra_app
desk = m365.desk
browser = m365.browser
signin = m365.signin
trusted_cas = m365.trusted_cas
mailbox_user = m365.mailbox_user
channel_id = m365.channel_id
customer = m365.customer
question_cc = m365.question_cc
ticket_number = m365.ticket_number

# Exchange Online's temporary refusals: 421 closes the connection (RFC 5321 3.8), 451 keeps it open.
CLOSING = "4.3.2 Service not available, closing transmission channel"
BUSY = "4.7.500 Server busy. Please try again later."
# The plain words an agent sees on a reply that waits for the server (outbox/explain.py's _BUSY).
BUSY_WORDS = "tries again automatically"


def _replies(runtime: Runtime, number: int, count: int) -> list[int]:
    """Queue ``count`` replies to ticket ``number``, in order: their articles' ids."""
    return [
        queue_draft(runtime, number, Draft(kind="reply", body_text=f"Answer {n} of {count}."))
        for n in range(count)
    ]


def _time_passes(runtime: Runtime) -> None:
    """Every retry is due and every sender's lease has run out, as if a few hours went by."""
    past = utcnow() - timedelta(seconds=1)
    with transaction(runtime.sessions) as session:
        session.execute(update(OutboundMessage).values(next_attempt_at=past))
        session.execute(
            update(OutboundMessage)
            .where(OutboundMessage.status == DeliveryStatus.SENDING)
            .values(lease_until=past)
        )


def _message_ids(raws: list[bytes]) -> Counter[str]:
    parser = BytesHeaderParser(policy=default)
    return Counter(str(parser.parsebytes(raw)["Message-ID"]) for raw in raws)


def _received(dovecot: DovecotServer, mailbox: str, folder: str = "INBOX") -> Counter[str]:
    """How many copies of each Message-ID the mailbox's folder holds."""
    return _message_ids(dovecot.messages(mailbox, folder))


def _message_id(runtime: Runtime, article_id: int) -> str:
    return delivery_of(runtime, article_id).message_id


def _waits_with_backoff(runtime: Runtime, article_id: int, *, attempts: int, code: int) -> timedelta:
    """The reply is queued for a later attempt after ``attempts`` tries, with the server's words and
    Postdesk's plain ones, and its next attempt one backoff step away: how long it waits."""
    row = delivery_of(runtime, article_id)
    assert row.status is DeliveryStatus.QUEUED
    assert row.attempts == attempts
    assert row.server_reply is not None and row.server_reply.startswith(str(code))
    assert BUSY_WORDS in (row.last_error or "")
    wait = row.next_attempt_at - utcnow()
    assert BACKOFF[attempts - 1] - timedelta(seconds=30) < wait <= BACKOFF[attempts - 1]
    return wait


# -- 1. temporary refusals in the middle of a transaction ------------------------------------------


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
@pytest.mark.parametrize(("code", "text"), [(421, CLOSING), (451, BUSY)], ids=["421", "451"])
def test_a_temporary_refusal_mid_transaction_is_retried_and_delivered_once(
    stage: Stage,
    code: int,
    text: str,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
) -> None:
    first, second = _replies(m365_runtime, ticket_number, 2)
    smtp_submission.fail_next(stage, code, text)
    report = send_due(m365_runtime)
    _waits_with_backoff(m365_runtime, first, attempts=1, code=code)
    if code == 421:
        # The server hung up: the other reply waits for the next pass, not in doubt (never sent).
        assert (report.sent, report.retrying, report.failed) == (0, 2, 0), report.problems
        other = delivery_of(m365_runtime, second)
        assert other.status is DeliveryStatus.QUEUED
        assert other.last_error == "the connection to the SMTP server broke"
    else:
        # The connection stays usable: the other reply goes out in the same pass.
        assert (report.sent, report.retrying, report.failed) == (1, 1, 0), report.problems
        assert delivery_of(m365_runtime, second).status is DeliveryStatus.SENT
    assert send_due(m365_runtime).sent == 0  # the backoff is respected
    _time_passes(m365_runtime)
    again = send_due(m365_runtime)
    assert again.sent == (2 if code == 421 else 1) and not again.problems
    assert delivery_of(m365_runtime, first).attempts == 2
    expected = {_message_id(m365_runtime, first): 1, _message_id(m365_runtime, second): 1}
    assert _received(dovecot, customer) == expected
    assert len(smtp_submission.accepted) == 2


def test_repeated_temporary_refusals_back_off_further_each_time(
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
) -> None:
    [reply] = _replies(m365_runtime, ticket_number, 1)
    smtp_submission.fail_next("mail", 421, CLOSING)
    smtp_submission.fail_next("rcpt", 451, BUSY)
    smtp_submission.fail_next("data", 451, BUSY)
    waits = []
    for attempt, code in enumerate([421, 451, 451], start=1):
        assert send_due(m365_runtime).retrying == 1
        waits.append(_waits_with_backoff(m365_runtime, reply, attempts=attempt, code=code))
        _time_passes(m365_runtime)
    assert timedelta(seconds=30) < waits[0] < waits[1] < waits[2]
    [listed] = json.loads(run_postdesk(m365_runtime.settings, "outbox", "list", "--json").stdout)
    assert listed["status"] == "queued" and listed["attempts"] == 3
    assert BUSY_WORDS in listed["last_error"] and listed["server_reply"].startswith("451")
    assert send_due(m365_runtime).sent == 1
    sent = delivery_of(m365_runtime, reply)
    assert (sent.status, sent.attempts, sent.last_error) == (DeliveryStatus.SENT, 4, None)
    assert _received(dovecot, customer) == {sent.message_id: 1}


# -- 2. the connection ends after the data, before the answer ------------------------------------


def test_a_connection_lost_after_the_server_took_the_message_sends_no_second_copy(
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    mailbox_user: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
) -> None:
    maybe_sent, behind = _replies(m365_runtime, ticket_number, 2)
    smtp_submission.drop_after_data(accepted=True)  # delivered, then the 250 never arrives
    report = send_due(m365_runtime)
    assert (report.sent, report.retrying) == (0, 2)
    held = delivery_of(m365_runtime, maybe_sent)
    assert held.status is DeliveryStatus.SENDING
    assert "Checking whether it went out" in (held.last_error or "")
    assert delivery_of(m365_runtime, behind).status is DeliveryStatus.QUEUED
    assert send_due(m365_runtime, include_waiting=True).sent == 1  # only the one behind; not blind
    _time_passes(m365_runtime)
    settled = send_due(m365_runtime)
    assert (settled.already_sent, settled.sent) == (1, 0)
    row = delivery_of(m365_runtime, maybe_sent)
    assert row.status is DeliveryStatus.SENT and "Sent Items" in (row.server_reply or "")
    expected = {row.message_id: 1, _message_id(m365_runtime, behind): 1}
    assert _received(dovecot, customer) == expected
    assert _received(dovecot, mailbox_user, SENT_ITEMS) == expected
    assert len(smtp_submission.accepted) == 2


# -- 3. permanent refusals -------------------------------------------------------------------------

PERMANENT: list[tuple[Stage, int, str, str]] = [
    (
        "mail",
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
        "refused to send as this address",
    ),
    (
        "rcpt",
        550,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        "A recipient address does not exist",
    ),
    (
        "data",
        554,
        "5.6.0 Corrupt message content; STOREDRV.Deliver.Exception:ConversionFailedException",
        "The mail server refused the message",
    ),
]


@pytest.mark.parametrize(("stage", "code", "text", "words"), PERMANENT, ids=[p[0] for p in PERMANENT])
def test_a_permanent_refusal_fails_that_reply_and_the_others_go_out(
    stage: Stage,
    code: int,
    text: str,
    words: str,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
) -> None:
    refused, *others = _replies(m365_runtime, ticket_number, 3)
    smtp_submission.fail_next(stage, code, text)
    report = send_due(m365_runtime)
    assert (report.sent, report.failed, report.retrying) == (2, 1, 0), report.problems
    row = delivery_of(m365_runtime, refused)
    assert row.status is DeliveryStatus.FAILED
    assert row.server_reply == f"{code} {text}"
    assert words in (row.last_error or "")
    assert any(words in problem for problem in report.problems)
    # Nothing retries it on its own: not the worker's next pass, not a flush of everything waiting.
    assert send_due(m365_runtime, include_waiting=True).sent == 0
    _time_passes(m365_runtime)
    assert send_due(m365_runtime, include_waiting=True).sent == 0
    row = delivery_of(m365_runtime, refused)
    assert (row.status, row.attempts) == (DeliveryStatus.FAILED, 1)
    assert _received(dovecot, customer) == {_message_id(m365_runtime, a): 1 for a in others}
    assert len(smtp_submission.accepted) == 2


@pytest.mark.parametrize(
    ("stage", "code", "text"),
    [
        ("connect", 554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using Spamhaus"),
        ("ehlo", 550, "5.7.1 Client does not have permission to submit mail to this server"),
    ],
    ids=["greeting", "ehlo"],
)
def test_a_permanent_refusal_before_any_message_fails_the_mailbox_s_replies_with_the_reason(
    stage: Stage,
    code: int,
    text: str,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
) -> None:
    article_ids = _replies(m365_runtime, ticket_number, 2)
    smtp_submission.fail_next(stage, code, text)
    report = send_due(m365_runtime)
    assert (report.sent, report.failed, report.retrying) == (0, 2, 0), report.problems
    for article_id in article_ids:
        row = delivery_of(m365_runtime, article_id)
        assert row.status is DeliveryStatus.FAILED and row.server_reply == f"{code} {text}"
        assert "The mail server refused the message" in (row.last_error or "")
    _time_passes(m365_runtime)
    assert send_due(m365_runtime, include_waiting=True).sent == 0
    assert smtp_submission.accepted == [] and not _received(dovecot, customer)


# -- 4. a disk that refuses the bytes ---------------------------------------------------------------


class _FileSystemRefuses:
    """Makes Postdesk's file store fail the way a full disk (ENOSPC: the write fails) or a read-only
    mount (EROFS: creating the file fails) does. Tests run as root in CI, where file modes stop
    nothing, so the refusal is injected where the store touches the disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: int) -> None:
        self.error = error
        if error == errno.ENOSPC:
            monkeypatch.setattr(storage, "_write_all", self._refuse)
        else:
            monkeypatch.setattr(storage, "tempfile", self)

    def mkstemp(self, *, dir: str, prefix: str) -> tuple[int, str]:
        raise OSError(self.error, os.strerror(self.error), dir)

    def _refuse(self, fd: int, content: bytes) -> None:
        raise OSError(self.error, os.strerror(self.error))


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()} if root.is_dir() else set()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_reply_the_disk_cannot_store_is_refused_with_a_reason_and_leaves_nothing_behind(
    error: int,
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    dovecot: DovecotServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = m365_runtime.settings
    files_before = _files_under(settings.spool_dir) | _files_under(settings.attachments_dir)
    draft = Draft(kind="reply", body_text="Invoice attached.", attachments=(UploadedFile("i.pdf", b"%PDF"),))
    with monkeypatch.context() as patch:
        _FileSystemRefuses(patch, error)
        with pytest.raises(ReplyNotStored) as refused:
            queue_draft(m365_runtime, ticket_number, draft)
    assert os.strerror(error) in str(refused.value)
    assert "Nothing was queued or sent" in str(refused.value)
    with m365_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboundMessage)) == 0
        [ticket] = session.scalars(select(Ticket)).all()
        assert len(ticket.articles) == 1  # the customer's mail only: no outbound article
    # No half-written file either: the store cleans up its temporary files.
    files_after = _files_under(settings.spool_dir) | _files_under(settings.attachments_dir)
    assert files_after == files_before
    # Once the disk takes writes again the same reply goes out, once.
    queue_draft(m365_runtime, ticket_number, draft)
    assert send_due(m365_runtime).sent == 1
    assert sum(_received(dovecot, customer).values()) == 1


def test_the_command_line_says_why_a_reply_could_not_be_stored(
    m365_runtime: Runtime, ticket_number: int, tmp_path: Path
) -> None:
    body = tmp_path / "reply.txt"
    body.write_text("Stored?\n", encoding="utf-8")
    spool = m365_runtime.settings.spool_dir
    aside = spool.with_name("spool-aside")
    spool.rename(aside)
    spool.write_text("not a directory")  # no file can be created in it, not even by root
    try:
        result = run_postdesk(
            m365_runtime.settings, "ticket", "reply", str(ticket_number), "--body-file", str(body)
        )
    finally:
        spool.unlink()
        aside.rename(spool)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "The reply was not saved" in message and "POSTDESK_DATA_DIR" in message
    assert "Traceback" not in result.stderr
    with m365_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboundMessage)) == 0
        assert session.scalar(select(func.count()).select_from(Article)) == 1


def test_a_read_only_spool_stops_the_fetch_before_anything_is_deleted_and_says_why(
    m365_runtime: Runtime,
    channel_id: int,
    dovecot: DovecotServer,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).delete_after_fetch = True  # type: ignore[union-attr]
    fetch(m365_runtime, channel_id)  # records where the folder stands
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Survives a read-only disk"))
    with monkeypatch.context() as patch:
        _FileSystemRefuses(patch, errno.EROFS)
        result = fetch_channel(m365_runtime, channel_id)
    assert result.error is not None
    assert "cannot write to the mail spool (Read-only file system)" in result.error
    assert "nothing was removed from the server" in result.error
    assert dovecot.message_count(mailbox_user) == 1
    with m365_runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and channel.status is ChannelStatus.ERROR
        assert "Read-only file system" in (channel.last_error or "")
        assert session.scalar(select(func.count()).select_from(InboundMessage)) == 0
    fetch(m365_runtime, channel_id)  # the disk is writable again
    assert [t.title for t in tickets(m365_runtime)] == ["Survives a read-only disk"]
    assert dovecot.message_count(mailbox_user) == 0
    with m365_runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and channel.status is ChannelStatus.OK and not channel.last_error


# -- 5. kill -9 of the sender, again and again ------------------------------------------------------

REPLIES = 60
MAX_KILLS_PER_ROUND = 6


@dataclass(frozen=True)
class _Kill:
    marked_sent: int  # outbound rows the database had as sent when the process died
    accepted: int  # messages the server had taken by then

    def in_doubt(self) -> bool:
        """The server had taken a message the database did not yet know was sent."""
        return self.accepted > self.marked_sent


def test_killing_the_sender_at_random_points_delivers_every_reply_exactly_once(
    m365_runtime: Runtime,
    ticket_number: int,
    customer: str,
    mailbox_user: str,
    dovecot: DovecotServer,
    smtp_submission: SubmissionServer,
) -> None:
    seed = int(os.environ.get("POSTDESK_CRASH_SEED", time.time_ns() % 1_000_000))
    print(f"crash test seed: {seed} (rerun with POSTDESK_CRASH_SEED={seed})")
    chance = random.Random(seed)
    article_ids: list[int] = []
    kills: list[_Kill] = []
    mid_work = 0
    # Rounds of 60 replies until at least two kills have landed in the middle of the sending.
    for _round in range(3):
        article_ids += _replies(m365_runtime, ticket_number, REPLIES)
        round_kills = _flush_with_kills(m365_runtime, smtp_submission, chance, len(article_ids))
        kills += round_kills
        mid_work += sum(kill.marked_sent < len(article_ids) for kill in round_kills)
        if mid_work >= 2:
            break
    print(
        f"(marked sent, accepted by the server) at each kill: {[(k.marked_sent, k.accepted) for k in kills]}"
    )
    in_doubt = sum(kill.in_doubt() for kill in kills)
    print(f"kills after the server took a message and before it was marked sent: {in_doubt}")
    assert mid_work >= 2, "fewer than two kills landed mid-work; the test proved too little"
    assert in_doubt, "no kill landed between the server's acceptance and the bookkeeping"
    with m365_runtime.sessions() as session:
        rows = session.scalars(select(OutboundMessage)).all()
    assert len(rows) == len(article_ids)
    assert Counter(row.status for row in rows) == {DeliveryStatus.SENT: len(rows)}
    expected = {row.message_id: 1 for row in rows}
    delivered = _received(dovecot, customer)
    missing = sorted(set(expected) - set(delivered))
    duplicated = sorted(mid for mid, copies in delivered.items() if copies > 1)
    assert not missing, f"never delivered: {missing[:5]}"
    assert not duplicated, f"delivered more than once: {duplicated[:5]}"
    assert delivered == expected
    assert _received(dovecot, mailbox_user, SENT_ITEMS) == expected
    assert len(smtp_submission.accepted) == len(rows)


def _flush_with_kills(
    runtime: Runtime, submission: SubmissionServer, chance: random.Random, total: int
) -> list[_Kill]:
    """Run `postdesk outbox flush` again and again, killing it when the work has moved on by a random
    amount, until every reply is marked sent. Between runs, time passes: the dead sender's leases end.
    Every other kill (the first included) lands while the server holds back its 250 for a message it
    took: the in-doubt moment, where only the look in Sent Items stands between the customer and a
    second copy."""
    kills: list[_Kill] = []
    for run in range(MAX_KILLS_PER_ROUND + 5):
        if _marked_sent(runtime) == total:
            return kills
        _time_passes(runtime)
        in_doubt = run % 2 == 0 and len(submission.accepted) < total
        trigger = (_holding_an_answer if in_doubt else _rows_marked_sent)(runtime, submission, chance, total)
        process = start_postdesk(runtime.settings, "outbox", "flush")
        try:
            if len(kills) >= MAX_KILLS_PER_ROUND or not _wait_for(process, trigger):
                submission.release_answers()
                process.wait(timeout=120)
                continue
            process.send_signal(signal.SIGKILL)
            process.wait()
        finally:
            submission.release_answers()
            if process.poll() is None:
                process.kill()
                process.wait()
        kills.append(_Kill(_marked_sent(runtime), len(submission.accepted)))
    pytest.fail(f"{total - _marked_sent(runtime)} replies still not marked sent after {len(kills)} kills")


# When to kill is chosen by progress, not the clock, so kills land inside the work on a slow machine as
# well as a fast one.


def _rows_marked_sent(
    runtime: Runtime, submission: SubmissionServer, chance: random.Random, total: int
) -> Callable[[], bool]:
    """Kill once some more rows are marked sent in the database."""
    marked = _marked_sent(runtime)
    target = marked + chance.randint(1, total - marked)
    return lambda: _marked_sent(runtime) >= target


def _holding_an_answer(
    runtime: Runtime, submission: SubmissionServer, chance: random.Random, total: int
) -> Callable[[], bool]:
    """Kill once the server has taken some more messages and holds back its answer to the last one."""
    more = chance.randint(1, total - len(submission.accepted))
    target = len(submission.accepted) + more
    submission.hold_answers(after=more - 1)
    return lambda: len(submission.accepted) >= target


def _wait_for(process: subprocess.Popen[bytes], reached: Callable[[], bool]) -> bool:
    """Poll until the trigger fires (True: still running, kill it) or the process ends (False)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if reached():
            return process.poll() is None
        time.sleep(0.01)
    pytest.fail("`postdesk outbox flush` made no progress for two minutes")


def _marked_sent(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return (
            session.scalar(
                select(func.count())
                .select_from(OutboundMessage)
                .where(OutboundMessage.status == DeliveryStatus.SENT)
            )
            or 0
        )
