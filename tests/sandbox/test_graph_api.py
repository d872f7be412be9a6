"""The sandbox's Microsoft Graph mail API, driven over real HTTPS with httpx and real sandbox tokens.

Each test uses fresh Contoso users and shared mailboxes, so mail, delegates and delta state never carry
over from one test to the next.
"""

from __future__ import annotations

import base64
import itertools
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid
from typing import Any

import httpx
import pytest

from postdesk.sandbox import (
    CONTOSO_TENANT_ID,
    GraphMailStore,
    MailboxRight,
    RegisteredApp,
    SandboxDirectory,
    SandboxServer,
)
from postdesk.sandbox.mailserver import access_token_for

GRAPH = "https://graph.microsoft.com"
READ_WRITE_SEND = f"{GRAPH}/Mail.ReadWrite {GRAPH}/Mail.Send"
SHARED = f"{GRAPH}/Mail.ReadWrite.Shared {GRAPH}/Mail.Send.Shared"
CUSTOMER = "customer@example.org"
TokenFor = Callable[..., str]
NewAddress = Callable[[], str]
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def graph_app(sandbox: SandboxServer) -> RegisteredApp:
    return sandbox.directory.register_app(
        display_name="Postdesk (Graph tests)",
        application_permissions=[f"{GRAPH}/Mail.ReadWrite", f"{GRAPH}/Mail.Send"],
    )


@pytest.fixture
def store(sandbox: SandboxServer, directory: SandboxDirectory) -> Iterator[GraphMailStore]:
    sandbox.graph.reset()
    yield sandbox.graph
    sandbox.graph.reset()


@pytest.fixture
def graph(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))
    with httpx.Client(
        base_url=f"{sandbox.base_url}/v1.0", verify=context, trust_env=False, timeout=20
    ) as client:
        yield client


@pytest.fixture
def token_for(directory: SandboxDirectory, graph_app: RegisteredApp) -> TokenFor:
    """`token_for(upn, scope=...)`: a delegated Graph token as the sandbox issues it after consent."""

    def issue(upn: str, *, scope: str = READ_WRITE_SEND) -> str:
        return access_token_for(directory, graph_app, upn, scope=scope)

    return issue


@pytest.fixture
def app_token(sandbox: SandboxServer, directory: SandboxDirectory) -> Callable[..., str]:
    """`app_token(*permissions)`: an app-only token from the token endpoint (client credentials)."""

    def issue(*permissions: str) -> str:
        app = directory.register_app(
            display_name="Postdesk daemon (Graph tests)",
            application_permissions=[f"{GRAPH}/{name}" for name in permissions],
        )
        context = ssl.create_default_context(cafile=str(sandbox.ca_path))
        response = httpx.post(
            f"{sandbox.base_url}/{CONTOSO_TENANT_ID}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": app.client_id,
                "client_secret": app.client_secrets[0].value,
                "scope": f"{GRAPH}/.default",
            },
            verify=context,
            trust_env=False,
        )
        token: str = response.json()["access_token"]
        return token

    return issue


@pytest.fixture
def new_user(directory: SandboxDirectory) -> NewAddress:
    def create() -> str:
        number = next(_numbers)
        return directory.add_user(
            upn=f"graph-user-{number}@contoso.onmicrosoft.com",
            display_name=f"Graph User {number}",
            tenant_id=CONTOSO_TENANT_ID,
        ).upn

    return create


@pytest.fixture
def new_shared(store: GraphMailStore) -> NewAddress:
    def create() -> str:
        number = next(_numbers)
        return store.add_mailbox(
            f"graph-shared-{number}@contoso.onmicrosoft.com", display_name=f"Support {number}", shared=True
        ).address

    return create


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def customer_mail(subject: str, *, to: str, body: str = "Hello, my printer is on fire.") -> bytes:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = f"Customer <{CUSTOMER}>"
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="example.org")
    message.set_content(body)
    return message.as_bytes()


def reply_mime(sender: str, *, subject: str = "Re: your ticket", to: str = CUSTOMER) -> bytes:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content("We are on it.")
    return message.as_bytes()


def mime_body(raw: bytes) -> bytes:
    return base64.encodebytes(raw)  # line-wrapped base64, as Graph's own example shows


def post_mime(graph: httpx.Client, url: str, token: str, raw: bytes) -> httpx.Response:
    """POST a MIME message the way Graph takes one: base64 in a text/plain body."""
    return graph.post(url, content=mime_body(raw), headers=bearer(token, **{"Content-Type": "text/plain"}))


def deliver_numbered(store: GraphMailStore, user: str, subject: str, count: int) -> list[str]:
    """``count`` customer mails in the user's inbox, subjects "<subject> 0", "<subject> 1", ...: their ids."""
    return [store.deliver(user, customer_mail(f"{subject} {n}", to=user)) for n in range(count)]


def create_upload_session(
    graph: httpx.Client, token: str, draft_id: str, *, name: str, size: int
) -> httpx.Response:
    """Ask for an upload session for a file attachment of ``size`` bytes to the draft."""
    return graph.post(
        f"/me/messages/{draft_id}/attachments/createUploadSession",
        json={"AttachmentItem": {"attachmentType": "file", "name": name, "size": size}},
        headers=bearer(token),
    )


def assert_graph_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert set(error["innerError"]) >= {"date", "request-id", "client-request-id"}
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    return error


def collect_delta(
    client: httpx.Client, url: str, token: str, **headers: str
) -> tuple[list[dict[str, Any]], str]:
    """Follow nextLinks to the end of a round: every item and the deltaLink."""
    items: list[dict[str, Any]] = []
    while True:
        page = client.get(url, headers=bearer(token, **headers))
        assert page.status_code == 200, page.text
        items += page.json()["value"]
        if "@odata.deltaLink" in page.json():
            return items, page.json()["@odata.deltaLink"]
        url = page.json()["@odata.nextLink"]


# -- folders ----------------------------------------------------------------------------------


def test_it_lists_the_well_known_folders_in_pages_of_top(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    token = token_for(new_user())
    pages = [graph.get("/me/mailFolders", params={"$top": "3"}, headers=bearer(token)).json()]
    while "@odata.nextLink" in pages[-1]:
        pages.append(graph.get(pages[-1]["@odata.nextLink"], headers=bearer(token)).json())

    names = [folder["displayName"] for page in pages for folder in page["value"]]
    assert [len(page["value"]) for page in pages] == [3, 3, 1]
    assert {"Inbox", "Sent Items", "Deleted Items", "Drafts", "Junk Email", "Archive", "Outbox"} == set(names)


def test_it_resolves_well_known_names_and_lists_child_folders(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    store.create_folder(user, "Tickets", parent="Inbox")
    store.deliver(user, customer_mail("One", to=user))

    inbox = graph.get("/me/mailFolders/inbox", headers=bearer(token_for(user))).json()
    children = graph.get(f"/me/mailFolders/{inbox['id']}/childFolders", headers=bearer(token_for(user)))

    assert inbox["displayName"] == "Inbox"
    assert inbox["totalItemCount"] == 1
    assert inbox["unreadItemCount"] == 1
    assert [f["displayName"] for f in children.json()["value"]] == ["Tickets"]


# -- messages ---------------------------------------------------------------------------------


def test_a_delivered_message_reads_back_with_its_properties_and_mime(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    raw = customer_mail("Printer on fire", to=user)
    message_id = store.deliver(user, raw)

    message = graph.get(f"/me/messages/{message_id}", headers=bearer(token_for(user))).json()
    mime = graph.get(f"/me/messages/{message_id}/$value", headers=bearer(token_for(user)))

    assert message["subject"] == "Printer on fire"
    assert message["from"] == {"emailAddress": {"name": "Customer", "address": CUSTOMER}}
    assert message["isRead"] is False
    assert message["internetMessageId"].endswith("@example.org>")
    assert message["parentFolderId"] == store.folder_id(user, "inbox")
    assert mime.headers["content-type"].startswith("text/plain")
    assert mime.content == raw


def test_messages_in_a_folder_page_with_top_and_select(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    deliver_numbered(store, user, "Question", 3)
    url = "/me/mailFolders/inbox/messages"

    first = graph.get(url, params={"$top": "2", "$select": "subject"}, headers=bearer(token_for(user))).json()
    second = graph.get(first["@odata.nextLink"], headers=bearer(token_for(user))).json()

    assert set(first["value"][0]) == {"@odata.etag", "id", "subject"}
    subjects = [m["subject"] for m in first["value"] + second["value"]]
    assert sorted(subjects) == ["Question 0", "Question 1", "Question 2"]


def test_patch_marks_a_message_read(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    message_id = store.deliver(user, customer_mail("Read me", to=user))

    response = graph.patch(
        f"/me/messages/{message_id}", json={"isRead": True}, headers=bearer(token_for(user))
    )

    assert response.status_code == 200, response.text
    assert response.json()["isRead"] is True
    assert store.messages(user)[0].is_read is True


def test_patch_refuses_a_property_messages_do_not_have(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    message_id = store.deliver(user, customer_mail("Read me", to=user))

    response = graph.patch(
        f"/me/messages/{message_id}", json={"colour": "red"}, headers=bearer(token_for(user))
    )

    assert_graph_error(response, 400, "RequestBodyRead")


def test_move_gives_a_new_id_and_the_old_one_is_gone(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    archive = store.create_folder(user, "Handled")
    message_id = store.deliver(user, customer_mail("Move me", to=user))

    moved = graph.post(
        f"/me/messages/{message_id}/move", json={"destinationId": archive}, headers=bearer(token_for(user))
    )

    assert moved.status_code == 201, moved.text
    assert moved.json()["parentFolderId"] == archive
    assert moved.json()["id"] != message_id
    old = graph.get(f"/me/messages/{message_id}", headers=bearer(token_for(user)))
    assert_graph_error(old, 404, "ErrorItemNotFound")


def test_immutable_ids_survive_a_move(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    store.deliver(user, customer_mail("Keep my id", to=user))
    immutable = {"Prefer": 'IdType="ImmutableId"'}
    listed = graph.get("/me/messages", headers=bearer(token_for(user), **immutable)).json()["value"][0]

    moved = graph.post(
        f"/me/messages/{listed['id']}/move",
        json={"destinationId": "archive"},
        headers=bearer(token_for(user), **immutable),
    )

    assert moved.json()["id"] == listed["id"]
    assert 'IdType="ImmutableId"' in moved.headers["preference-applied"]


def test_delete_moves_to_deleted_items_and_deleting_there_removes_for_good(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    message_id = store.deliver(user, customer_mail("Spam", to=user))

    first = graph.delete(f"/me/messages/{message_id}", headers=bearer(token_for(user)))
    in_deleted = store.messages(user, "deleteditems")
    second = graph.delete(f"/me/messages/{in_deleted[0].id}", headers=bearer(token_for(user)))

    assert first.status_code == 204
    assert store.messages(user) == []
    assert len(in_deleted) == 1
    assert second.status_code == 204
    assert store.messages(user, "deleteditems") == []


# -- delta ------------------------------------------------------------------------------------


def test_delta_pages_a_folder_then_replays_only_what_changed(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    ids = deliver_numbered(store, user, "Old", 5)
    url = "/me/mailFolders/inbox/messages/delta"

    first = graph.get(url, headers=bearer(token, Prefer="odata.maxpagesize=2"))
    items, delta_link = collect_delta(graph, url, token, Prefer="odata.maxpagesize=2")
    new_id = store.deliver(user, customer_mail("New", to=user))
    graph.patch(f"/me/messages/{ids[0]}", json={"isRead": True}, headers=bearer(token))
    graph.delete(f"/me/messages/{ids[1]}", headers=bearer(token))
    changes, next_delta_link = collect_delta(graph, delta_link, token)
    quiet, _ = collect_delta(graph, next_delta_link, token)

    assert len(first.json()["value"]) == 2
    assert "odata.maxpagesize=2" in first.headers["preference-applied"]
    assert sorted(item["id"] for item in items) == sorted(ids)
    assert {item["id"] for item in changes if "@removed" not in item} == {new_id, ids[0]}
    assert [item["id"] for item in changes if "@removed" in item] == [ids[1]]
    assert next(i for i in changes if "@removed" in i)["@removed"] == {"reason": "deleted"}
    assert quiet == []


def test_reading_a_message_elsewhere_does_not_hide_it_from_delta(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    """New mail is decided by delta state, never by isRead (someone may read it in Outlook first)."""
    user = new_user()
    token = token_for(user)
    _, delta_link = collect_delta(graph, "/me/mailFolders/inbox/messages/delta", token)
    store.deliver(user, customer_mail("Already read", to=user), is_read=True)

    changes, _ = collect_delta(graph, delta_link, token)

    assert [(c["subject"], c["isRead"]) for c in changes] == [("Already read", True)]


def test_replaying_a_next_link_gives_the_same_page(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    deliver_numbered(store, user, "Mail", 3)
    first = graph.get(
        "/me/mailFolders/inbox/messages/delta", headers=bearer(token, Prefer="odata.maxpagesize=1")
    )
    next_link = first.json()["@odata.nextLink"]

    again = [graph.get(next_link, headers=bearer(token)).json()["value"] for _ in range(2)]

    assert again[0] == again[1]


def test_delta_remembers_select_and_change_type_in_its_links(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    old = store.deliver(user, customer_mail("Old", to=user))
    _, delta_link = collect_delta(
        graph,
        "/me/mailFolders/inbox/messages/delta?$select=subject,receivedDateTime&changeType=created",
        token,
    )
    graph.patch(f"/me/messages/{old}", json={"isRead": True}, headers=bearer(token))
    store.deliver(user, customer_mail("Created", to=user))

    changes, _ = collect_delta(graph, delta_link, token)

    assert [c["subject"] for c in changes] == ["Created"]
    assert set(changes[0]) == {"@odata.type", "@odata.etag", "id", "subject", "receivedDateTime"}


def test_a_message_moved_out_of_the_folder_is_reported_removed(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    message_id = store.deliver(user, customer_mail("Moving on", to=user))
    _, delta_link = collect_delta(graph, "/me/mailFolders/inbox/messages/delta", token)
    graph.post(f"/me/messages/{message_id}/move", json={"destinationId": "archive"}, headers=bearer(token))

    changes, _ = collect_delta(graph, delta_link, token)

    assert changes == [
        {"@odata.type": "#microsoft.graph.message", "id": message_id, "@removed": {"reason": "deleted"}}
    ]


def test_an_expired_delta_token_answers_410_sync_state_not_found(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    _, delta_link = collect_delta(graph, "/me/mailFolders/inbox/messages/delta", token)
    store.expire_delta_tokens(user)

    response = graph.get(delta_link, headers=bearer(token))

    assert_graph_error(response, 410, "syncStateNotFound")


def test_a_forged_delta_token_is_refused(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()

    response = graph.get(
        "/me/mailFolders/inbox/messages/delta",
        params={"$deltatoken": "garbage"},
        headers=bearer(token_for(user)),
    )

    assert_graph_error(response, 400, "ErrorInvalidSyncStateData")


# -- sending ----------------------------------------------------------------------------------


def test_send_mail_with_mime_delivers_and_keeps_a_copy_in_sent_items(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    raw = reply_mime(agent, to=f"{CUSTOMER}, {colleague}")

    response = post_mime(graph, "/me/sendMail", token_for(agent), raw)

    assert response.status_code == 202, response.text
    assert response.content == b""
    sent = store.messages(agent, "sentitems")
    assert len(sent) == 1
    assert sent[0].raw.endswith(raw)
    assert b"Message-ID:" in sent[0].raw
    assert len(store.messages(colleague)) == 1
    assert store.sent[-1].recipients == (CUSTOMER, colleague)


def test_send_mail_with_json_builds_the_message(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    message = {
        "subject": "Your ticket",
        "body": {"contentType": "Text", "content": "Fixed."},
        "toRecipients": [{"emailAddress": {"address": CUSTOMER}}],
        "internetMessageHeaders": [{"name": "X-Postdesk-Ticket", "value": "1001"}],
    }

    response = graph.post("/me/sendMail", json={"message": message}, headers=bearer(token_for(agent)))

    assert response.status_code == 202, response.text
    saved = graph.get("/me/mailFolders/sentitems/messages", headers=bearer(token_for(agent))).json()["value"]
    assert saved[0]["subject"] == "Your ticket"
    assert saved[0]["from"]["emailAddress"]["address"] == agent
    assert b"X-Postdesk-Ticket: 1001" in store.sent[-1].raw


def test_send_mail_without_saving_leaves_sent_items_empty(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    message = {"subject": "Hi", "toRecipients": [{"emailAddress": {"address": CUSTOMER}}]}

    graph.post(
        "/me/sendMail",
        json={"message": message, "saveToSentItems": "false"},
        headers=bearer(token_for(agent)),
    )

    assert store.messages(agent, "sentitems") == []
    assert store.sent[-1].saved_copy is False


def test_send_mail_refuses_malformed_base64(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()

    response = graph.post(
        "/me/sendMail",
        content=b"not base64 at all!",
        headers=bearer(token_for(agent), **{"Content-Type": "text/plain"}),
    )

    assert_graph_error(response, 400, "ErrorMimeContentInvalidBase64String")


def test_send_mail_refuses_a_message_without_recipients(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    message = {"subject": "To nobody", "body": {"contentType": "Text", "content": "..."}}

    response = graph.post("/me/sendMail", json={"message": message}, headers=bearer(token_for(agent)))

    assert_graph_error(response, 400, "ErrorInvalidRecipients")


def test_a_request_over_4_mb_answers_413(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = agent
    message["To"] = CUSTOMER
    message["Subject"] = "Big"
    message.set_content("see attachment")
    message.add_attachment(
        b"\0" * (3 * 1024 * 1024 + 512 * 1024), maintype="application", subtype="octet-stream"
    )

    response = post_mime(graph, "/me/sendMail", token_for(agent), message.as_bytes())

    assert_graph_error(response, 413, "RequestEntityTooLarge")
    assert store.messages(agent, "sentitems") == []


def test_a_draft_from_mime_gets_a_large_attachment_in_ranges_and_is_sent(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent, colleague = new_user(), new_user()
    token = token_for(agent)
    draft = post_mime(graph, "/me/messages", token, reply_mime(agent, to=colleague))
    assert draft.status_code == 201, draft.text
    assert draft.json()["isDraft"] is True
    assert draft.json()["parentFolderId"] == store.folder_id(agent, "drafts")
    content = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MB: two ranges of 2 MB
    session = create_upload_session(graph, token, draft.json()["id"], name="logs.bin", size=len(content))
    assert session.status_code == 201, session.text
    assert session.json()["nextExpectedRanges"] == ["0-"]
    upload_url, half = session.json()["uploadUrl"], len(content) // 2

    # The upload URL is pre-authenticated: no Authorization header.
    first = graph.put(
        upload_url, content=content[:half], headers={"Content-Range": f"bytes 0-{half - 1}/{len(content)}"}
    )
    last = graph.put(
        upload_url,
        content=content[half:],
        headers={"Content-Range": f"bytes {half}-{len(content) - 1}/{len(content)}"},
    )
    attachments = graph.get(f"/me/messages/{draft.json()['id']}/attachments", headers=bearer(token)).json()
    sent = graph.post(f"/me/messages/{draft.json()['id']}/send", headers=bearer(token))

    assert first.status_code == 200, first.text
    assert first.json()["nextExpectedRanges"] == [str(half)]
    assert last.status_code == 201, last.text
    assert last.headers["location"].endswith(f"/Attachments('{attachments['value'][0]['id']}')")
    assert base64.b64decode(attachments["value"][0]["contentBytes"]) == content
    assert sent.status_code == 202, sent.text
    assert store.messages(agent, "drafts") == []
    assert len(store.messages(agent, "sentitems")) == 1
    assert len(store.messages(colleague)) == 1


def test_an_upload_range_out_of_order_is_refused(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    token = token_for(agent)
    draft = graph.post("/me/messages", json={"subject": "Draft"}, headers=bearer(token)).json()
    size = 3 * 1024 * 1024
    session = create_upload_session(graph, token, draft["id"], name="a.bin", size=size).json()

    response = graph.put(
        session["uploadUrl"], content=b"x" * 10, headers={"Content-Range": f"bytes 5-14/{size}"}
    )

    assert_graph_error(response, 416, "invalidRange")


def test_an_upload_session_for_a_small_file_is_refused(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    token = token_for(agent)
    draft = graph.post("/me/messages", json={"subject": "Draft"}, headers=bearer(token)).json()

    response = create_upload_session(graph, token, draft["id"], name="tiny.txt", size=1000)

    assert_graph_error(response, 400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")


# -- tokens -----------------------------------------------------------------------------------


def test_a_request_without_a_token_answers_401_and_echoes_the_client_request_id(graph: httpx.Client) -> None:
    response = graph.get("/me/mailFolders", headers={"client-request-id": "abc-123"})

    error = assert_graph_error(response, 401, "InvalidAuthenticationToken")
    assert error["innerError"]["client-request-id"] == "abc-123"
    assert response.headers["client-request-id"] == "abc-123"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_an_expired_token_answers_401(
    graph: httpx.Client, directory: SandboxDirectory, token_for: TokenFor, new_user: NewAddress
) -> None:
    token = token_for(new_user())
    directory.clock_offset = timedelta(hours=2)

    response = graph.get("/me/mailFolders", headers=bearer(token))

    assert_graph_error(response, 401, "InvalidAuthenticationToken")
    assert "expired" in response.json()["error"]["message"]


def test_an_outlook_token_is_not_a_graph_token(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    token = token_for(new_user(), scope="https://outlook.office.com/IMAP.AccessAsUser.All")

    response = graph.get("/me/mailFolders", headers=bearer(token))

    assert_graph_error(response, 401, "InvalidAuthenticationToken")


def test_a_token_with_a_forged_signature_answers_401(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    head, payload, signature = token_for(new_user()).split(".")
    forged = f"{head}.{payload}.{signature[::-1]}"

    response = graph.get("/me/mailFolders", headers=bearer(forged))

    assert_graph_error(response, 401, "InvalidAuthenticationToken")


def test_a_token_without_mail_permissions_answers_403(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    token = token_for(new_user(), scope=f"{GRAPH}/User.Read")

    response = graph.get("/me/mailFolders", headers=bearer(token))

    assert_graph_error(response, 403, "ErrorAccessDenied")


def test_reading_mail_does_not_allow_sending(
    graph: httpx.Client, token_for: TokenFor, new_user: NewAddress
) -> None:
    agent = new_user()
    token = token_for(agent, scope=f"{GRAPH}/Mail.ReadWrite")

    response = graph.post(
        "/me/sendMail",
        json={"message": {"toRecipients": [{"emailAddress": {"address": CUSTOMER}}]}},
        headers=bearer(token),
    )

    assert_graph_error(response, 403, "ErrorAccessDenied")


# -- mailboxes and delegates ------------------------------------------------------------------


def test_a_shared_mailbox_needs_full_access(
    graph: httpx.Client,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
    new_shared: NewAddress,
) -> None:
    agent, shared = new_user(), new_shared()
    store.deliver(shared, customer_mail("For support", to=shared))
    token = token_for(agent, scope=SHARED)

    refused = graph.get(f"/users/{shared}/mailFolders/inbox/messages", headers=bearer(token))
    store.grant(shared, agent, MailboxRight.FULL_ACCESS)
    allowed = graph.get(f"/users/{shared}/mailFolders/inbox/messages", headers=bearer(token))

    assert_graph_error(refused, 403, "ErrorAccessDenied")
    assert allowed.status_code == 200, allowed.text
    assert [m["subject"] for m in allowed.json()["value"]] == ["For support"]


def test_full_access_is_not_enough_without_the_shared_permission(
    graph: httpx.Client,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
    new_shared: NewAddress,
) -> None:
    agent, shared = new_user(), new_shared()
    store.grant(shared, agent, MailboxRight.FULL_ACCESS)

    response = graph.get(f"/users/{shared}/mailFolders", headers=bearer(token_for(agent)))

    assert_graph_error(response, 403, "ErrorAccessDenied")


def test_sending_from_a_shared_mailbox_needs_send_as(
    graph: httpx.Client,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
    new_shared: NewAddress,
) -> None:
    agent, shared = new_user(), new_shared()
    token = token_for(agent, scope=SHARED)
    reply = reply_mime(shared)

    refused = post_mime(graph, f"/users/{shared}/sendMail", token, reply)
    store.grant(shared, agent, MailboxRight.SEND_AS)
    allowed = post_mime(graph, f"/users/{shared}/sendMail", token, reply)

    assert_graph_error(refused, 403, "ErrorSendAsDenied")
    assert allowed.status_code == 202, allowed.text
    assert len(store.messages(shared, "sentitems")) == 1
    assert store.messages(agent, "sentitems") == []


def test_me_send_mail_from_another_address_needs_send_as(
    graph: httpx.Client,
    store: GraphMailStore,
    token_for: TokenFor,
    new_user: NewAddress,
    new_shared: NewAddress,
) -> None:
    agent, shared = new_user(), new_shared()

    response = post_mime(graph, "/me/sendMail", token_for(agent), reply_mime(shared))

    assert_graph_error(response, 403, "ErrorSendAsDenied")
    assert store.messages(agent, "sentitems") == []


def test_an_app_only_token_reaches_any_mailbox_but_not_me(
    graph: httpx.Client, store: GraphMailStore, app_token: Callable[..., str], new_shared: NewAddress
) -> None:
    shared = new_shared()
    store.deliver(shared, customer_mail("Via the daemon", to=shared))
    token = app_token("Mail.ReadWrite")

    listed = graph.get(f"/users/{shared}/messages", headers=bearer(token))
    me = graph.get("/me/messages", headers=bearer(token))
    send = post_mime(graph, f"/users/{shared}/sendMail", token, reply_mime(shared))

    assert [m["subject"] for m in listed.json()["value"]] == ["Via the daemon"]
    assert_graph_error(me, 400, "BadRequest")
    assert_graph_error(send, 403, "ErrorAccessDenied")


def test_unknown_users_unlicensed_mailboxes_and_unknown_messages_answer_404(
    graph: httpx.Client, store: GraphMailStore, app_token: Callable[..., str], new_user: NewAddress
) -> None:
    token = app_token("Mail.Read")
    unlicensed = new_user()
    store.disable_mailbox(unlicensed)

    nobody = graph.get("/users/nobody@contoso.onmicrosoft.com/messages", headers=bearer(token))
    disabled = graph.get(f"/users/{unlicensed}/messages", headers=bearer(token))
    missing = graph.get(f"/users/{new_user()}/messages/AAMkAGInotthere", headers=bearer(token))

    assert_graph_error(nobody, 404, "ErrorInvalidUser")
    assert_graph_error(disabled, 404, "MailboxNotEnabledForRESTAPI")
    assert_graph_error(missing, 404, "ErrorItemNotFound")


def test_an_unknown_path_segment_answers_in_graphs_shape(graph: httpx.Client, token_for: TokenFor) -> None:
    response = graph.get("/me/calendars")

    assert_graph_error(response, 400, "BadRequest")


# -- throttling and faults --------------------------------------------------------------------


def test_injected_throttling_answers_429_with_retry_after_on_matching_paths_only(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    store.throttle_next(2, retry_after=7, path=r"/messages/delta$")

    folders = graph.get("/me/mailFolders", headers=bearer(token))
    throttled = [graph.get("/me/mailFolders/inbox/messages/delta", headers=bearer(token)) for _ in range(3)]

    assert folders.status_code == 200
    for response in throttled[:2]:
        assert_graph_error(response, 429, "TooManyRequests")
        assert response.headers["retry-after"] == "7"
    assert throttled[2].status_code == 200


def test_injected_503_and_custom_errors(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    token = token_for(new_user())
    store.unavailable_next(retry_after=3)
    store.fail_next(status=500, code="generalException", message="Something broke.", method="GET")

    unavailable = graph.get("/me/mailFolders", headers=bearer(token))
    broken = graph.get("/me/mailFolders", headers=bearer(token))

    assert_graph_error(unavailable, 503, "serviceNotAvailable")
    assert unavailable.headers["retry-after"] == "3"
    assert_graph_error(broken, 500, "generalException")


def test_more_concurrent_requests_than_the_mailbox_allows_answer_429(
    sandbox: SandboxServer, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    store.concurrency_limit = 2
    context = ssl.create_default_context(cafile=str(sandbox.ca_path))

    def fetch() -> httpx.Response:
        with httpx.Client(base_url=f"{sandbox.base_url}/v1.0", verify=context, trust_env=False) as client:
            return client.get("/me/mailFolders", headers=bearer(token))

    store.hold_requests()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            held = [pool.submit(fetch) for _ in range(2)]
            deadline = time.monotonic() + 10
            while store.in_flight(user) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            third = fetch()
            store.release_requests()
            answers = [future.result(timeout=10) for future in held]
    finally:
        store.release_requests()

    assert_graph_error(third, 429, "ApplicationThrottled")
    assert "retry-after" in third.headers
    assert [a.status_code for a in answers] == [200, 200]
    assert store.in_flight(user) == 0


def test_mail_delivered_during_a_delta_round_is_in_that_round_or_the_next(
    graph: httpx.Client, store: GraphMailStore, token_for: TokenFor, new_user: NewAddress
) -> None:
    user = new_user()
    token = token_for(user)
    delivered: list[str] = []

    def deliver_many() -> None:
        delivered.extend(store.deliver(user, customer_mail(f"Burst {n}", to=user)) for n in range(50))

    writer = threading.Thread(target=deliver_many)
    writer.start()
    during, delta_link = collect_delta(graph, "/me/mailFolders/inbox/messages/delta?$select=subject", token)
    writer.join()
    after, _ = collect_delta(graph, delta_link, token)

    assert {item["id"] for item in during} | {item["id"] for item in after} == set(delivered)
