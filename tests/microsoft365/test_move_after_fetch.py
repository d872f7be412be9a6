"""Moving fetched mail to a folder once it is safely stored (issue #7), over IMAP against the test
Dovecot and over Graph against the sandbox, and the mailbox settings form that chooses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from imapclient import IMAPClient
from sqlalchemy import select, update

from postdesk.db.models import Channel, ChannelStatus, InboundMessage
from postdesk.db.session import transaction
from postdesk.ingest.fetch import access_token_for_channel, default_mailbox, fetch_channel, move_target
from postdesk.runtime import Runtime
from postdesk.sandbox import GraphMailStore
from postdesk.transports.errors import TransportError
from tests.conftest import csrf_from
from tests.microsoft365.conftest import fetch, tickets
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

GRAPH_RESOURCE = "https://graph.microsoft.com"


def move_to(runtime: Runtime, channel_id: int, folder: str | None) -> None:
    with transaction(runtime.sessions) as session:
        row = session.get(Channel, channel_id)
        assert row is not None
        row.move_to_folder = folder


def channel_row(runtime: Runtime, channel_id: int) -> Channel:
    with runtime.sessions() as session:
        row = session.get(Channel, channel_id)
        assert row is not None
        return row


def inbound_rows(runtime: Runtime, channel_id: int) -> list[InboundMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboundMessage).where(InboundMessage.channel_id == channel_id)))


def deliver_question(dovecot: DovecotServer, mailbox: str, subject: str = "Printer on fire") -> None:
    dovecot.deliver(mailbox, customer_mail(to=mailbox, subject=subject))


def archive_flags(dovecot: DovecotServer, mailbox: str) -> list[str]:
    """The maildir flag letters ("S" is \\Seen) of each message in the mailbox's Archive folder."""
    folder = dovecot.mailbox_path(mailbox) / ".Archive"
    files = [path for sub in ("new", "cur") if (folder / sub).is_dir() for path in (folder / sub).iterdir()]
    return [path.name.partition(":2,")[2] for path in files]


# -- finding the folder ---------------------------------------------------------------------------------


def test_the_folder_is_found_by_its_exact_path_before_one_that_differs_in_case() -> None:
    folders = ["INBOX", "INBOX/done", "INBOX/Done", "Archive"]

    assert move_target(folders, "INBOX/Done", read_folder="INBOX") == "INBOX/Done"
    assert move_target(folders, "archive", read_folder="INBOX") == "Archive"


@pytest.mark.parametrize(
    ("wanted", "said"),
    [("Handled", "'Handled' to move fetched mail to does not exist"), ("inbox", "the folder Postdesk reads")],
    ids=["missing", "the-folder-read"],
)
def test_a_missing_folder_or_the_folder_read_is_refused_for_good(wanted: str, said: str) -> None:
    with pytest.raises(TransportError, match=said) as refused:
        move_target(["INBOX", "Archive"], wanted, read_folder="INBOX")
    assert refused.value.permanent


# -- IMAP ---------------------------------------------------------------------------------------------


def test_fetched_mail_becomes_a_ticket_and_moves_read_to_the_folder(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    move_to(m365_runtime, channel_id, "Archive")
    deliver_question(dovecot, mailbox_user)

    first = fetch(m365_runtime, channel_id)
    again = fetch(m365_runtime, channel_id)

    assert (first.fetched, again.fetched) == (1, 0)
    assert [ticket.title for ticket in tickets(m365_runtime)] == ["Printer on fire"]
    assert dovecot.messages(mailbox_user) == []
    assert len(dovecot.messages(mailbox_user, "Archive")) == 1
    assert archive_flags(dovecot, mailbox_user) == ["S"]
    [row] = inbound_rows(m365_runtime, channel_id)
    assert row.server_done


def test_a_missing_folder_stops_the_mailbox_with_a_clear_error_and_loses_nothing(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    move_to(m365_runtime, channel_id, "Handled")
    deliver_question(dovecot, mailbox_user)

    failed = fetch_channel(m365_runtime, channel_id)

    assert failed.error is not None
    assert "'Handled'" in failed.error and "create it in Outlook or choose another" in failed.error
    channel = channel_row(m365_runtime, channel_id)
    assert (channel.status, channel.last_error) == (ChannelStatus.ERROR, failed.error)
    assert len(dovecot.messages(mailbox_user)) == 1  # where it was, untouched
    assert (tickets(m365_runtime), inbound_rows(m365_runtime, channel_id)) == ([], [])

    dovecot.create_folder(mailbox_user, "Handled")
    fetch(m365_runtime, channel_id)
    fetch(m365_runtime, channel_id)

    assert len(tickets(m365_runtime)) == 1
    assert len(inbound_rows(m365_runtime, channel_id)) == 1
    assert dovecot.messages(mailbox_user) == []
    assert len(dovecot.messages(mailbox_user, "Handled")) == 1
    recovered = channel_row(m365_runtime, channel_id)
    assert (recovered.status, recovered.last_error) == (ChannelStatus.OK, None)


def test_a_move_interrupted_before_it_was_noted_is_finished_without_a_second_copy(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    move_to(m365_runtime, channel_id, "/archive/")  # any case, outer slashes ignored
    deliver_question(dovecot, mailbox_user)
    fetch(m365_runtime, channel_id)
    # The process died after the server moved the message, before the row said so.
    with transaction(m365_runtime.sessions) as session:
        session.execute(update(InboundMessage).values(server_done=False))

    result = fetch(m365_runtime, channel_id)

    assert result.fetched == 0
    assert [row.server_done for row in inbound_rows(m365_runtime, channel_id)] == [True]
    assert dovecot.messages(mailbox_user) == []
    assert len(dovecot.messages(mailbox_user, "Archive")) == 1
    assert len(tickets(m365_runtime)) == 1


def test_without_the_move_extension_mail_is_copied_then_expunged(
    m365_runtime: Runtime,
    channel_id: int,
    dovecot: DovecotServer,
    mailbox_user: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offered = IMAPClient.has_capability
    copies: list[str] = []
    real_copy = IMAPClient.copy

    def without_move(client: IMAPClient, capability: str) -> bool:
        return capability.upper() != "MOVE" and bool(offered(client, capability))

    def copy(client: IMAPClient, messages: Any, folder: str) -> Any:
        copies.append(folder)
        return real_copy(client, messages, folder)

    monkeypatch.setattr(IMAPClient, "has_capability", without_move)
    monkeypatch.setattr(IMAPClient, "copy", copy)
    move_to(m365_runtime, channel_id, "Archive")
    deliver_question(dovecot, mailbox_user)

    fetch(m365_runtime, channel_id)

    assert copies == ["Archive"]
    assert dovecot.messages(mailbox_user) == []
    assert archive_flags(dovecot, mailbox_user) == ["S"]


def test_the_imap_transport_names_a_missing_folder_when_the_server_says_trycreate(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    deliver_question(dovecot, mailbox_user)
    with m365_runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None
        token = access_token_for_channel(session, m365_runtime, channel)
        session.commit()
    with default_mailbox(m365_runtime) as mailbox:
        mailbox.login(mailbox_user, token)
        mailbox.open("INBOX")
        uids = mailbox.uids_after(0)
        with pytest.raises(TransportError) as refused:
            mailbox.move(uids, "Nowhere")
    assert refused.value.permanent
    assert "'Nowhere'" in str(refused.value) and "create it in Outlook" in str(refused.value)
    assert len(dovecot.messages(mailbox_user)) == 1


# -- Graph --------------------------------------------------------------------------------------------


def deliver_graph(store: GraphMailStore, mailbox: str) -> str:
    raw = customer_mail(to=mailbox, sender="Jana Novák <jana@fabrikam.example>", subject="Printer on fire")
    return store.deliver(mailbox, raw)


def test_graph_mail_is_marked_read_and_moved_to_the_folder_by_its_path(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    store.create_folder(mailbox_user, "Done", parent="inbox")
    move_to(m365_runtime, graph_channel, "INBOX/Done")
    deliver_graph(store, mailbox_user)

    first = fetch(m365_runtime, graph_channel)
    again = fetch(m365_runtime, graph_channel)

    assert (first.fetched, again.fetched) == (1, 0)
    assert len(tickets(m365_runtime)) == 1
    assert store.messages(mailbox_user) == []
    [moved] = store.messages(mailbox_user, "Done")
    assert moved.is_read
    [row] = inbound_rows(m365_runtime, graph_channel)
    assert (row.remote_id, row.server_done) == (moved.immutable_id, True)


def test_graph_mail_waits_in_the_inbox_until_the_missing_folder_exists(
    m365_runtime: Runtime, graph_channel: int, store: GraphMailStore, mailbox_user: str
) -> None:
    move_to(m365_runtime, graph_channel, "Handled")
    deliver_graph(store, mailbox_user)

    failed = fetch_channel(m365_runtime, graph_channel)

    assert failed.error is not None and "'Handled'" in failed.error
    assert channel_row(m365_runtime, graph_channel).status is ChannelStatus.ERROR
    [waiting] = store.messages(mailbox_user)
    assert not waiting.is_read
    assert tickets(m365_runtime) == []

    store.create_folder(mailbox_user, "Handled")
    fetch(m365_runtime, graph_channel)
    fetch(m365_runtime, graph_channel)

    assert len(tickets(m365_runtime)) == 1
    assert store.messages(mailbox_user) == []
    assert [message.is_read for message in store.messages(mailbox_user, "Handled")] == [True]


# -- the settings form ------------------------------------------------------------------------------


def settings_form(csrf: str, **changes: str) -> dict[str, str]:
    form = {
        "csrf_token": csrf,
        "folder": "INBOX",
        "group_id": "",
        "after_fetch": "keep",
        "move_to_folder": "",
        "max_message_mb": "25",
        "fetch_interval_seconds": "30",
        "backlog_policy": "unread",
        "backlog_since": "",
    }
    return form | changes


Post = Callable[..., Any]


@pytest.fixture
def save_settings(desk: TestClient, channel_id: int) -> Post:
    def post(**changes: str) -> Any:
        csrf = csrf_from(desk.get(f"/channels/{channel_id}").text)
        return desk.post(
            f"/channels/{channel_id}/settings", data=settings_form(csrf, **changes), follow_redirects=False
        )

    return post


def test_the_settings_form_saves_and_shows_the_folder_to_move_to(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, save_settings: Post
) -> None:
    response = save_settings(after_fetch="move", move_to_folder=" Inbox/Done ")

    assert response.status_code == 303
    channel = channel_row(m365_runtime, channel_id)
    assert (channel.move_to_folder, channel.delete_after_fetch) == ("Inbox/Done", False)
    page = desk.get(f"/channels/{channel_id}").text
    assert '<option value="move" selected>' in page
    assert 'name="move_to_folder" maxlength="255" value="Inbox/Done"' in page


def test_choosing_delete_forgets_the_folder_to_move_to(
    m365_runtime: Runtime, channel_id: int, save_settings: Post
) -> None:
    save_settings(after_fetch="move", move_to_folder="Archive")

    save_settings(after_fetch="delete", move_to_folder="Archive")

    channel = channel_row(m365_runtime, channel_id)
    assert (channel.move_to_folder, channel.delete_after_fetch) == (None, True)


@pytest.mark.parametrize("folder", ["", "inbox", "/INBOX/"], ids=["empty", "the-folder-read", "slashes"])
def test_the_settings_form_refuses_a_move_without_another_folder(
    m365_runtime: Runtime, channel_id: int, save_settings: Post, folder: str
) -> None:
    response = save_settings(after_fetch="move", move_to_folder=folder)

    assert response.status_code == 422
    assert channel_row(m365_runtime, channel_id).move_to_folder is None
