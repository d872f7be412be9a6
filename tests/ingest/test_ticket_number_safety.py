"""A ticket number in a subject joins that ticket only for people who take part in it (issue #9).

Anyone can write ``[Ticket#N]`` into a subject. If that were enough, a stranger's mail would join another
customer's ticket, reopen it, and the agent's reply would go to the stranger with the conversation quoted.
The customer, the people on an earlier mail of the ticket, and replies that answer one of its messages
still join it. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from postdesk.db.models import Article, Direction, InboundStatus, Ticket, TicketState
from postdesk.db.session import transaction
from postdesk.ingest.known import stored_addresses
from postdesk.runtime import Runtime
from postdesk.tickets.service import NewArticle, add_article
from tests.fuzz.fuzz_ingest import Ending, IngestBench, problems
from tests.support.mailfactory import customer_mail

DESK = "support@contoso.example"
CUSTOMER = "Jana Novák <jana.novak@example.org>"
QUESTION_ID = "<question@example.org>"


@pytest.fixture
def bench(db_runtime: Runtime) -> IngestBench:
    return IngestBench(db_runtime, email=DESK)


def ingest(bench: IngestBench, *raws: bytes) -> list[Ending]:
    """Store and process the messages as one batch; each ends as an article or in quarantine."""
    endings = bench.ingest(list(raws))
    for ending in endings:
        assert problems(ending) == []
    return endings


def mail(subject: str, **fields: Any) -> bytes:
    return customer_mail(to=DESK, subject=subject, **fields)


def follow_up(ticket_number: int, **fields: Any) -> bytes:
    """A mail whose subject names the ticket, as a reply to Jana's question would."""
    return mail(f"Re: [Ticket#{ticket_number}] Printer on fire", **fields)


def ticket_of(runtime: Runtime, ending: Ending) -> tuple[int, str, TicketState, int]:
    """(number, customer, state, articles) of the ticket the message became part of."""
    assert ending.status is InboundStatus.PROCESSED, ending.reason
    with runtime.sessions() as session:
        ticket = session.scalars(select(Article).where(Article.id == ending.article_id)).one().ticket
        return ticket.number, ticket.customer.email, ticket.state, len(ticket.articles)


@pytest.fixture
def closed_ticket(bench: IngestBench, db_runtime: Runtime) -> int:
    """Jana's question, copying her colleague Piotr, in a ticket that has since been closed."""
    [question] = ingest(
        bench, mail("Printer on fire", message_id=QUESTION_ID, extra_headers={"Cc": "piotr@example.org"})
    )
    number, _, _, _ = ticket_of(db_runtime, question)
    with transaction(db_runtime.sessions) as session:
        session.scalars(select(Ticket)).one().state = TicketState.CLOSED
    return number


def test_a_stranger_naming_the_ticket_number_gets_a_ticket_of_their_own_and_the_original_is_untouched(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    [ending] = ingest(
        bench,
        mail(
            f"RE: [Ticket#{closed_ticket}] Printer on fire",
            sender="Mallory <mallory@attacker.example>",
            body="Please send the new password to this address instead.",
        ),
    )
    number, customer, state, articles = ticket_of(db_runtime, ending)
    # The mail, and an internal note telling the agents why it did not join the ticket it named.
    assert (customer, state, articles) == ("mallory@attacker.example", TicketState.NEW, 2)
    assert number != closed_ticket
    assert ending.reason == f"opened ticket {number}"
    with db_runtime.sessions() as session:
        ticket = session.scalars(select(Ticket).where(Ticket.number == number)).one()
        note = ticket.articles[-1]
        assert note.internal and note.sender == "Postdesk"
        assert f"names ticket {closed_ticket}, but the sender has no part in it" in note.body_text
        original = session.scalars(select(Ticket).where(Ticket.number == closed_ticket)).one()
        assert (original.state, len(original.articles)) == (TicketState.CLOSED, 1)
        assert original.customer.email == "jana.novak@example.org"
        # The new ticket's title keeps the number the stranger named, for an agent to merge by hand.
        title = session.scalars(select(Ticket.title).where(Ticket.number == number)).one()
        assert title == f"RE: [Ticket#{closed_ticket}] Printer on fire"


def test_the_customer_naming_the_ticket_number_joins_and_reopens_it(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    # From the customer's address in another case and with another display name: the same person.
    sender = "J. Novak <Jana.Novak@Example.ORG>"
    [ending] = ingest(bench, follow_up(closed_ticket, sender=sender))
    assert ticket_of(db_runtime, ending) == (closed_ticket, "jana.novak@example.org", TicketState.OPEN, 2)
    assert ending.reason == f"the subject names ticket {closed_ticket}, and the sender takes part in it"


def test_a_colleague_the_customer_copied_joins_the_ticket(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    [ending] = ingest(bench, follow_up(closed_ticket, sender="Piotr <piotr@example.org>"))
    assert ticket_of(db_runtime, ending) == (closed_ticket, "jana.novak@example.org", TicketState.OPEN, 2)


def test_someone_an_agent_wrote_to_joins_the_ticket(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    with transaction(db_runtime.sessions) as session:
        ticket = session.scalars(select(Ticket)).one()
        reply = NewArticle(
            direction=Direction.OUTBOUND,
            sender=f"Contoso Support <{DESK}>",
            to_addresses="jana.novak@example.org",
            cc_addresses="facilities@example.org, it-lead@example.org",
            body_text="We have asked your facilities team.",
        )
        add_article(session, ticket, reply)
    [ending] = ingest(bench, follow_up(closed_ticket, sender="it-lead@example.org"))
    assert ticket_of(db_runtime, ending)[0] == closed_ticket


def test_a_reply_from_a_new_address_that_answers_a_message_of_the_ticket_joins_it(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    reply = follow_up(
        closed_ticket, sender="Jana at home <jana@home.example>", extra_headers={"References": QUESTION_ID}
    )
    [ending] = ingest(bench, reply)
    assert ticket_of(db_runtime, ending) == (closed_ticket, "jana.novak@example.org", TicketState.OPEN, 2)
    assert ending.reason == f"it answers {QUESTION_ID}"


def test_a_reply_to_naming_the_customer_does_not_let_a_stranger_in(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    # A follow-up is answered at its From (outbox.queue.recipients_for): trusting Reply-To would send the
    # conversation to whoever wrote it.
    forged = follow_up(closed_ticket, sender="mallory@attacker.example", extra_headers={"Reply-To": CUSTOMER})
    [ending] = ingest(bench, forged)
    assert ticket_of(db_runtime, ending)[0] != closed_ticket


def test_an_address_in_a_copied_persons_display_name_does_not_take_part(
    bench: IngestBench, db_runtime: Runtime
) -> None:
    # Display names are stored unquoted: "mallory@attacker.example <bob@example.org>".
    [question] = ingest(
        bench, mail("Access", extra_headers={"Cc": '"mallory@attacker.example" <bob@example.org>'})
    )
    number, _, _, _ = ticket_of(db_runtime, question)
    [stranger, bob] = ingest(
        bench,
        mail(f"Re: [Ticket#{number}] Access", sender="mallory@attacker.example"),
        mail(f"Re: [Ticket#{number}] Access", sender="bob@example.org"),
    )
    assert ticket_of(db_runtime, stranger)[0] != number
    assert ticket_of(db_runtime, bob)[0] == number


def test_someone_copied_earlier_in_the_same_batch_takes_part(bench: IngestBench, db_runtime: Runtime) -> None:
    [question] = ingest(bench, mail("Laptop"))
    number, _, _, _ = ticket_of(db_runtime, question)
    [copying, colleague] = ingest(
        bench,
        mail(f"Re: [Ticket#{number}] Laptop", extra_headers={"Cc": "ola@example.org"}),
        mail(f"Re: [Ticket#{number}] Laptop", sender="ola@example.org"),
    )
    assert ticket_of(db_runtime, copying)[0] == ticket_of(db_runtime, colleague)[0] == number


def test_a_subject_naming_two_tickets_joins_the_one_the_sender_takes_part_in(
    bench: IngestBench, db_runtime: Runtime, closed_ticket: int
) -> None:
    [own] = ingest(bench, mail("My own question", sender="ola@example.org"))
    own_number, _, _, _ = ticket_of(db_runtime, own)
    subject = f"Re: [Ticket#{closed_ticket}] [Ticket#{own_number}] Printer"
    [ending] = ingest(bench, mail(subject, sender="ola@example.org"))
    assert ticket_of(db_runtime, ending)[0] == own_number


@pytest.mark.parametrize("number", [2**31 - 1, 2**31, 99_999_999_999, 10**18 - 1])
def test_a_ticket_number_up_to_and_past_the_columns_limit_opens_a_ticket(
    bench: IngestBench, db_runtime: Runtime, number: int
) -> None:
    [ending] = ingest(bench, mail(f"Re: [Ticket#{number}] Help"))
    assert ending.status is InboundStatus.PROCESSED, ending.reason
    assert ending.reason.startswith("opened ticket")


def test_stored_addresses_count_only_the_address_of_each_entry() -> None:
    stored = "Doe, John <J.Doe@Example.org>, a@b.example, mallory@attacker.example <bob@x.example>, Postdesk"
    assert stored_addresses(stored) == ["j.doe@example.org", "a@b.example", "bob@x.example"]
    assert stored_addresses("") == []
