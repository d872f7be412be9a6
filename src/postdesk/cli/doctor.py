"""``postdesk doctor [CHANNEL_ID]``: test mailbox connections layer by layer, with the fix for a failure."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Annotated

import typer
from rich.text import Text
from sqlalchemy import select

from postdesk.cli.common import console, fail, print_json, start
from postdesk.db.models import Channel
from postdesk.doctor import Check, Diagnosis, diagnose, record
from postdesk.mail.compose import AddressError, check_address

JSON_HELP = (
    "Print JSON (stable): a list with one object per mailbox: channel_id, email, transport (imap | graph), "
    "ok (true when no check failed), failed_check (the name of the failed check, or null), and checks, in "
    "order, each with name (settings, discovery, token, claims, imap_connection, smtp_connection, "
    "imap_auth, imap_folder, smtp_auth, test_message, graph_mailbox), label, status (ok | failed | "
    "skipped), detail, cause, fix and command (Exchange Online PowerShell, or null)."
)
_MARKS = {"ok": ("✓", "green"), "failed": ("✗", "bold red"), "skipped": ("–", "dim")}


def doctor_command(
    channel_id: Annotated[
        int | None,
        typer.Argument(
            help="The mailbox's ID (see `postdesk channel list`); default: every mailbox.",
            metavar="CHANNEL_ID",
        ),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    send_test_to: Annotated[
        str | None,
        typer.Option(
            help="After SMTP AUTH, also send a short test message to this address.", metavar="ADDRESS"
        ),
    ] = None,
) -> None:
    """Test each mailbox's connection layer by layer and stop at the first failure, with its cause and fix.

    Layers: settings complete, authority discovery, token acquisition, token claims (Exchange Online
    audience, IMAP and SMTP scopes), DNS/TCP/TLS to the IMAP and SMTP hosts, IMAP AUTHENTICATE, folder
    select, SMTP AUTH (nothing is sent unless --send-test-to is given) and, for Graph mailboxes, the
    mailbox endpoint. Exit code 0: every check passed; 1: a check failed; 2: bad usage.
    """
    address = _address(send_test_to)
    runtime = start()
    with runtime.sessions() as session:
        query = select(Channel.id).order_by(Channel.id)
        if channel_id is not None:
            query = query.where(Channel.id == channel_id)
        targets = list(session.scalars(query))
    if channel_id is not None and not targets:
        fail(f"there is no mailbox with ID {channel_id}", code=2)
    diagnoses = []
    for target in targets:
        with (
            console.status(f"Testing mailbox {target}…", spinner="dots") if not json_output else nullcontext()
        ):
            diagnosis = diagnose(runtime, target, send_test_to=address)
        record(runtime, diagnosis, actor_id=None)
        diagnoses.append(diagnosis)
        if not json_output:
            _print(diagnosis)
    if json_output:
        print_json([diagnosis.as_json() for diagnosis in diagnoses])
    elif not diagnoses:
        console.print("No mailboxes connected; nothing to test.")
    if not all(diagnosis.ok for diagnosis in diagnoses):
        raise typer.Exit(1)


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_address(value)
    except AddressError as exc:
        fail(f"--send-test-to: {exc}", code=2)


def _print(diagnosis: Diagnosis) -> None:
    console.print(Text(f"{diagnosis.email} (mailbox {diagnosis.channel_id}, {diagnosis.transport})", "bold"))
    for check in diagnosis.checks:
        _print_check(check)
    verdict = (
        ("All good.", "green") if diagnosis.ok else ("A check failed; fix it and run this again.", "red")
    )
    console.print(Text(verdict[0], verdict[1]))
    console.print()


def _print_check(check: Check) -> None:
    mark, style = _MARKS[check.status]
    # Text objects, not markup: server replies contain brackets that Rich would read as styles.
    line = Text.assemble("  ", (mark, style), " ", (check.label, "bold" if check.status == "failed" else ""))
    if check.detail:
        line.append(f" — {check.detail}", style="dim" if check.status == "skipped" else "")
    console.print(line)
    if check.status != "failed":
        return
    console.print(Text(f"      Cause: {check.cause}"))
    console.print(Text(f"      Fix: {check.fix}"))
    if check.command:
        console.print(Text("      In Exchange Online PowerShell (after Connect-ExchangeOnline):"))
        for command_line in check.command.splitlines():
            console.print(Text(f"        {command_line}", "cyan"), soft_wrap=True)
