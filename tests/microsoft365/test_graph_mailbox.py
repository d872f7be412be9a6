"""A mailbox read and answered through Microsoft Graph instead of IMAP and SMTP (issue #7), end to end
against the sandbox: real sign-in, real tokens for the Graph resource, the sandbox's Graph mail API."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk import storage
from postdesk.db.models import (
    BacklogPolicy,
    Channel,
    ChannelStatus,
    DeliveryStatus,
    InboundMessage,
    Transport,
)
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.ingest import graph_fetch
from postdesk.ingest.fetch import fetch_channel
from postdesk.mail.compose import OutgoingAttachment
from postdesk.outbox.queue import Draft
from postdesk.outbox.sender import send_due
from postdesk.runtime import Runtime
from postdesk.sandbox import GraphMailStore, SandboxDirectory
from postdesk.sandbox.graph import SentMail
from postdesk.sandbox.submission import SubmissionServer
from postdesk.transports.errors import OutcomeUnknown
from postdesk.transports.graph import GraphMailbox
from tests.microsoft365.conftest import (
    QUESTION_ID,
    SignIn,
    changing_delivery,
    channels,
    delivery_of,
    fetch,
    queue_draft,
    tickets,
)
from tests.support.mailfactory import customer_mail

GRAPH_RESOURCE = "https://graph.microsoft.com"


def inbound_rows(runtime: Runtime, channel_id: int) -> list[InboundMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboundMessage).where(InboundMessage.channel_id == channel_id)))


def channel_row(runtime: Runtime, channel_id: int) -> Channel:
    with runtime.sessions() as session:
        row = session.get(Channel, channel_id)
        assert row is not None
        return row


def deliver(store: GraphMailStore, mailbox: str, *, subject: str = "Printer on fire", **options: Any) -> str:
    raw = customer_mail(
        to=mailbox, sender="Jana Novák <jana@fabrikam.example>", subject=subject, message_id=None
    )
    return store.deliver(mailbox, raw, **options)


# -- inbound ------------------------------------------------------------------------------------


def test_it_turns_mail_delivered_through_graph_into_one_ticket_and_flags_it_read(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    deliver(store, mailbox_user)

    first = fetch(m365_runtime, graph_channel)
    again = fetch(m365_runtime, graph_channel)

    assert (first.fetched, again.fetched) == (1, 0)
    [ticket] = tickets(m365_runtime)
    assert ticket.title == "Printer on fire"
    [message] = store.messages(mailbox_user)
    assert message.is_read
    [row] = inbound_rows(m365_runtime, graph_channel)
    channel = channel_row(m365_runtime, graph_channel)
    assert row.remote_id == message.immutable_id
    assert (row.folder, row.uidvalidity, row.uid) == (
        store.folder_id(mailbox_user, "inbox"),
        0,
        graph_fetch.uid_for(message.immutable_id),
    )
    assert row.server_done
    assert channel.graph_folder_id == store.folder_id(mailbox_user, "inbox")
    assert channel.graph_delta_link
    assert channel.last_error is None


def test_it_deletes_fetched_mail_when_the_channel_says_so(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    with transaction(m365_runtime.sessions) as session:
        row = session.get(Channel, graph_channel)
        assert row is not None
        row.delete_after_fetch = True
    deliver(store, mailbox_user)

    fetch(m365_runtime, graph_channel)

    assert len(tickets(m365_runtime)) == 1
    assert store.messages(mailbox_user) == []
    assert len(store.messages(mailbox_user, "deleteditems")) == 1


class Crash(Exception):
    """The process dies here."""


@pytest.mark.parametrize("where", ["after the spool write", "before the delta link is saved"])
def test_a_crash_mid_round_neither_loses_nor_duplicates_mail(
    m365_runtime: Runtime,
    graph_channel: int,
    store: GraphMailStore,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    fetch(m365_runtime, graph_channel)  # the delta link of the empty inbox
    deliver(store, mailbox_user, subject="First")
    if where == "after the spool write":
        real_store_many = storage.store_many

        def spool_then_die(root: Path, contents: list[bytes]) -> list[str]:
            real_store_many(root, contents)
            raise Crash

        monkeypatch.setattr(graph_fetch, "store_many", spool_then_die)
    else:

        def die(*args: object) -> None:
            raise Crash

        monkeypatch.setattr(graph_fetch, "save_delta_link", die)

    with pytest.raises(Crash):
        fetch_channel(m365_runtime, graph_channel)
    monkeypatch.undo()
    deliver(store, mailbox_user, subject="Second")
    fetch(m365_runtime, graph_channel)
    fetch(m365_runtime, graph_channel)

    assert sorted(ticket.title for ticket in tickets(m365_runtime)) == ["First", "Second"]
    assert len(inbound_rows(m365_runtime, graph_channel)) == 2
    assert all(message.is_read for message in store.messages(mailbox_user))


def test_a_lost_delta_state_reads_the_folder_afresh_without_duplicates(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    deliver(store, mailbox_user, subject="Before")
    fetch(m365_runtime, graph_channel)
    store.expire_delta_tokens(mailbox_user)
    deliver(store, mailbox_user, subject="After")

    result = fetch(m365_runtime, graph_channel)

    assert result.fetched == 1
    assert sorted(ticket.title for ticket in tickets(m365_runtime)) == ["After", "Before"]


def test_it_waits_as_graph_asks_when_throttled_and_then_fetches(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    deliver(store, mailbox_user)
    store.throttle_next(1, retry_after=1, path=r"/messages/delta$")

    started = time.monotonic()
    result = fetch(m365_runtime, graph_channel)

    assert time.monotonic() - started >= 1
    assert result.fetched == 1
    assert len(tickets(m365_runtime)) == 1


def test_throttling_longer_than_a_pass_waits_is_the_channels_last_error_in_plain_words(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    deliver(store, mailbox_user)
    store.throttle_next(1, retry_after=600, path=r"/messages/delta$")

    failed = fetch_channel(m365_runtime, graph_channel)
    channel = channel_row(m365_runtime, graph_channel)

    assert failed.error is not None
    assert channel.last_error == failed.error
    assert "throttling" in channel.last_error
    assert "retried automatically" in channel.last_error
    assert channel.status is ChannelStatus.OK  # passing: the worker tries again
    assert fetch(m365_runtime, graph_channel).fetched == 1
    assert channel_row(m365_runtime, graph_channel).last_error is None


def test_mail_already_in_the_folder_waits_for_the_import_decision(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    long_ago = utcnow() - timedelta(days=3)
    deliver(store, mailbox_user, subject="Old unread", received=long_ago)
    deliver(store, mailbox_user, subject="Old read", received=long_ago, is_read=True)
    deliver(store, mailbox_user, subject="New")

    waiting = fetch(m365_runtime, graph_channel)

    assert [ticket.title for ticket in tickets(m365_runtime)] == ["New"]
    assert waiting.backlog_waiting == 1  # the default choice: only unread mail
    channel = channel_row(m365_runtime, graph_channel)
    assert (channel.backlog_policy, channel.backlog_count) == (BacklogPolicy.UNREAD, 1)
    with transaction(m365_runtime.sessions) as session:
        row = session.get(Channel, graph_channel)
        assert row is not None
        row.backlog_confirmed = True

    fetch(m365_runtime, graph_channel)
    fetch(m365_runtime, graph_channel)

    assert sorted(ticket.title for ticket in tickets(m365_runtime)) == ["New", "Old unread"]
    assert channel_row(m365_runtime, graph_channel).backlog_done


# -- outbound -----------------------------------------------------------------------------------


def sent_from(store: GraphMailStore, mailbox: str) -> list[SentMail]:
    """What Graph accepted for sending from ``mailbox`` (the store keeps every test's)."""
    return [sent for sent in store.sent if sent.mailbox == mailbox]


@pytest.fixture
def graph_ticket(m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str) -> int:
    raw = customer_mail(
        to=mailbox_user,
        sender="Jana Novák <jana@fabrikam.example>",
        subject="Printer on fire",
        message_id=QUESTION_ID,
    )
    store.deliver(mailbox_user, raw)
    fetch(m365_runtime, graph_channel)
    [ticket] = tickets(m365_runtime)
    return ticket.number


def test_an_agent_reply_goes_out_through_graph_send_mail_with_threading_headers(
    m365_runtime: Runtime,
    graph_ticket: int,
    store: GraphMailStore,
    mailbox_user: str,
    smtp_submission: SubmissionServer,
) -> None:
    article_id = queue_draft(
        m365_runtime, graph_ticket, Draft(kind="reply", body_text="A technician is on the way.")
    )

    report = send_due(m365_runtime)

    assert report.sent == 1, report.problems
    [sent] = sent_from(store, mailbox_user)
    assert sent.mailbox == mailbox_user
    assert sent.recipients == ("jana@fabrikam.example",)
    headers = message_from_bytes(sent.raw, policy=policy.default)
    row = delivery_of(m365_runtime, article_id)
    assert headers["Message-ID"] == row.message_id
    assert headers["In-Reply-To"] == QUESTION_ID
    assert QUESTION_ID in str(headers["References"])
    assert row.status is DeliveryStatus.SENT
    assert (row.server_reply or "").startswith("202 Accepted by Microsoft Graph")
    copies = store.messages(mailbox_user, "sentitems")
    assert [message_from_bytes(c.raw)["Message-ID"] for c in copies] == [row.message_id]
    assert smtp_submission.accepted == []  # nothing went over SMTP


@pytest.mark.parametrize(
    ("fault", "went_out"),
    [("broken connection", True), ("broken connection", False), (504, True), (502, True), (500, False)],
)
def test_a_send_of_unknown_outcome_is_settled_through_sent_items_without_a_duplicate(
    m365_runtime: Runtime,
    graph_ticket: int,
    store: GraphMailStore,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
    fault: str | int,
    went_out: bool,
) -> None:
    """The connection breaks after the message was handed over, or Graph answers 5xx (its front end gave
    up waiting); in either case the mailbox server may (went_out) or may not have sent it."""
    if fault == "broken connection":
        real_send = GraphMailbox.send_mime

        def broken_after_handing_over(self: GraphMailbox, raw: bytes) -> None:
            if went_out:
                real_send(self, raw)
            raise OutcomeUnknown("the connection broke after the message was handed over")

        monkeypatch.setattr(GraphMailbox, "send_mime", broken_after_handing_over)
    else:
        store.fail_next(
            status=int(fault),
            code="UnknownError",
            message="Something went wrong upstream.",
            path="sendMail$",
            after_serving=went_out,
        )
    article_id = queue_draft(m365_runtime, graph_ticket, Draft(kind="reply", body_text="On it."))

    first = send_due(m365_runtime)
    monkeypatch.undo()
    in_doubt = delivery_of(m365_runtime, article_id)
    with changing_delivery(m365_runtime, article_id) as row:
        row.lease_until = utcnow() - timedelta(seconds=1)  # the check's wait is over
    second = send_due(m365_runtime)

    assert (first.sent, first.retrying) == (0, 1)
    assert in_doubt.status is DeliveryStatus.SENDING
    if fault != "broken connection":
        assert f"answered {fault} UnknownError" in (in_doubt.last_error or "")
    assert (second.already_sent, second.sent) == ((1, 0) if went_out else (0, 1))
    assert delivery_of(m365_runtime, article_id).status is DeliveryStatus.SENT
    assert len(sent_from(store, mailbox_user)) == 1


@pytest.mark.parametrize("went_out", [True, False])
def test_a_large_reply_whose_send_failed_leaves_no_draft_behind_and_goes_once(
    m365_runtime: Runtime, graph_ticket: int, store: GraphMailStore, mailbox_user: str, went_out: bool
) -> None:
    # Over Graph's 4 MB request limit: sent through a draft, whose send is answered 500.
    invoice = OutgoingAttachment("invoice-scan.pdf", os.urandom(5 * 1024 * 1024), "application/pdf")
    store.fail_next(
        status=500,
        code="UnknownError",
        message="Something went wrong upstream.",
        path="/messages/[^/]+/send$",
        after_serving=went_out,
    )
    draft = Draft(kind="reply", body_text="The scan is attached.", attachments=(invoice,))
    article_id = queue_draft(m365_runtime, graph_ticket, draft)

    first = send_due(m365_runtime)
    left_in_drafts = len(store.messages(mailbox_user, "drafts"))
    with changing_delivery(m365_runtime, article_id) as row:
        row.lease_until = utcnow() - timedelta(seconds=1)  # the check's wait is over
    second = send_due(m365_runtime)

    assert (first.sent, first.retrying) == (0, 1)
    assert left_in_drafts == (0 if went_out else 1)
    assert (second.already_sent, second.sent) == ((1, 0) if went_out else (0, 1))
    assert store.messages(mailbox_user, "drafts") == []  # nobody can send the old draft by hand later
    assert len(sent_from(store, mailbox_user)) == 1


def test_a_send_turned_away_with_503_is_tried_again_after_retry_after_and_goes_once(
    m365_runtime: Runtime, graph_ticket: int, store: GraphMailStore, mailbox_user: str
) -> None:
    store.unavailable_next(retry_after=1, path="sendMail$")
    article_id = queue_draft(m365_runtime, graph_ticket, Draft(kind="reply", body_text="On it."))

    result = send_due(m365_runtime)

    assert result.sent == 1
    assert delivery_of(m365_runtime, article_id).status is DeliveryStatus.SENT
    assert len(sent_from(store, mailbox_user)) == 1


# -- folders and shared mailboxes -----------------------------------------------------------------


def test_a_folder_chosen_by_its_path_is_read_instead_of_the_inbox(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str, desk: TestClient
) -> None:
    inbox = store.folder_id(mailbox_user, "inbox")
    store.create_folder(mailbox_user, "Customers", parent=inbox)
    listed = desk.get(f"/channels/{graph_channel}/folders")
    assert "Inbox/Customers" in listed.text  # the folder picker shows Graph's folders by path
    with transaction(m365_runtime.sessions) as session:
        row = session.get(Channel, graph_channel)
        assert row is not None
        row.folder = "Inbox/Customers"
    deliver(store, mailbox_user, subject="Left in the Inbox")
    deliver(store, mailbox_user, subject="Filed for support", folder="Customers")

    assert fetch(m365_runtime, graph_channel).fetched == 1

    assert [t.title for t in tickets(m365_runtime)] == ["Filed for support"]
    assert channel_row(m365_runtime, graph_channel).graph_folder_id == store.folder_id(
        mailbox_user, "Customers"
    )


def test_a_shared_mailbox_on_graph_is_read_and_answered_as_itself_through_a_delegate(
    signin: SignIn,
    m365_runtime: Runtime,
    directory: SandboxDirectory,
    store: GraphMailStore,
    mailbox_user: str,
) -> None:
    shared = directory.add_shared_mailbox(f"graph-help-{time.monotonic_ns()}@contoso.onmicrosoft.com", "Help")
    directory.grant_mailbox_rights(shared, mailbox_user, full_access=True, send_as=True)

    connected = signin.connect(mailbox_user, query=f"?transport=graph&mailbox=shared&shared_address={shared}")

    assert connected.status_code == 303, connected.text
    [channel] = channels(m365_runtime)
    assert (channel.email, channel.shared, channel.transport) == (shared, True, Transport.GRAPH)
    assert channel.account_username == mailbox_user
    deliver(store, shared, subject="Invoice question")
    assert fetch(m365_runtime, channel.id).fetched == 1
    [ticket] = tickets(m365_runtime)
    queue_draft(m365_runtime, ticket.number, Draft(kind="reply", body_text="Here is your invoice."))

    assert send_due(m365_runtime).sent == 1

    [sent] = sent_from(store, shared)
    assert (sent.mailbox, sent.sender) == (shared, shared)
    assert store.messages(mailbox_user) == []  # the delegate's own mailbox is not involved
