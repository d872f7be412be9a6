"""The Graph transport client against the sandbox's Graph mail API, over real HTTPS with real sandbox
tokens (issue #7). Each test uses fresh Contoso users and shared mailboxes."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import pytest

from postdesk.sandbox import GraphMailStore, MailboxRight, SandboxServer
from postdesk.transports.errors import TransportError
from postdesk.transports.graph import (
    UPLOAD_RANGE_UNIT,
    GraphMailbox,
    GraphRefusal,
    MessageTooLarge,
    detach_attachments,
)
from tests.sandbox import test_graph_api as graph_api
from tests.sandbox.test_graph_api import SHARED, NewAddress, TokenFor, customer_mail, deliver_numbered

# The sandbox Graph tests' fixtures, reused: a Graph app, the store (reset around each test), tokens,
# fresh users and shared mailboxes.
graph_app = graph_api.graph_app
store = graph_api.store
token_for = graph_api.token_for
app_token = graph_api.app_token
new_user = graph_api.new_user
new_shared = graph_api.new_shared

OpenMailbox = Callable[..., GraphMailbox]
MIB = 1024 * 1024


@pytest.fixture
def sandbox_tls(sandbox: SandboxServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sandbox.ca_path))


@pytest.fixture
def open_mailbox(sandbox: SandboxServer, sandbox_tls: ssl.SSLContext) -> Iterator[OpenMailbox]:
    """`open_mailbox(address_or_None, token=..., **options)`: a client on the sandbox's Graph."""
    opened: list[GraphMailbox] = []

    def open_(mailbox: str | None, *, token: Any, **options: Any) -> GraphMailbox:
        client = GraphMailbox(sandbox.base_url, mailbox, token=token, ssl_context=sandbox_tls, **options)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        client.close()


def threaded_reply(sender: str, to: str, *, attachments: Sequence[tuple[str, bytes]] = ()) -> EmailMessage:
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = "Re: [Ticket#1042] Printer on fire"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="desk.example.test")
    message["In-Reply-To"] = "<original-1042@example.org>"
    message["References"] = " ".join(f"<earlier-{n}-1042@example.org>" for n in range(6))
    message.set_content("We have sent a technician.")
    for name, content in attachments:
        message.add_attachment(content, maintype="application", subtype="octet-stream", filename=name)
    return message


def threading_headers(raw: bytes) -> dict[str, str]:
    parsed = message_from_bytes(raw, policy=policy.default)
    return {name: " ".join(str(parsed[name]).split()) for name in ("Message-ID", "In-Reply-To", "References")}


def attachments_of(raw: bytes) -> dict[str, bytes]:
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    found: dict[str, bytes] = {}
    for part in parsed.iter_attachments():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found[part.get_filename() or ""] = payload
    return found


# -- folders ----------------------------------------------------------------------------------


def test_it_lists_nested_folders_as_paths_across_pages(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    customers = store.create_folder(user, "Customers", parent="inbox")
    vip = store.create_folder(user, "VIP", parent=customers)
    for number in range(4):
        store.create_folder(user, f"Project {number}")
    mailbox = open_mailbox(None, token=token_for(user), page_size=3)

    folders = dict((path, folder_id) for folder_id, path in mailbox.folders())

    assert folders["Inbox/Customers"] == customers
    assert folders["Inbox/Customers/VIP"] == vip
    assert folders["Inbox"] == store.folder_id(user, "inbox")
    assert {"Sent Items", "Deleted Items", "Drafts", "Project 0", "Project 3"} <= set(folders)
    assert len(folders) == 7 + 4 + 2


# -- reading ----------------------------------------------------------------------------------


def test_it_reads_a_message_as_the_mime_that_was_delivered(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    raw = customer_mail("Printer on fire", to=user)
    store.deliver(user, raw)
    message_id = store.messages(user)[0].immutable_id
    mailbox = open_mailbox(user, token=token_for(user), delegate=user)

    assert mailbox.raw(message_id) == raw


def test_a_message_over_the_size_cap_is_not_read(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    store.deliver(user, customer_mail("Big", to=user, body="x" * 5000))
    message_id = store.messages(user)[0].immutable_id
    mailbox = open_mailbox(None, token=token_for(user))

    with pytest.raises(MessageTooLarge) as raised:
        mailbox.raw(message_id, max_bytes=1000)

    assert raised.value.permanent
    assert mailbox.raw(message_id, max_bytes=100_000) is not None


def test_vanished_messages_are_skipped_not_errors(
    open_mailbox: OpenMailbox, token_for: TokenFor, new_user: NewAddress
) -> None:
    mailbox = open_mailbox(None, token=token_for(new_user()))
    gone = "AAkALgAAAAAAHYQDEapmEc2byACqACgone"

    assert mailbox.raw(gone) is None
    assert mailbox.mark_read([gone]) == [gone]
    assert mailbox.move([gone], "archive") == {gone: None}
    assert mailbox.delete([gone]) == [gone]


# -- changing ---------------------------------------------------------------------------------


def test_it_marks_read_moves_and_deletes_and_ids_survive_the_move(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    for subject in ("First", "Second", "Third"):
        store.deliver(user, customer_mail(subject, to=user))
    third, second, first = (m.immutable_id for m in store.messages(user))
    mailbox = open_mailbox(None, token=token_for(user))

    skipped = mailbox.mark_read([first, second])
    moved = mailbox.move([second], store.folder_id(user, "archive"))
    deleted = mailbox.delete([third])

    assert skipped == [] and deleted == []
    assert moved == {second: second}
    assert [(m.immutable_id, m.is_read) for m in store.messages(user)] == [(first, True)]
    assert [(m.immutable_id, m.is_read) for m in store.messages(user, "archive")] == [(second, True)]
    assert [m.immutable_id for m in store.messages(user, "deleteditems")] == [third]


def test_without_immutable_ids_a_move_returns_the_new_id(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    old_id = store.deliver(user, customer_mail("Moving", to=user))
    mailbox = open_mailbox(None, token=token_for(user), immutable_ids=False)

    moved = mailbox.move([old_id], "archive")

    assert moved[old_id] == store.messages(user, "archive")[0].id != old_id


# -- delta ------------------------------------------------------------------------------------


def test_a_delta_round_pages_through_the_folder_and_the_next_has_only_the_changes(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    deliver_numbered(store, user, "Ticket", 12)
    mailbox = open_mailbox(None, token=token_for(user), page_size=5)

    first = mailbox.delta("inbox")
    pages = list(first)
    doomed = pages[0].messages[0].id
    mailbox.delete([doomed])
    store.deliver(user, customer_mail("Late arrival", to=user))
    late = store.messages(user)[0]
    second = mailbox.delta("inbox", first.delta_link)
    changes = list(second)

    assert [len(page.messages) for page in pages] == [5, 5, 2]
    assert {m.id for page in pages for m in page.messages} == {
        m.immutable_id for m in store.messages(user) if m.immutable_id != late.immutable_id
    } | {doomed}
    assert all(m.internet_message_id and m.received and m.is_read is False for p in pages for m in p.messages)
    assert [m.id for page in changes for m in page.messages] == [late.immutable_id]
    assert [r for page in changes for r in page.removed] == [doomed]
    assert not first.resynced and not second.resynced
    assert not any(page.resync for page in pages + changes)


def test_the_delta_link_is_known_only_after_the_last_page(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    deliver_numbered(store, user, "Ticket", 3)
    round_ = open_mailbox(None, token=token_for(user), page_size=2).delta("inbox")
    pages = iter(round_)
    next(pages)

    with pytest.raises(RuntimeError, match="not finished"):
        _ = round_.delta_link
    list(pages)

    assert "deltatoken" in round_.delta_link


def test_an_expired_delta_link_starts_a_full_round_flagged_as_resync(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    store.deliver(user, customer_mail("Old", to=user))
    mailbox = open_mailbox(None, token=token_for(user))
    first = mailbox.delta("inbox")
    list(first)
    store.deliver(user, customer_mail("New", to=user))
    store.expire_delta_tokens(user)

    again = mailbox.delta("inbox", first.delta_link)
    pages = list(again)
    after = list(mailbox.delta("inbox", again.delta_link))

    assert again.resynced
    assert all(page.resync for page in pages)
    assert {m.id for page in pages for m in page.messages} == {m.immutable_id for m in store.messages(user)}
    assert [m for page in after for m in page.messages] == []


def test_a_delta_state_lost_in_the_middle_of_a_round_restarts_it_in_full(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    deliver_numbered(store, user, "Ticket", 5)
    round_ = open_mailbox(None, token=token_for(user), page_size=2).delta("inbox")
    pages = iter(round_)
    before = next(pages)
    store.expire_delta_tokens(user)
    rest = list(pages)

    assert not before.resync and all(page.resync for page in rest)
    assert {m.id for page in rest for m in page.messages} == {m.immutable_id for m in store.messages(user)}
    assert round_.resynced and round_.delta_link


def test_a_delta_link_for_another_host_is_not_followed_with_the_token(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    store.deliver(user, customer_mail("Hello", to=user))
    mailbox = open_mailbox(None, token=token_for(user))

    round_ = mailbox.delta(
        "inbox", "https://graph.elsewhere.invalid/v1.0/me/mailFolders/inbox/messages/delta"
    )
    pages = list(round_)

    assert round_.resynced
    assert [m.id for page in pages for m in page.messages] == [store.messages(user)[0].immutable_id]


# -- sending ----------------------------------------------------------------------------------


def test_small_mime_goes_out_in_one_send_mail_with_threading_headers_intact(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    reply = threaded_reply(agent, colleague).as_bytes()
    sent_before = len(store.sent)

    open_mailbox(None, token=token_for(agent)).send_mime(reply)

    sent = store.sent[sent_before:]
    assert len(sent) == 1 and sent[0].sender == agent
    assert threading_headers(sent[0].raw) == threading_headers(reply)
    assert threading_headers(store.messages(colleague)[0].raw) == threading_headers(reply)
    assert store.messages(agent, "drafts") == []


def test_mime_over_4_mb_goes_through_a_draft_and_an_upload_session(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    logs = os.urandom(5 * MIB)
    reply = threaded_reply(
        agent, colleague, attachments=[("logs.bin", logs), ("note.txt", b"small")]
    ).as_bytes()
    sent_before = len(store.sent)

    open_mailbox(None, token=token_for(agent)).send_mime(reply)

    sent = store.sent[sent_before:]
    assert len(sent) == 1
    assert threading_headers(sent[0].raw) == threading_headers(reply)
    assert attachments_of(sent[0].raw) == {"logs.bin": logs, "note.txt": b"small"}
    assert attachments_of(store.messages(colleague)[0].raw)["logs.bin"] == logs
    assert store.messages(agent, "drafts") == []
    assert len(store.messages(agent, "sentitems")) == 1


def test_several_medium_attachments_over_4_mb_are_added_one_post_each(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    files = {f"scan-{n}.pdf": os.urandom(3 * MIB // 2) for n in range(3)}
    reply = threaded_reply(agent, colleague, attachments=list(files.items())).as_bytes()
    sent_before = len(store.sent)

    open_mailbox(None, token=token_for(agent), delegate=agent).send_mime(reply)

    sent = store.sent[sent_before:]
    assert len(sent) == 1
    assert attachments_of(sent[0].raw) == files
    assert threading_headers(sent[0].raw) == threading_headers(reply)


def test_a_failed_upload_discards_the_draft_and_sends_nothing(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    reply = threaded_reply(agent, colleague, attachments=[("logs.bin", os.urandom(5 * MIB))]).as_bytes()
    store.fail_next(
        status=500, code="generalException", message="Something broke.", path="createUploadSession"
    )
    sent_before = len(store.sent)

    with pytest.raises(GraphRefusal) as raised:
        open_mailbox(None, token=token_for(agent)).send_mime(reply)

    assert not raised.value.permanent
    assert store.sent[sent_before:] == []
    assert store.messages(agent, "drafts") == []
    assert store.messages(colleague) == []


def test_an_upload_session_that_ends_early_is_transient_not_a_sign_in_problem(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    reply = threaded_reply(agent, colleague, attachments=[("logs.bin", os.urandom(5 * MIB))]).as_bytes()
    store.fail_next(
        status=401,
        code="InvalidAuthenticationToken",
        message="Expired.",
        path="AttachmentSessions",
        method="PUT",
    )

    with pytest.raises(TransportError) as raised:
        open_mailbox(None, token=token_for(agent)).send_mime(reply)

    assert not raised.value.permanent and not raised.value.needs_reauth
    assert "upload session ended" in str(raised.value)
    assert store.messages(agent, "drafts") == []


def test_detaching_keeps_the_header_block_byte_for_byte_and_takes_out_only_what_it_must() -> None:
    big, medium = os.urandom(3 * MIB), os.urandom(MIB)
    reply = threaded_reply(
        "agent@contoso.example",
        "customer@example.org",
        attachments=[("big.bin", big), ("medium.bin", medium)],
    ).as_bytes()
    # Folded and spaced the way Outlook writes headers, which Python's email package would rewrite.
    head, _, body = reply.partition(b"\r\n\r\n")
    head = head.replace(b"References: ", b"References:\r\n\t", 1) + b"\r\nThread-Topic:  Printer   on fire"
    reply = head + b"\r\n\r\n" + body

    draft, detached = detach_attachments(reply)

    assert draft.partition(b"\r\n\r\n")[0] == head
    assert [(a.name, a.content) for a in detached] == [("big.bin", big)]
    assert attachments_of(draft) == {"medium.bin": medium}
    assert len(draft) * 4 / 3 <= 4 * MIB


def test_the_upload_range_must_be_a_multiple_of_320_kib(
    sandbox: SandboxServer, sandbox_tls: ssl.SSLContext
) -> None:
    with pytest.raises(ValueError, match="320 KiB"):
        GraphMailbox(sandbox.base_url, None, token="t", ssl_context=sandbox_tls, upload_range=1000 * 1000)
    with pytest.raises(ValueError, match="320 KiB"):
        GraphMailbox(
            sandbox.base_url, None, token="t", ssl_context=sandbox_tls, upload_range=13 * UPLOAD_RANGE_UNIT
        )


# -- throttling -------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", ["429", "503"])
def test_it_waits_as_long_as_retry_after_says(
    answer: str, open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    mailbox = open_mailbox(None, token=token_for(user))
    if answer == "429":
        store.throttle_next(retry_after=1, path="mailFolders")
    else:
        store.unavailable_next(retry_after=1, path="mailFolders")

    started = time.monotonic()
    folders = mailbox.folders()

    assert time.monotonic() - started >= 1.0
    assert "Inbox" in {path for _, path in folders}


def test_throttling_past_the_wait_budget_is_a_transient_error_that_says_so(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    mailbox = open_mailbox(user, token=token_for(user), max_retry_wait=1.5)
    store.throttle_next(3, retry_after=1, path="mailFolders")

    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        mailbox.folders()
    elapsed = time.monotonic() - started

    assert 1.0 <= elapsed < 2.0
    assert not raised.value.permanent and not raised.value.needs_reauth
    assert "throttling" in str(raised.value) and "retried automatically" in str(raised.value)
    assert "client-request-id" in str(raised.value)


def test_no_more_requests_run_at_once_per_mailbox_than_graph_allows(
    open_mailbox: OpenMailbox, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    # No waiting allowed: a single 429 from the sandbox's limit of four would fail a thread.
    mailboxes = [open_mailbox(user, token=token, max_retry_wait=0) for _ in range(8)]
    failures: list[BaseException] = []

    def list_folders(mailbox: GraphMailbox) -> None:
        try:
            mailbox.folders()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=list_folders, args=(mailbox,)) for mailbox in mailboxes]
    store.hold_requests()
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while store.in_flight(user) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        in_flight_while_held = store.in_flight(user)
        waiting = sum(thread.is_alive() for thread in threads)
    finally:
        store.release_requests()
    for thread in threads:
        thread.join(timeout=20)

    assert in_flight_while_held == 4
    assert waiting == 8
    assert failures == []


# -- tracing ----------------------------------------------------------------------------------


def test_every_request_carries_a_client_request_id_logged_with_graphs_request_id(
    caplog: pytest.LogCaptureFixture,
    open_mailbox: OpenMailbox,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
) -> None:
    user = new_user()
    token = token_for(user)
    mailbox = open_mailbox(None, token=token)
    store.fail_next(status=400, code="ErrorInvalidRequest", message="Bad.", path="mailFolders")

    with caplog.at_level(logging.DEBUG, logger="postdesk.transports.graph"):
        with pytest.raises(GraphRefusal) as raised:
            mailbox.folders()
        mailbox.folders()

    trace = mailbox.last_trace
    assert trace is not None and trace.request_id
    assert uuid.UUID(trace.client_request_id).version == 4
    # The sandbox uses its own request-id as the client-request-id only when the client sent none.
    assert trace.request_id != trace.client_request_id
    refused = raised.value.trace
    assert refused.client_request_id != trace.client_request_id
    assert f"client-request-id {refused.client_request_id}" in str(raised.value)
    assert f"request-id {refused.request_id}" in str(raised.value)
    assert trace.client_request_id in caplog.text and str(trace.request_id) in caplog.text
    assert refused.client_request_id in caplog.text
    assert token not in caplog.text


# -- shared mailboxes and permissions ---------------------------------------------------------


def test_reading_a_shared_mailbox_without_full_access_names_the_powershell_fix(
    open_mailbox: OpenMailbox,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
    new_shared: NewAddress,
) -> None:
    agent, shared = new_user(), new_shared()
    store.deliver(shared, customer_mail("For support", to=shared))
    mailbox = open_mailbox(shared, token=token_for(agent, scope=SHARED), delegate=agent)

    with pytest.raises(GraphRefusal) as raised:
        list(mailbox.delta("inbox"))
    store.grant(shared, agent, MailboxRight.FULL_ACCESS)
    pages = list(mailbox.delta("inbox"))

    assert raised.value.permanent and not raised.value.needs_reauth
    assert raised.value.code == "ErrorAccessDenied"
    assert f"Add-MailboxPermission -Identity {shared} -User {agent} -AccessRights FullAccess" in str(
        raised.value
    )
    assert "Mail.Read.Shared" in str(raised.value)
    [message] = [m for page in pages for m in page.messages]
    assert mailbox.raw(message.id) == store.messages(shared)[0].raw


def test_sending_as_a_shared_mailbox_needs_send_as_and_says_how_to_grant_it(
    open_mailbox: OpenMailbox,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
    new_shared: NewAddress,
) -> None:
    agent, colleague, shared = new_user(), new_user(), new_shared()
    reply = threaded_reply(shared, colleague).as_bytes()
    mailbox = open_mailbox(shared, token=token_for(agent, scope=SHARED), delegate=agent)
    sent_before = len(store.sent)

    with pytest.raises(GraphRefusal) as raised:
        mailbox.send_mime(reply)
    store.grant(shared, agent, MailboxRight.SEND_AS)
    mailbox.send_mime(reply)

    assert raised.value.permanent and raised.value.code == "ErrorSendAsDenied"
    assert f"Add-RecipientPermission {shared} -Trustee {agent} -AccessRights SendAs" in str(raised.value)
    [sent] = store.sent[sent_before:]
    assert (sent.mailbox, sent.sender) == (shared, shared)
    assert threading_headers(store.messages(colleague)[0].raw) == threading_headers(reply)


def test_an_app_without_mail_send_is_told_about_the_permission_and_exchanges_scoping(
    open_mailbox: OpenMailbox, store: GraphMailStore, app_token: Callable[..., str], new_shared: NewAddress
) -> None:
    shared = new_shared()
    store.deliver(shared, customer_mail("Via the daemon", to=shared))
    mailbox = open_mailbox(shared, token=app_token("Mail.ReadWrite"), app_only=True)

    pages = list(mailbox.delta("inbox"))
    with pytest.raises(GraphRefusal) as raised:
        mailbox.send_mime(threaded_reply(shared, "customer@example.org").as_bytes())

    assert len(pages[0].messages) == 1
    assert raised.value.permanent
    assert "Mail.Send" in str(raised.value)
    assert "RBAC for Applications" in str(raised.value)
    assert f"Test-ApplicationAccessPolicy -Identity {shared}" in str(raised.value)


def test_a_mailbox_outside_exchange_online_is_a_permanent_error_about_the_licence(
    open_mailbox: OpenMailbox, store: GraphMailStore, app_token: Callable[..., str], new_user: NewAddress
) -> None:
    user = new_user()
    store.disable_mailbox(user)
    mailbox = open_mailbox(user, token=app_token("Mail.ReadWrite"), app_only=True)

    with pytest.raises(GraphRefusal) as raised:
        mailbox.folders()

    assert raised.value.permanent and not raised.value.needs_reauth
    assert raised.value.code == "MailboxNotEnabledForRESTAPI"
    assert "Exchange Online licence" in str(raised.value)


def test_a_refused_token_asks_for_a_new_sign_in(open_mailbox: OpenMailbox, new_user: NewAddress) -> None:
    user = new_user()
    mailbox = open_mailbox(None, token=lambda: "not-a-token", delegate=user)

    with pytest.raises(GraphRefusal) as raised:
        mailbox.folders()

    assert raised.value.needs_reauth and raised.value.permanent
    assert raised.value.code == "InvalidAuthenticationToken"
    assert f"sign-in of {user}" in str(raised.value) and "sign in to the mailbox again" in str(raised.value)


# -- the network ------------------------------------------------------------------------------


def test_an_unreachable_graph_is_a_transient_error(sandbox_tls: ssl.SSLContext) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    mailbox = GraphMailbox(f"https://127.0.0.1:{closed_port}", None, token="t", ssl_context=sandbox_tls)

    with mailbox, pytest.raises(TransportError) as raised:
        mailbox.folders()

    assert not raised.value.permanent
    assert "cannot connect to Microsoft Graph" in str(raised.value)


def test_an_untrusted_certificate_is_permanent_and_names_the_settings(sandbox: SandboxServer) -> None:
    mailbox = GraphMailbox(sandbox.base_url, None, token="t", ssl_context=ssl.create_default_context())

    with mailbox, pytest.raises(TransportError) as raised:
        mailbox.folders()

    assert raised.value.permanent
    assert "POSTDESK_CA_BUNDLE" in str(raised.value)
