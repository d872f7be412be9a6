"""``postdesk outbox …`` and ``postdesk ticket reply``: outbound mail from the command line."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from postdesk.cli.common import console, fail, print_json, start
from postdesk.db.models import Article, DeliveryStatus, OutboundMessage
from postdesk.outbox.queue import Draft, DraftError, ReplyKind, UploadedFile, queue_reply
from postdesk.outbox.sender import SendReport, send_due
from postdesk.tickets.people import find_user
from postdesk.tickets.service import get_ticket

app = typer.Typer(help="Outbound mail: what is queued, sent or failed.", no_args_is_help=True)


def delivery_json(row: OutboundMessage) -> dict[str, Any]:
    return {
        "id": row.id,
        "ticket": row.article.ticket.number,
        "article_id": row.article_id,
        "channel": row.channel.email if row.channel else None,
        "message_id": row.message_id,
        "recipients": row.recipients.split("\n"),
        "status": row.status.value,
        "attempts": row.attempts,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.status is DeliveryStatus.QUEUED else None,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "last_error": row.last_error,
        "server_reply": row.server_reply,
        "created_at": row.created_at.isoformat(),
    }


@app.command("list")
def list_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable, for scripts).")] = False,
    status: Annotated[
        list[DeliveryStatus] | None, typer.Option(help="Only messages in this state (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many, newest first.")] = 100,
) -> None:
    """List outbound mail, newest first."""
    runtime = start()
    with runtime.sessions() as session:
        query = (
            select(OutboundMessage)
            .options(selectinload(OutboundMessage.article).selectinload(Article.ticket))
            .order_by(OutboundMessage.id.desc())
            .limit(limit)
        )
        if status:
            query = query.where(OutboundMessage.status.in_(status))
        rows = [delivery_json(row) for row in session.scalars(query)]
    if json_output:
        print_json(rows)
        return
    table = Table("ID", "Ticket", "To", "Status", "Attempts", "Detail")
    for row in rows:
        detail = row["last_error"] or row["server_reply"] or ""
        table.add_row(
            str(row["id"]),
            str(row["ticket"]),
            ", ".join(row["recipients"]),
            row["status"],
            str(row["attempts"]),
            detail,
        )
    console.print(table if rows else "The outbox is empty.")


@app.command("flush")
def flush_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Send every queued message now, including those waiting for a retry. Exits 1 if any is left unsent."""
    runtime = start()
    report = send_due(runtime, include_waiting=True, limit=10_000)
    _print_report(report, json_output=json_output)
    if report.failed or report.retrying:
        raise typer.Exit(1)


def _print_report(report: SendReport, *, json_output: bool) -> None:
    if json_output:
        print_json(
            {
                "sent": report.sent,
                "already_sent": report.already_sent,
                "retrying": report.retrying,
                "failed": report.failed,
                "problems": report.problems,
            }
        )
        return
    console.print(f"Outbox: {report.summary()}.", highlight=False)
    for problem in report.problems:
        console.print(f"  {problem}", highlight=False)


def reply_command(
    number: Annotated[int, typer.Argument(help="The ticket number.")],
    body_file: Annotated[
        Path,
        typer.Option("--body-file", exists=True, dir_okay=False, help="The reply text (UTF-8)."),
    ],
    attach: Annotated[
        list[Path] | None, typer.Option(exists=True, dir_okay=False, help="Attach a file (repeatable).")
    ] = None,
    kind: Annotated[str, typer.Option(help="reply, reply-all or forward.")] = "reply",
    to: Annotated[
        list[str] | None, typer.Option(help="Recipient instead of the usual ones (repeatable).")
    ] = None,
    cc: Annotated[list[str] | None, typer.Option(help="Cc recipient (repeatable).")] = None,
    author: Annotated[
        str | None, typer.Option("--as", help="The agent's email address, shown as the author.")
    ] = None,
    queue_only: Annotated[
        bool, typer.Option("--queue-only", help="Queue it for the worker; do not send now.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Reply to a ticket's customer from the mailbox the ticket came in through, and send it now."""
    if kind not in ("reply", "reply-all", "forward"):
        fail("--kind must be reply, reply-all or forward")
    body = body_file.read_text(encoding="utf-8")
    files = tuple(
        UploadedFile(
            path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        for path in attach or ()
    )
    runtime = start()
    with runtime.sessions() as session, session.begin():
        ticket = get_ticket(session, number)
        if ticket is None:
            fail(f"there is no ticket #{number}")
        agent = find_user(session, author) if author else None
        if author and agent is None:
            fail(f"there is no user {author}")
        reply_kind: ReplyKind = "reply_all" if kind == "reply-all" else kind  # type: ignore[assignment]
        draft = Draft(
            kind=reply_kind,
            body_text=body,
            to=tuple(to) if to else None,
            cc=tuple(cc) if cc else None,
            attachments=files,
        )
        try:
            article = queue_reply(session, runtime.settings, ticket, draft, author=agent)
        except DraftError as exc:
            fail(str(exc))
        article_id = article.id
    report = SendReport() if queue_only else send_due(runtime)
    with runtime.sessions() as session:
        row = session.scalar(select(OutboundMessage).where(OutboundMessage.article_id == article_id))
        assert row is not None
        result = delivery_json(row)
    if json_output:
        print_json(result)
    else:
        console.print(
            f"Reply to #{number} ({', '.join(result['recipients'])}): {result['status']}.", highlight=False
        )
        if result["last_error"]:
            console.print(f"  {result['last_error']}", highlight=False)
    if report.failed and result["status"] == DeliveryStatus.FAILED.value:
        raise typer.Exit(1)
