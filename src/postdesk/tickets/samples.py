"""Sample tickets for the demo, created through the same service layer as real mail."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from postdesk.db.models import Direction, Ticket, TicketState, User
from postdesk.tickets.people import get_or_create_group
from postdesk.tickets.service import (
    NewArticle,
    add_article,
    change_state,
    create_ticket,
    get_or_create_customer,
)

_SAMPLES = (
    (
        "Invoice 2026-1183 charged twice",
        "jana.novak@example.org",
        "Jana Novák",
        "Billing",
        "Hello,\n\nmy card was charged twice for invoice 2026-1183 this morning. Could you refund one of the "
        "payments?\n\nThanks,\nJana",
        TicketState.NEW,
    ),
    (
        "Cannot sign in after password reset",
        "liam.obrien@example.net",
        "Liam O'Brien",
        "Support",
        "Hi team,\n\nsince resetting my password yesterday the portal keeps saying my account is "
        "locked.\n\nLiam",
        TicketState.OPEN,
    ),
    (
        "Shipping address change for order #48213",
        "akira.tanaka@example.jp",
        "田中 明",
        "Support",
        "Good afternoon,\n\nplease ship order #48213 to our new office at 2-1-1 Marunouchi "
        "instead.\n\nBest regards",
        TicketState.PENDING_REMINDER,
    ),
    (
        "Feature request: export tickets as CSV",
        "sofia.rossi@example.it",
        "Sofia Rossi",
        "Support",
        "Ciao,\n\nit would help our monthly report if we could export tickets to CSV.\n\nSofia",
        TicketState.CLOSED,
    ),
    (
        "Quote for 40 additional seats",
        "procurement@example.com",
        "Procurement",
        "Billing",
        "Dear sales,\n\nplease send a quote for 40 more seats on the annual plan.\n\nKind regards",
        TicketState.NEW,
    ),
)


def seed_sample_tickets(session: Session, *, agent: User) -> int:
    """Create the sample tickets unless the help desk already has tickets; return how many were made."""
    if session.scalar(select(func.count()).select_from(Ticket)):
        return 0
    for title, email, name, group_name, body, state in _SAMPLES:
        group = get_or_create_group(session, group_name)
        if group not in agent.groups:
            agent.groups.append(group)
        ticket = create_ticket(
            session,
            title=title,
            customer=get_or_create_customer(session, email, name),
            group=group,
            first_article=NewArticle(
                direction=Direction.INBOUND,
                body_text=body,
                sender=f"{name} <{email}>",
                subject=title,
                to_addresses="support@contoso.onmicrosoft.com",
            ),
        )
        if state is not TicketState.NEW:
            add_article(
                session,
                ticket,
                NewArticle(
                    direction=Direction.OUTBOUND,
                    internal=True,
                    author=agent,
                    sender=agent.display_name,
                    body_text="Checked the account history; see the customer's previous ticket for context.",
                ),
            )
            change_state(ticket, state)
    return len(_SAMPLES)
