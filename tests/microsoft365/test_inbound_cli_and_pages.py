"""Fetching and the quarantine from the command line and from the admin pages, against a real Dovecot."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from html import unescape
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from postdesk.db.models import (
    BacklogPolicy,
    Channel,
    Group,
    InboundMessage,
    InboundStatus,
)
from postdesk.db.session import transaction
from postdesk.ingest.fetch import fetch_channel
from postdesk.runtime import Runtime
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory
from postdesk.storage import read_bytes
from postdesk.web.app import create_app
from tests.conftest import AGENT_PASSWORD, add_user, csrf_from, sign_in
from tests.mail import corpus_bytes
from tests.microsoft365.conftest import BASE_URL, SignIn, channels, fetch, tickets
from tests.support.cli import run_postdesk
from tests.support.dovecot import DovecotServer
from tests.support.mailfactory import customer_mail

# Mail that was in the mailbox before Postdesk connected it arrived (INTERNALDATE) before that.
EARLIER = datetime.now(UTC) - timedelta(days=1)


def deliver_earlier(dovecot: DovecotServer, mailbox: str, subject: str) -> None:
    dovecot.deliver(mailbox, customer_mail(to=mailbox, subject=subject), received=EARLIER)


POLL_SECONDS = 10
SMALL_LIMIT = 10_000  # bytes; the settings form's smallest limit is 1 MB, the column takes any


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def inbound_rows(runtime: Runtime) -> list[InboundMessage]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))


def channel_row(runtime: Runtime, channel_id: int) -> Channel:
    with runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        assert channel is not None
        return channel


def set_limit(runtime: Runtime, channel_id: int, max_message_bytes: int) -> None:
    with transaction(runtime.sessions) as session:
        session.get(Channel, channel_id).max_message_bytes = max_message_bytes  # type: ignore[union-attr]


def oversized_mail(mailbox: str) -> bytes:
    return customer_mail(
        to=mailbox, subject="Scanned contract", attachment=("scan.pdf", b"%PDF" + b"x" * 20_000)
    )


@pytest.fixture
def oversized(mailbox_user: str) -> bytes:
    return oversized_mail(mailbox_user)


@pytest.fixture
def quarantined_id(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str, oversized: bytes
) -> int:
    """An oversized message, kept in quarantine because of the mailbox's small size limit."""
    set_limit(m365_runtime, channel_id, SMALL_LIMIT)
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, oversized)
    assert fetch(m365_runtime, channel_id).processed.quarantined == 1
    [row] = inbound_rows(m365_runtime)
    assert row.status is InboundStatus.QUARANTINED
    return row.id


@pytest.fixture
def agent_client(m365_runtime: Runtime, desk: TestClient) -> Iterator[TestClient]:
    add_user(m365_runtime, "agent@example.com", AGENT_PASSWORD)
    with TestClient(create_app(m365_runtime), base_url=BASE_URL) as client:
        sign_in(client, "agent@example.com", AGENT_PASSWORD)
        yield client


def page_text(response: httpx.Response) -> str:
    """The page's text with tags dropped and entities decoded, for looking up what a reader sees."""
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", response.text)))


def wait_until(condition: Callable[[], bool], *, what: str) -> None:
    deadline = time.monotonic() + POLL_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


# -- postdesk channel fetch --------------------------------------------------------------------


def test_channel_fetch_json_reports_the_counts_of_what_happened(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    question = customer_mail(to=mailbox_user, subject="Invoice", message_id="<q1@example.org>")
    dovecot.deliver_many(
        mailbox_user,
        [
            question,
            b"Received: from relay2.example.org by mx.contoso.com\r\n" + question,  # a second copy
            customer_mail(to=mailbox_user, subject="Re: Invoice", in_reply_to="<q1@example.org>"),
            corpus_bytes("bounce-dsn.eml"),
        ],
    )
    [report] = json_of(run_postdesk(m365_runtime.settings, "channel", "fetch", str(channel_id), "--json"))
    assert report["channel_id"] == channel_id
    assert report["email"] == mailbox_user
    counts = {key: report[key] for key in ("fetched", "tickets", "follow_ups", "duplicates", "quarantined")}
    assert counts == {"fetched": 4, "tickets": 1, "follow_ups": 1, "duplicates": 1, "quarantined": 1}
    assert (report["error"], report["skipped"]) == (None, None)
    statuses = sorted(row.status.value for row in inbound_rows(m365_runtime))
    assert statuses == ["duplicate", "processed", "processed", "quarantined"]


def test_channel_fetch_all_fetches_every_mailbox(
    m365_runtime: Runtime,
    signin: SignIn,
    directory: SandboxDirectory,
    dovecot: DovecotServer,
    mailbox_user: str,
) -> None:
    second = directory.add_user(
        upn=f"second-{mailbox_user}", display_name="Sales", tenant_id=CONTOSO_TENANT_ID
    ).upn
    for mailbox in (mailbox_user, second):
        assert signin.connect(mailbox).status_code == 303
    for channel in channels(m365_runtime):
        fetch(m365_runtime, channel.id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="For the help desk"))
    dovecot.deliver(second, customer_mail(to=second, subject="For sales"))
    reports = json_of(run_postdesk(m365_runtime.settings, "channel", "fetch", "--all", "--json"))
    assert [(r["email"], r["fetched"], r["tickets"]) for r in reports] == [
        (mailbox_user, 1, 1),
        (second, 1, 1),
    ]
    assert sorted(t.title for t in tickets(m365_runtime)) == ["For sales", "For the help desk"]


def test_channel_fetch_of_an_unknown_id_exits_1_and_says_so(m365_runtime: Runtime) -> None:
    result = run_postdesk(m365_runtime.settings, "channel", "fetch", "999", "--json")
    assert result.returncode == 1
    assert "there is no mailbox with ID 999" in result.stderr
    assert result.stdout == ""


def test_channel_fetch_import_existing_imports_the_mail_that_was_there_before_connecting(
    m365_runtime: Runtime, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject="Waiting since Monday"), received=EARLIER
    )
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject="Waiting since Tuesday"), received=EARLIER
    )
    assert fetch(m365_runtime, channel_id).backlog_waiting == 2  # the worker's first pass only counts
    [report] = json_of(
        run_postdesk(
            m365_runtime.settings, "channel", "fetch", str(channel_id), "--import-existing", "--json"
        )
    )
    assert (report["fetched"], report["tickets"], report["backlog_waiting"]) == (2, 2, None)
    titles = sorted(t.title for t in tickets(m365_runtime))
    assert titles == ["Waiting since Monday", "Waiting since Tuesday"]


# -- postdesk quarantine -----------------------------------------------------------------------


def test_quarantine_list_json_shows_the_reason_mailbox_and_subject(
    m365_runtime: Runtime, quarantined_id: int, mailbox_user: str
) -> None:
    [row] = json_of(run_postdesk(m365_runtime.settings, "quarantine", "list", "--json"))
    assert row["id"] == quarantined_id
    assert row["channel"] == mailbox_user
    assert row["subject"] == "Scanned contract"
    assert "over this mailbox's limit" in row["reason"]


def test_quarantine_reprocess_after_raising_the_limit_turns_the_message_into_a_ticket(
    m365_runtime: Runtime, quarantined_id: int, channel_id: int
) -> None:
    set_limit(m365_runtime, channel_id, 25 * 1024 * 1024)
    result = run_postdesk(m365_runtime.settings, "quarantine", "reprocess", str(quarantined_id))
    assert result.returncode == 0, result.stderr
    assert f"Message {quarantined_id}: processed" in result.stdout
    assert [t.title for t in tickets(m365_runtime)] == ["Scanned contract"]
    assert json_of(run_postdesk(m365_runtime.settings, "quarantine", "list", "--json")) == []


# -- the channel page --------------------------------------------------------------------------


def test_the_channel_page_shows_the_last_fetch_time_and_its_counts(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Counted"))
    fetch(m365_runtime, channel_id)
    fetched_at = channel_row(m365_runtime, channel_id).last_fetch_at
    assert fetched_at is not None
    text = page_text(desk.get(f"/channels/{channel_id}"))
    assert (
        f"Last fetch {fetched_at:%Y-%m-%d %H:%M:%S} UTC · 1 fetched, 1 new tickets, 0 follow-ups, "
        "0 duplicates, 0 quarantined"
    ) in text
    assert "Last error none" in text


def test_the_channel_page_explains_the_last_error_in_plain_words(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Cannot be spooled"))
    spool = m365_runtime.settings.spool_dir
    spool.parent.mkdir(parents=True, exist_ok=True)
    spool.write_text("not a directory")
    assert fetch_channel(m365_runtime, channel_id).error is not None
    page = desk.get(f"/channels/{channel_id}")
    alert = re.search(r'<p class="alert error" role="alert" id="last-error">(.*?)</p>', page.text, re.S)
    assert alert is not None, page.text
    words = unescape(re.sub(r"<[^>]+>", "", alert.group(1)))
    assert words == (
        "Last error: cannot write to the mail spool (Not a directory); nothing was removed from the server"
    )


def test_the_channel_page_offers_to_import_the_mail_already_in_the_mailbox(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    for day in ("Monday", "Tuesday", "Wednesday"):
        dovecot.deliver(
            mailbox_user, customer_mail(to=mailbox_user, subject=f"Old mail from {day}"), received=EARLIER
        )
    fetch(m365_runtime, channel_id)
    page = desk.get(f"/channels/{channel_id}")
    assert 'id="backlog"' in page.text
    assert "Import 3 messages" in page_text(page)


def test_the_channel_page_shows_no_import_offer_for_an_empty_mailbox(
    m365_runtime: Runtime, desk: TestClient, channel_id: int
) -> None:
    fetch(m365_runtime, channel_id)
    assert 'id="backlog"' not in desk.get(f"/channels/{channel_id}").text


def test_choosing_import_on_the_channel_page_imports_the_existing_mail(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    for day in ("Monday", "Tuesday"):
        dovecot.deliver(
            mailbox_user, customer_mail(to=mailbox_user, subject=f"Old mail from {day}"), received=EARLIER
        )
    fetch(m365_runtime, channel_id)
    page = desk.get(f"/channels/{channel_id}")
    response = desk.post(
        f"/channels/{channel_id}/backlog",
        data={"csrf_token": csrf_from(page.text), "decision": "import"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/channels/{channel_id}?notice=backlog"
    wait_until(
        lambda: channel_row(m365_runtime, channel_id).last_fetch_summary.startswith("2 fetched"),
        what="the background import",
    )
    assert sorted(t.title for t in tickets(m365_runtime)) == ["Old mail from Monday", "Old mail from Tuesday"]
    assert 'id="backlog"' not in desk.get(f"/channels/{channel_id}").text


# -- the mail settings form --------------------------------------------------------------------


def settings_form(csrf: str, **changes: str) -> dict[str, str]:
    form = {
        "csrf_token": csrf,
        "folder": "INBOX",
        "group_id": "",
        "after_fetch": "keep",
        "max_message_mb": "25",
        "fetch_interval_seconds": "30",
        "backlog_policy": "unread",
        "backlog_since": "",
    }
    form.update(changes)
    return form


def test_the_settings_form_changes_folder_group_delete_mode_and_limits(
    m365_runtime: Runtime, desk: TestClient, channel_id: int
) -> None:
    fetch(m365_runtime, channel_id)
    with transaction(m365_runtime.sessions) as session:
        group = Group(name="Second line")
        session.add(group)
        session.flush()
        group_id = group.id
    page = desk.get(f"/channels/{channel_id}")
    response = desk.post(
        f"/channels/{channel_id}/settings",
        data=settings_form(
            csrf_from(page.text),
            folder="Support/Triage",
            group_id=str(group_id),
            after_fetch="delete",
            max_message_mb="5",
            fetch_interval_seconds="120",
            backlog_policy="none",
        ),
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/channels/{channel_id}?notice=saved"
    channel = channel_row(m365_runtime, channel_id)
    assert channel.folder == "Support/Triage"
    assert channel.group_id == group_id
    assert channel.delete_after_fetch is True
    assert channel.max_message_bytes == 5 * 1024 * 1024
    assert channel.fetch_interval_seconds == 120
    assert channel.backlog_policy is BacklogPolicy.NONE
    assert channel.imap_uidvalidity is None  # another folder is another UID space: start afresh


def test_after_changing_the_folder_mail_is_fetched_from_the_new_folder(
    m365_runtime: Runtime,
    desk: TestClient,
    channel_id: int,
    dovecot: DovecotServer,
    mailbox_user: str,
) -> None:
    fetch(m365_runtime, channel_id)
    dovecot.create_folder(mailbox_user, "Support/Triage")
    page = desk.get(f"/channels/{channel_id}")
    desk.post(
        f"/channels/{channel_id}/settings",
        data=settings_form(csrf_from(page.text), folder="Support/Triage"),
        follow_redirects=False,
    )
    fetch(m365_runtime, channel_id)  # where the new folder stands
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Still in the inbox"))
    dovecot.deliver_many(
        mailbox_user, [customer_mail(to=mailbox_user, subject="Sorted into triage")], folder="Support/Triage"
    )
    fetch(m365_runtime, channel_id)
    assert [t.title for t in tickets(m365_runtime)] == ["Sorted into triage"]


def test_the_settings_form_refuses_an_agent(
    m365_runtime: Runtime, desk: TestClient, agent_client: TestClient, channel_id: int
) -> None:
    csrf = csrf_from(agent_client.get("/tickets").text)
    response = agent_client.post(
        f"/channels/{channel_id}/settings",
        data=settings_form(csrf, after_fetch="delete", max_message_mb="1"),
        follow_redirects=False,
    )
    assert response.status_code == 403
    channel = channel_row(m365_runtime, channel_id)
    assert (channel.delete_after_fetch, channel.max_message_bytes) == (False, 25 * 1024 * 1024)


# -- the quarantine page -----------------------------------------------------------------------


def test_the_quarantine_page_lists_the_message_with_its_reason(
    m365_runtime: Runtime, desk: TestClient, quarantined_id: int, mailbox_user: str
) -> None:
    page = desk.get("/quarantine")
    assert page.status_code == 200
    row = re.search(rf'<tr id="quarantine-{quarantined_id}">(.*?)</tr>', page.text, re.S)
    assert row is not None, page.text
    cells = [
        unescape(re.sub(r"<[^>]+>", "", cell)).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    ]
    assert cells[1:4] == [mailbox_user, "Jana Novák <jana.novak@example.org>", "Scanned contract"]
    assert cells[4].startswith("the message is ") and "over this mailbox's limit" in cells[4]
    assert f'href="/quarantine/{quarantined_id}/raw"' in row.group(1)


def test_download_eml_returns_the_exact_raw_bytes_as_an_attachment(
    m365_runtime: Runtime, desk: TestClient, quarantined_id: int, oversized: bytes
) -> None:
    [row] = inbound_rows(m365_runtime)
    response = desk.get(f"/quarantine/{quarantined_id}/raw")
    assert response.status_code == 200
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["content-type"].startswith("message/rfc822")
    assert response.content == read_bytes(m365_runtime.settings.spool_dir, row.sha256)
    assert len(response.content) == row.size
    # The message as delivered; IMAP hands it over with CRLF line ends, and Postdesk keeps those.
    assert response.content.replace(b"\r\n", b"\n") == oversized


def test_reprocess_on_the_quarantine_page_releases_the_message_after_the_limit_is_raised(
    m365_runtime: Runtime, desk: TestClient, quarantined_id: int, channel_id: int
) -> None:
    set_limit(m365_runtime, channel_id, 25 * 1024 * 1024)
    page = desk.get("/quarantine")
    response = desk.post(
        f"/quarantine/{quarantined_id}/reprocess",
        data={"csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/quarantine?notice=released"
    assert [t.title for t in tickets(m365_runtime)] == ["Scanned contract"]
    assert f'id="quarantine-{quarantined_id}"' not in desk.get("/quarantine").text


def test_reprocess_keeps_a_message_that_still_fails_in_quarantine(
    m365_runtime: Runtime, desk: TestClient, quarantined_id: int
) -> None:
    page = desk.get("/quarantine")
    response = desk.post(
        f"/quarantine/{quarantined_id}/reprocess",
        data={"csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert response.headers["location"] == "/quarantine?notice=still"
    assert tickets(m365_runtime) == []
    assert f'id="quarantine-{quarantined_id}"' in desk.get("/quarantine").text


@pytest.mark.parametrize("action", ["list", "download", "reprocess"])
def test_agents_cannot_use_the_quarantine(
    action: str, m365_runtime: Runtime, agent_client: TestClient, quarantined_id: int, channel_id: int
) -> None:
    set_limit(m365_runtime, channel_id, 25 * 1024 * 1024)  # a reprocess would now release it
    if action == "list":
        response = agent_client.get("/quarantine")
    elif action == "download":
        response = agent_client.get(f"/quarantine/{quarantined_id}/raw")
    else:
        csrf = csrf_from(agent_client.get("/tickets").text)
        response = agent_client.post(
            f"/quarantine/{quarantined_id}/reprocess", data={"csrf_token": csrf}, follow_redirects=False
        )
    assert response.status_code == 403
    assert b"Scanned contract" not in response.content
    [row] = inbound_rows(m365_runtime)
    assert row.status is InboundStatus.QUARANTINED


def test_after_choosing_to_leave_the_existing_mail_no_fetch_reports_it_as_waiting(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    for day in ("Monday", "Tuesday", "Wednesday"):
        dovecot.deliver(
            mailbox_user, customer_mail(to=mailbox_user, subject=f"Old mail from {day}"), received=EARLIER
        )
    fetch(m365_runtime, channel_id)
    page = desk.get(f"/channels/{channel_id}")
    response = desk.post(
        f"/channels/{channel_id}/backlog",
        data={"csrf_token": csrf_from(page.text), "decision": "skip"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    fetch(m365_runtime, channel_id)
    text = page_text(desk.get(f"/channels/{channel_id}"))
    assert "Last fetch " in text and "0 fetched" in text
    assert "wait for an import decision" not in text


def test_the_reason_for_a_message_just_over_the_limit_names_a_size_above_the_limit(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    set_limit(m365_runtime, channel_id, 1024 * 1024)  # the smallest limit the settings form allows
    fetch(m365_runtime, channel_id)
    scan = b"%PDF" + b"x" * 790_000  # about 1.03 MB once base64-encoded
    dovecot.deliver(mailbox_user, customer_mail(to=mailbox_user, subject="Scan", attachment=("s.pdf", scan)))
    assert fetch(m365_runtime, channel_id).processed.quarantined == 1
    [row] = inbound_rows(m365_runtime)
    assert 1024 * 1024 < row.size < 1.05 * 1024 * 1024
    message_size, limit = (
        int(n.replace(",", "")) for n in re.findall(r"\(([\d,]+) bytes\)", row.reason or "")
    )
    assert message_size > limit, row.reason


def test_channel_fetch_import_existing_imports_mail_an_admin_first_chose_to_leave(
    m365_runtime: Runtime, desk: TestClient, channel_id: int, dovecot: DovecotServer, mailbox_user: str
) -> None:
    dovecot.deliver(
        mailbox_user, customer_mail(to=mailbox_user, subject="Left alone at first"), received=EARLIER
    )
    fetch(m365_runtime, channel_id)
    page = desk.get(f"/channels/{channel_id}")
    desk.post(
        f"/channels/{channel_id}/backlog",
        data={"csrf_token": csrf_from(page.text), "decision": "skip"},
        follow_redirects=False,
    )
    [report] = json_of(
        run_postdesk(
            m365_runtime.settings, "channel", "fetch", str(channel_id), "--import-existing", "--json"
        )
    )
    assert (report["fetched"], report["tickets"]) == (1, 1)
