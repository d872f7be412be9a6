"""``postdesk channel fetch`` and ``postdesk quarantine …``"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import select

from postdesk.cli.common import console, fail, print_json, start
from postdesk.db.models import Channel, ChannelStatus, InboundMessage
from postdesk.ingest.fetch import FetchResult, fetch_channel
from postdesk.ingest.quarantine import quarantined, reprocess
from postdesk.runtime import Runtime

quarantine_app = typer.Typer(help="Mail that could not be turned into tickets.", no_args_is_help=True)


def fetch_command(
    channel_id: Annotated[
        int | None, typer.Argument(help="The mailbox's ID (see `postdesk channel list`).")
    ] = None,
    all_channels: Annotated[bool, typer.Option("--all", help="Every enabled mailbox.")] = False,
    import_existing: Annotated[
        bool,
        typer.Option(
            "--import-existing",
            help="Also import the mail that was already there when the "
            "mailbox was connected (the channel's first-connection choice).",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Fetch mail now and report what became of it."""
    if (channel_id is None) == (not all_channels):
        fail("give a mailbox ID or --all")
    runtime = start()
    with runtime.sessions() as session, session.begin():
        query = select(Channel).order_by(Channel.id)
        if channel_id is not None:
            query = query.where(Channel.id == channel_id)
        else:
            query = query.where(Channel.status != ChannelStatus.DISABLED)
        channels = list(session.scalars(query))
        if channel_id is not None and not channels:
            fail(f"there is no mailbox with ID {channel_id}")
        if import_existing:
            for channel in channels:
                # An explicit request overrides an earlier "Leave them".
                channel.backlog_confirmed = True
                channel.backlog_done = False
        targets = [(channel.id, channel.email) for channel in channels]
    results = [_fetch_with_progress(runtime, cid, email, quiet=json_output) for cid, email in targets]
    if json_output:
        print_json([_result_json(r) for r in results])
    if any(r.error for r in results):
        raise typer.Exit(1)


def _fetch_with_progress(runtime: Runtime, channel_id: int, email: str, *, quiet: bool) -> FetchResult:
    with Progress(console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task(f"Fetching {email}", total=None)
        result = fetch_channel(
            runtime, channel_id, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if not quiet:
        console.print(f"{email}: {result.summary}", highlight=False)
    return result


def _result_json(result: FetchResult) -> dict[str, Any]:
    p = result.processed
    return {
        "channel_id": result.channel_id,
        "email": result.email,
        "fetched": result.fetched,
        "tickets": p.tickets,
        "follow_ups": p.follow_ups,
        "duplicates": p.duplicates,
        "quarantined": p.quarantined,
        "backlog_waiting": result.backlog_waiting,
        "skipped": result.skipped,
        "error": result.error,
    }


def quarantine_json(row: InboundMessage) -> dict[str, Any]:
    return {
        "id": row.id,
        "channel_id": row.channel_id,
        "channel": row.channel.email,
        "subject": row.subject,
        "sender": row.sender,
        "message_id": row.message_id,
        "size": row.size,
        "reason": row.reason,
        "fetched_at": row.fetched_at,
        "sha256": row.sha256,
    }


@quarantine_app.command("list")
def quarantine_list(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable).")] = False,
) -> None:
    """List quarantined mail, newest first, with the reason."""
    runtime = start()
    with runtime.sessions() as session:
        rows = [quarantine_json(row) for row in quarantined(session)]
    if json_output:
        print_json(rows)
        return
    table = Table("ID", "Mailbox", "From", "Subject", "Reason")
    for row in rows:
        table.add_row(str(row["id"]), row["channel"], row["sender"], row["subject"], row["reason"] or "")
    console.print(table if rows else "Nothing is quarantined.")


@quarantine_app.command("reprocess")
def quarantine_reprocess(
    message_id: Annotated[int, typer.Argument(help="The quarantined message's ID.")],
) -> None:
    """Run a quarantined message through the pipeline again."""
    runtime = start()
    row, _counts = reprocess(runtime, message_id)
    if row is None:
        fail(f"message {message_id} is not in quarantine")
    console.print(f"Message {message_id}: {row.status.value} — {row.reason}", highlight=False)
