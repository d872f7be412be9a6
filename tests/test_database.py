"""Migrations and the ticket service, on SQLite and on PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from postdesk.db import migrate
from postdesk.db.models import Base, Direction, Role, TicketState
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.tickets.people import create_user, get_or_create_group
from postdesk.tickets.service import (
    FIRST_TICKET_NUMBER,
    NewArticle,
    TicketFilter,
    change_state,
    create_ticket,
    get_or_create_customer,
    list_tickets,
)


def _make_ticket(
    runtime: Runtime, title: str, customer: str = "customer@example.org", group: str | None = None
) -> int:
    with transaction(runtime.sessions) as session:
        ticket = create_ticket(
            session,
            title=title,
            customer=get_or_create_customer(session, customer),
            group=get_or_create_group(session, group) if group else None,
            first_article=NewArticle(direction=Direction.INBOUND, body_text="hello"),
        )
        return ticket.number


def test_migrations_reach_head_and_match_the_models(db_runtime: Runtime) -> None:
    assert migrate.current_revision(db_runtime.engine) == migrate.head_revision(db_runtime.engine)
    with db_runtime.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_upgrading_twice_changes_nothing(db_runtime: Runtime) -> None:
    migrate.upgrade(db_runtime.engine)
    assert "tickets" in inspect(db_runtime.engine).get_table_names()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(runtime: Runtime) -> None:
    with runtime.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1


def test_ticket_numbers_are_sequential(db_runtime: Runtime) -> None:
    numbers = [_make_ticket(db_runtime, f"Ticket {i}") for i in range(3)]
    assert numbers == [FIRST_TICKET_NUMBER, FIRST_TICKET_NUMBER + 1, FIRST_TICKET_NUMBER + 2]


def test_listing_filters_searches_sorts_and_pages(db_runtime: Runtime) -> None:
    for i in range(7):
        _make_ticket(db_runtime, f"Order {i}", customer=f"buyer{i}@example.org")
    _make_ticket(db_runtime, "100% off coupon_code", customer="odd@example.org")
    with db_runtime.sessions() as session:
        page = list_tickets(
            session, TicketFilter(search="order", sort="number", descending=False, per_page=3, page=2)
        )
        assert [t.title for t in page.tickets] == ["Order 3", "Order 4", "Order 5"]
        assert (page.total, page.pages) == (7, 3)
        assert page.article_counts == {t.id: 1 for t in page.tickets}
        assert [t.title for t in list_tickets(session, TicketFilter(search="buyer6@")).tickets] == ["Order 6"]
        # LIKE wildcards in the search term are taken literally.
        assert [t.title for t in list_tickets(session, TicketFilter(search="100%")).tickets] == [
            "100% off coupon_code"
        ]
        assert list_tickets(session, TicketFilter(search="_")).total == 1
        by_number = list_tickets(session, TicketFilter(search=f"#{FIRST_TICKET_NUMBER + 1}")).tickets
        assert [t.title for t in by_number] == ["Order 1"]


def test_listing_filters_by_state(db_runtime: Runtime) -> None:
    first = _make_ticket(db_runtime, "First")
    _make_ticket(db_runtime, "Second")
    with transaction(db_runtime.sessions) as session:
        ticket = list_tickets(session, TicketFilter(search=str(first))).tickets[0]
        change_state(ticket, TicketState.CLOSED)
    with db_runtime.sessions() as session:
        closed = list_tickets(session, TicketFilter(states=(TicketState.CLOSED,))).tickets
        assert [t.title for t in closed] == ["First"]
        assert closed[0].closed_at is not None


def test_agents_see_their_groups_and_unassigned_tickets_only(db_runtime: Runtime) -> None:
    _make_ticket(db_runtime, "Billing thing", group="Billing")
    _make_ticket(db_runtime, "HR thing", group="HR")
    _make_ticket(db_runtime, "Unassigned thing")
    with transaction(db_runtime.sessions) as session:
        agent = create_user(session, email="agent@example.com", password=None, role=Role.AGENT)
        agent.groups.append(get_or_create_group(session, "Billing"))
        titles = {t.title for t in list_tickets(session, TicketFilter(), viewer=agent).tickets}
    assert titles == {"Billing thing", "Unassigned thing"}
