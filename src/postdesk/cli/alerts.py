"""``postdesk alerts list``: what needs an admin's attention, and whether admins were told."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from postdesk.cli.common import console, print_json, start
from postdesk.db.models import Alert, Channel

app = typer.Typer(help="Alerts: mailboxes that stopped or went quiet, credentials about to expire.")


def alert_json(alert: Alert, channel_email: str | None) -> dict[str, Any]:
    return {
        "id": alert.id,
        "key": alert.key,
        "kind": alert.kind,
        "severity": alert.severity,
        "channel_id": alert.channel_id,
        "channel": channel_email,
        "title": alert.title,
        "message": alert.message,
        "created_at": alert.created_at.isoformat(),
        "notified_at": alert.notified_at.isoformat() if alert.notified_at else None,
        "notify_error": alert.notify_error,
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }


@app.command("list")
def list_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable, for scripts).")] = False,
    resolved: Annotated[bool, typer.Option("--resolved", help="Also list resolved alerts.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many, newest first.")] = 100,
) -> None:
    """List open alerts (with --resolved, also past ones), newest first."""
    runtime = start()
    query = select(Alert, Channel.email).outerjoin(Channel, Alert.channel_id == Channel.id)
    if not resolved:
        query = query.where(Alert.resolved_at.is_(None))
    with runtime.sessions() as session:
        rows = [
            alert_json(alert, email)
            for alert, email in session.execute(query.order_by(Alert.id.desc()).limit(limit))
        ]
    if json_output:
        print_json(rows)
        return
    table = Table("ID", "Severity", "Alert", "Since", "Admins told", "Resolved")
    for row in rows:
        told = row["notified_at"] or f"not yet: {row['notify_error'] or 'pending'}"
        table.add_row(
            str(row["id"]), row["severity"], row["title"], row["created_at"], told, row["resolved_at"] or ""
        )
    console.print(table if rows else "Nothing needs attention.")
