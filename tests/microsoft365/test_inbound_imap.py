"""Mail read from a real Dovecot over IMAP XOAUTH2 becomes tickets and follow-ups, exactly once."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import (
    Article,
    Channel,
    ChannelEvent,
    InboundMessage,
    InboundStatus,
    Ticket,
    TicketState,
)
from postdesk.db.session import transaction
from postdesk.ingest import fetch as fetch_module
from postdesk.ingest.fetch import fetch_channel
from postdesk.ingest.quarantine import reprocess
from postdesk.runtime import Runtime
from postdesk.sandbox import SandboxDirectory
from tests.microsoft365.conftest import fetch, tickets
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail


def articles_of(runtime: Runtime, number: int) -> list[Article]:
    with runtime.sessions() as session:
        ticket = session.scalar(select(Ticket).where(Ticket.number == number))
        assert ticket is not None
        return list(ticket.articles)


def test_new_mail_becomes_a_ticket_and_the_server_copy_is_marked_read(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    first = fetch(m365_runtime, channel_id)  # records where the folder stands
    assert first.fetched == 0
    dovecot.deliver(
        mailbox_user,
        customer_mail(
            to=mailbox_user,
            subject="Printer on fire",
            attachment=("photo.jpg", b"\xff\xd8 not really a jpeg"),
        ),
    )
    result = fetch(m365_runtime, channel_id)
    assert (result.fetched, result.processed.tickets) == (1, 1)
    [ticket] = tickets(m365_runtime)
    assert ticket.title == "Printer on fire"
    [article] = articles_of(m365_runtime, ticket.number)
    assert "printer is on fire" in article.body_text
    assert article.sender == "Jana Novák <jana.novak@example.org>"
    with m365_runtime.sessions() as session:
        customer = session.get(Ticket, ticket.id).customer  # type: ignore[union-attr]
        assert customer.email == "jana.novak@example.org"
        row = session.scalar(select(InboundMessage))
        assert row is not None and row.server_done and row.status is InboundStatus.PROCESSED
        assert [a.filename for a in session.get(Article, article.id).attachments] == ["photo.jpg"]  # type: ignore[union-attr]
    assert dovecot.message_count(mailbox_user) == 1  # kept on the server
    assert fetch(m365_runtime, channel_id).fetched == 0  # and not fetched again


def test_a_message_another_worker_stored_meanwhile_stays_its_own_and_is_finished_by_the_next_pass(
    m365_runtime: Runtime,
    channel_id: int,
    dovecot: DovecotServer,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Printer on fire"))
    store_batch = fetch_module._store_batch

    def successor_stores_it_first(*args: Any, **kwargs: Any) -> Any:
        # A worker whose lease ran out while it fetched: its successor stored the batch a moment ago.
        _runtime, result, folder, state, messages = args
        with transaction(m365_runtime.sessions) as session:
            for message in messages:
                session.add(
                    InboundMessage(
                        channel_id=result.channel_id,
                        folder=folder,
                        uidvalidity=state.uidvalidity,
                        uid=message.uid,
                        sha256="0" * 64,
                        size=len(message.raw),
                        status=InboundStatus.PROCESSED,
                    )
                )
        return store_batch(*args, **kwargs)

    monkeypatch.setattr(fetch_module, "_store_batch", successor_stores_it_first)
    late = fetch(m365_runtime, channel_id)
    monkeypatch.undo()

    with m365_runtime.sessions() as session:
        [row] = session.scalars(select(InboundMessage).where(InboundMessage.channel_id == channel_id))
        assert row.sha256 == "0" * 64  # the successor's row stands; no second row, no second ticket
    assert (late.fetched, late.processed.tickets) == (1, 0)
    assert tickets(m365_runtime) == []

    fetch(m365_runtime, channel_id)  # the server copy is flagged, and the row says so

    with m365_runtime.sessions() as session:
        [row] = session.scalars(select(InboundMessage).where(InboundMessage.channel_id == channel_id))
        assert row.server_done


def test_a_reply_naming_the_ticket_number_is_a_follow_up_that_reopens_it(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="VPN broken"))
    fetch(m365_runtime, channel_id)
    [ticket] = tickets(m365_runtime)
    with transaction(m365_runtime.sessions) as session:
        session.get(Ticket, ticket.id).state = TicketState.CLOSED  # type: ignore[union-attr]
    dovecot.deliver(
        mailbox_user,
        customer_mail(
            to=mailbox_user, subject=f"RE: [Ticket#{ticket.number}] VPN broken", body="Still broken."
        ),
    )
    result = fetch(m365_runtime, channel_id)
    assert result.processed.follow_ups == 1
    assert [t.state for t in tickets(m365_runtime)] == [TicketState.OPEN]
    assert [a.body_text.strip() for a in articles_of(m365_runtime, ticket.number)][-1] == "Still broken."


def test_a_reply_found_by_in_reply_to_joins_the_conversation(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject="Invoice", message_id="<first@example.org>")
    )
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject="Re: Invoice", in_reply_to="<first@example.org>")
    )
    result = fetch(m365_runtime, channel_id)
    assert (result.processed.tickets, result.processed.follow_ups) == (1, 1)
    [ticket] = tickets(m365_runtime)
    assert len(articles_of(m365_runtime, ticket.number)) == 2


def test_mail_already_there_waits_for_the_admin_and_only_unread_is_imported(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Old unread 1"), received=yesterday)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Old unread 2"), received=yesterday)
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject="Old and read"), flags="S", received=yesterday
    )
    first = fetch(m365_runtime, channel_id)
    assert (first.fetched, first.backlog_waiting) == (0, 2)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Brand new"))
    assert fetch(m365_runtime, channel_id).processed.tickets == 1  # new mail never waits
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).backlog_confirmed = True  # type: ignore[union-attr]
    fetch(m365_runtime, channel_id)
    assert sorted(t.title for t in tickets(m365_runtime)) == ["Brand new", "Old unread 1", "Old unread 2"]
    assert fetch(m365_runtime, channel_id).fetched == 0


def test_mail_sent_between_connecting_and_the_first_fetch_is_new_mail(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Written right after connecting"))
    result = fetch(m365_runtime, channel_id)
    assert (result.processed.tickets, result.backlog_waiting) == (1, None)


def test_delete_mode_removes_the_server_copy_only_after_it_is_stored(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).delete_after_fetch = True  # type: ignore[union-attr]
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Delete me after"))
    fetch(m365_runtime, channel_id)
    assert dovecot.message_count(mailbox_user) == 0
    assert [t.title for t in tickets(m365_runtime)] == ["Delete me after"]


def test_a_uidvalidity_change_reads_the_folder_again_without_duplicates(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    for n in range(3):
        dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject=f"Before resync {n}"))
    fetch(m365_runtime, channel_id)
    dovecot.reset_uidvalidity(mailbox_user)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="After resync"))
    fetch(m365_runtime, channel_id)
    titles = sorted(t.title for t in tickets(m365_runtime))
    assert titles == ["After resync", "Before resync 0", "Before resync 1", "Before resync 2"]


def test_an_oversized_message_is_kept_in_quarantine_and_can_be_reprocessed(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).max_message_bytes = 10_000  # type: ignore[union-attr]
    fetch(m365_runtime, channel_id)
    dovecot.deliver(
        mailbox_user,
        customer_mail(to=mailbox_user, subject="Huge scan", attachment=("scan.pdf", b"%PDF" + b"x" * 20_000)),
    )
    result = fetch(m365_runtime, channel_id)
    assert result.processed.quarantined == 1
    with m365_runtime.sessions() as session:
        row = session.scalar(select(InboundMessage))
        assert row is not None and row.status is InboundStatus.QUARANTINED
        assert "over this mailbox's limit of 0.0 MB" in (row.reason or "")
        row_id = row.id
        [event] = session.scalars(select(ChannelEvent).where(ChannelEvent.kind == "quarantined")).all()
        assert "1 quarantined" in event.message and "Quarantine" in event.message
    assert tickets(m365_runtime) == []
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).max_message_bytes = 25 * 1024 * 1024  # type: ignore[union-attr]
    row, _ = reprocess(m365_runtime, row_id)
    assert row is not None and row.status is InboundStatus.PROCESSED
    assert [t.title for t in tickets(m365_runtime)] == ["Huge scan"]


def test_a_full_spool_stops_the_fetch_before_anything_is_deleted(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).delete_after_fetch = True  # type: ignore[union-attr]
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Must survive"))
    spool = m365_runtime.settings.spool_dir
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_text("not a directory")  # writing into it now fails, as on a full or read-only disk
    result = fetch_channel(m365_runtime, channel_id)
    assert result.error is not None and "cannot write to the mail spool" in result.error
    assert dovecot.message_count(mailbox_user) == 1
    with m365_runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and "cannot write to the mail spool" in (channel.last_error or "")
    spool.unlink()
    fetch(m365_runtime, channel_id)
    assert [t.title for t in tickets(m365_runtime)] == ["Must survive"]
    assert dovecot.message_count(mailbox_user) == 0


def test_a_revoked_sign_in_stops_fetching_and_asks_for_reauthentication(
    m365_runtime: Runtime, channel_id: int, directory: SandboxDirectory, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    directory.revoke_refresh_tokens(mailbox_user)
    with transaction(m365_runtime.sessions) as session:
        # Make the cached access token unusable so that a refresh is needed.
        channel = session.get(Channel, channel_id)
        assert channel is not None and channel.token_cache is not None
        channel.token_cache = _expired(channel.token_cache)
    result = fetch_channel(m365_runtime, channel_id)
    assert result.error is not None and "AADSTS50173" in result.error
    with m365_runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None and channel.status.value == "needs_reauth"


def _expired(serialized: str) -> str:
    import json

    cache = json.loads(serialized)
    for entry in cache.get("AccessToken", {}).values():
        entry["expires_on"] = "1"
        entry["extended_expires_on"] = "1"
    return json.dumps(cache)


def test_with_idle_new_mail_becomes_a_ticket_within_seconds_without_polling(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    from postdesk.worker.mail import MailScheduler

    with transaction(m365_runtime.sessions) as session:
        session.get(Channel, channel_id).fetch_interval_seconds = 3600  # type: ignore[union-attr]
    fetch(m365_runtime, channel_id)  # where the folder stands
    scheduler = MailScheduler()
    try:
        scheduler(m365_runtime)  # nothing is due: this only starts the IDLE watcher
        watcher = scheduler.watcher(channel_id)
        assert watcher is not None and watcher.idling.wait(10)
        delivered = time.monotonic()
        dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Pushed by IDLE"))
        # Polling is an hour away, so a ticket at all proves the push; the latency target is benchmarked.
        while time.monotonic() - delivered < 60 and not tickets(m365_runtime):
            time.sleep(0.1)
        latency = time.monotonic() - delivered
    finally:
        scheduler.shutdown()
    assert [t.title for t in tickets(m365_runtime)] == ["Pushed by IDLE"]
    print(f"delivery to ticket with IDLE: {latency:.2f} s")


def test_the_ticket_prefix_is_configurable(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    from dataclasses import replace

    runtime = replace(
        m365_runtime, settings=m365_runtime.settings.model_copy(update={"ticket_prefix": "Case-"})
    )
    fetch(runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Broken laptop"))
    fetch(runtime, channel_id)
    [ticket] = tickets(runtime)
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject=f"Re: [Case-{ticket.number}] laptop")
    )
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject=f"Re: [Ticket#{ticket.number}] laptop")
    )
    result = fetch(runtime, channel_id)
    assert (result.processed.follow_ups, result.processed.tickets) == (1, 1)


def test_metrics_report_mailbox_health_and_what_became_of_the_mail(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str, desk: TestClient
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Counted in metrics"))
    fetch(m365_runtime, channel_id)
    desk.cookies.clear()  # scraped without a login
    text = desk.get("/metrics").text
    assert f'postdesk_channel_status{{channel_id="{channel_id}",status="ok"}} 1' in text
    assert f'postdesk_inbound_messages{{channel_id="{channel_id}",outcome="processed"}} 1' in text
    assert 'postdesk_tickets{state="new"} 1' in text
    assert f'postdesk_channel_last_successful_fetch_timestamp_seconds{{channel_id="{channel_id}"}}' in text
    assert mailbox_user not in text
