"""``postdesk ticket …``"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from postdesk.cli.common import console, print_json, start
from postdesk.db.models import Ticket, TicketState
from postdesk.tickets.service import TicketFilter, list_tickets

app = typer.Typer(help="Tickets.", no_args_is_help=True)


def ticket_json(ticket: Ticket, article_count: int) -> dict[str, Any]:
    return {
        "id": ticket.id,
        "number": ticket.number,
        "title": ticket.title,
        "customer": ticket.customer.email,
        "state": ticket.state.value,
        "group": ticket.group.name if ticket.group else None,
        "owner": ticket.owner.email if ticket.owner else None,
        "articles": article_count,
        "created_at": ticket.created_at.isoformat(),
        "updated_at": ticket.updated_at.isoformat(),
    }


@app.command("list")
def list_command(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable, for scripts).")] = False,
    state: Annotated[
        list[TicketState] | None, typer.Option(help="Only tickets in this state (repeatable).")
    ] = None,
    search: Annotated[str, typer.Option(help="Match number, subject or customer address.")] = "",
    limit: Annotated[int, typer.Option(min=1, max=10000, help="At most this many tickets.")] = 100,
) -> None:
    """List tickets, most recently active first."""
    runtime = start()
    with runtime.sessions() as session:
        page = list_tickets(session, TicketFilter(states=tuple(state or ()), search=search, per_page=limit))
        rows = [ticket_json(ticket, page.article_counts.get(ticket.id, 0)) for ticket in page.tickets]
    if json_output:
        print_json(rows)
        return
    table = Table("Number", "Title", "Customer", "State", "Articles", "Last activity")
    for row in rows:
        table.add_row(
            str(row["number"]),
            row["title"],
            row["customer"],
            row["state"],
            str(row["articles"]),
            row["updated_at"][:16].replace("T", " "),
        )
    console.print(table if rows else "No tickets.")
