"""The test suite's Dovecot: real IMAPS with XOAUTH2, validating the sandbox's tokens by introspection."""

from __future__ import annotations

import imaplib
import re
import time
from datetime import timedelta

import pytest

from postdesk.sandbox import SandboxDirectory
from tests.support.dovecot import DovecotServer, IssueToken

ADELE = "adele.vance@contoso.onmicrosoft.com"
MEGAN = "megan.bowen@contoso.onmicrosoft.com"


def message(number: int) -> bytes:
    return (
        f"From: Customer {number} <customer{number}@example.com>\r\n"
        f"To: {ADELE}\r\n"
        f"Subject: Printer on floor {number} is jammed\r\n"
        f"Message-ID: <case-{number}@example.com>\r\n"
        "Date: Tue, 04 Jun 2024 09:30:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "It has been jammed since this morning.\r\n"
    ).encode()


def select_status(client: imaplib.IMAP4_SSL, folder: str = "INBOX") -> tuple[int, int]:
    """EXISTS and UIDVALIDITY of a freshly selected folder."""
    status, data = client.select(folder, readonly=True)
    assert status == "OK"
    _, validity = client.response("UIDVALIDITY")
    assert data[0] is not None and validity[0] is not None
    return int(data[0]), int(validity[0])


def assert_refused(dovecot: DovecotServer, token: str, mailbox: str) -> None:
    with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
        dovecot.imap_login(token, mailbox, source_address=dovecot.spare_source_address())


def test_a_token_for_adele_opens_her_inbox_and_shows_the_delivered_messages(
    dovecot: DovecotServer, issue_token: IssueToken
) -> None:
    dovecot.deliver(ADELE, message(1))
    dovecot.deliver(ADELE, message(2))
    client = dovecot.imap_login(issue_token(ADELE), ADELE)
    try:
        exists, _ = select_status(client)
        _, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    finally:
        client.logout()
    assert exists == dovecot.message_count(ADELE) >= 2
    headers = b"".join(part[1] for part in data if isinstance(part, tuple))
    assert b"<case-1@example.com>" in headers
    assert b"<case-2@example.com>" in headers


def test_a_token_for_adele_cannot_open_megans_mailbox(
    dovecot: DovecotServer, issue_token: IssueToken
) -> None:
    assert_refused(dovecot, issue_token(ADELE), MEGAN)
    assert dovecot.wait_for_log(f"Username '{MEGAN}' did not match '{ADELE}'")


def test_a_garbage_token_is_refused_with_authenticationfailed(dovecot: DovecotServer) -> None:
    assert_refused(dovecot, "eyJ0eXAiOiJKV1QifQ.not-a-token.at-all", ADELE)
    assert dovecot.wait_for_log("Introspection failed: Provided token is not valid")


def test_an_expired_token_is_refused_with_authenticationfailed(
    dovecot: DovecotServer, directory: SandboxDirectory, issue_token: IssueToken
) -> None:
    token = issue_token(ADELE)
    directory.clock_offset = timedelta(hours=2)
    assert_refused(dovecot, token, ADELE)


def test_a_graph_token_is_refused_because_it_lacks_the_imap_scope(
    dovecot: DovecotServer, issue_token: IssueToken
) -> None:
    assert_refused(dovecot, issue_token(ADELE, scope="https://graph.microsoft.com/Mail.Read"), ADELE)
    assert dovecot.wait_for_log("Token is not valid for scope 'IMAP.AccessAsUser.All'")


def test_delivered_maildir_flags_show_up_as_imap_flags(
    dovecot: DovecotServer, issue_token: IssueToken, new_mailbox: str
) -> None:
    dovecot.deliver(new_mailbox, message(1))
    dovecot.deliver(new_mailbox, message(2), flags="S")
    dovecot.deliver(new_mailbox, message(3), flags="FS")
    client = dovecot.imap_login(issue_token(new_mailbox), new_mailbox)
    try:
        select_status(client)
        _, unseen = client.search(None, "UNSEEN")
        _, seen = client.search(None, "SEEN")
        _, flagged = client.search(None, "FLAGGED")
    finally:
        client.logout()
    assert (len(unseen[0].split()), len(seen[0].split()), len(flagged[0].split())) == (1, 2, 1)


def test_reset_uidvalidity_gives_the_inbox_a_new_uidvalidity_and_fresh_uids(
    dovecot: DovecotServer, issue_token: IssueToken, new_mailbox: str
) -> None:
    token = issue_token(new_mailbox)
    dovecot.deliver_many(new_mailbox, [message(n) for n in range(3)])
    client = dovecot.imap_login(token, new_mailbox)
    try:
        _, before = select_status(client)
    finally:
        client.logout()
    dovecot.reset_uidvalidity(new_mailbox)
    client = dovecot.imap_login(token, new_mailbox)
    try:
        exists, after = select_status(client)
        _, uids = client.uid("SEARCH", "ALL")
    finally:
        client.logout()
    assert after != before
    assert exists == 3
    assert uids[0] == b"1 2 3"


def test_created_folders_are_listed_with_exchanges_slash_separator(
    dovecot: DovecotServer, issue_token: IssueToken, new_mailbox: str
) -> None:
    dovecot.create_folder(new_mailbox, "Customers/Ärger")
    dovecot.deliver_many(new_mailbox, [message(1)], folder="Customers/Ärger")
    client = dovecot.imap_login(issue_token(new_mailbox), new_mailbox)
    try:
        _, listing = client.list()
        exists, _ = select_status(client, '"Customers/&AMQ-rger"')
    finally:
        client.logout()
    names = [re.sub(rb'^\(.*?\) "/" ', b"", line).strip(b'"') for line in listing if isinstance(line, bytes)]
    assert b"Customers/&AMQ-rger" in names
    assert b"Sent Items" in names
    assert exists == dovecot.message_count(new_mailbox, "Customers/Ärger") == 1


def test_two_thousand_delivered_messages_all_show_up_over_imap(
    dovecot: DovecotServer, issue_token: IssueToken, new_mailbox: str
) -> None:
    raws = [message(n) for n in range(2000)]
    started = time.perf_counter()
    dovecot.deliver_many(new_mailbox, raws)
    elapsed = time.perf_counter() - started
    print(f"delivered 2000 messages in {elapsed:.2f}s ({2000 / elapsed:,.0f} messages/s)")
    client = dovecot.imap_login(issue_token(new_mailbox), new_mailbox)
    try:
        exists, _ = select_status(client)
    finally:
        client.logout()
    assert exists == 2000
