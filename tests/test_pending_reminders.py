"""A ticket set to "pending reminder" comes back as open, with a note, when its time has come."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from postdesk.db.models import Direction, Ticket, TicketState, User
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime
from postdesk.tickets.service import (
    AssignmentError,
    NewArticle,
    change_state,
    create_ticket,
    get_or_create_customer,
    remind_due_tickets,
)
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in


def _new_ticket(runtime: Runtime) -> int:
    with transaction(runtime.sessions) as session:
        ticket = create_ticket(
            session,
            title="Waiting for the customer",
            customer=get_or_create_customer(session, "jana@example.org"),
            first_article=NewArticle(direction=Direction.INBOUND, body_text="Will send logs on Monday."),
        )
        return ticket.id


def test_a_due_reminder_opens_the_ticket_once_with_a_note(db_runtime: Runtime) -> None:
    ticket_id = _new_ticket(db_runtime)
    when = utcnow() + timedelta(hours=3)
    with transaction(db_runtime.sessions) as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        change_state(ticket, TicketState.PENDING_REMINDER, pending_until=when)
    with transaction(db_runtime.sessions) as session:
        assert remind_due_tickets(session, now=when - timedelta(minutes=1)) == []
    with transaction(db_runtime.sessions) as session:
        assert [t.id for t in remind_due_tickets(session, now=when)] == [ticket_id]
    with transaction(db_runtime.sessions) as session:
        assert remind_due_tickets(session, now=when + timedelta(hours=1)) == []
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        assert (ticket.state, ticket.pending_until) == (TicketState.OPEN, None)
        note = ticket.articles[-1]
        assert note.internal and "pending until" in note.body_text


def test_a_reminder_in_the_past_is_refused_and_none_given_means_tomorrow(runtime: Runtime) -> None:
    ticket_id = _new_ticket(runtime)
    with transaction(runtime.sessions) as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        with pytest.raises(AssignmentError, match="future"):
            change_state(ticket, TicketState.PENDING_REMINDER, pending_until=utcnow() - timedelta(minutes=5))
        change_state(ticket, TicketState.PENDING_REMINDER)
        assert ticket.pending_until is not None
        assert timedelta(hours=23) < ticket.pending_until - utcnow() <= timedelta(days=1)
        change_state(ticket, TicketState.OPEN)
        assert ticket.pending_until is None


def test_the_ticket_page_sets_the_reminder(client: TestClient, runtime: Runtime, admin: User) -> None:
    ticket_id = _new_ticket(runtime)
    with runtime.sessions() as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        number = ticket.number
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get(f"/tickets/{number}")
    when = (utcnow() + timedelta(days=3)).replace(second=0, microsecond=0)
    form = {
        "state": "pending_reminder",
        "pending_until": when.strftime("%Y-%m-%dT%H:%M"),
        "csrf_token": csrf_from(page.text),
    }
    assert client.post(f"/tickets/{number}/properties", data=form, follow_redirects=False).status_code == 303
    assert f"until {when:%Y-%m-%d %H:%M} UTC" in client.get(f"/tickets/{number}").text
    form["pending_until"] = "next tuesday"
    refused = client.post(f"/tickets/{number}/properties", data=form, follow_redirects=False)
    assert refused.status_code == 422 and "date and time" in refused.text
