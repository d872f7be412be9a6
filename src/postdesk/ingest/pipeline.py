"""The inbound pipeline as a list of named steps, each returning an explicit outcome.

A step looks at the message and says: continue, attach to this ticket, skip as a duplicate of that
article, or quarantine for this reason. The reading steps need nothing but the bytes; the matching steps
look up what the help desk already holds in ``Known``, which is loaded for a whole batch of messages at
once (see ``postdesk.ingest.known``). Only the last stage writes. The steps run from the stored raw
bytes, so a crash anywhere just means the row is processed again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from postdesk.db.models import Channel, TicketState
from postdesk.ingest.known import ArticleRef, Known, TicketRef
from postdesk.mail import Classification, MailParseError, ParsedMail, classify, parse_message
from postdesk.mail.threading import thread_message_ids, ticket_numbers_in_subject


@dataclass
class Inbound:
    """What the steps know about one stored message; each step may fill in more."""

    row_id: int
    size: int
    channel: Channel
    raw: bytes
    own_addresses: frozenset[str]
    ticket_prefix: str = "Ticket#"
    mail: ParsedMail | None = None
    classification: Classification | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Quarantine:
    reason: str


@dataclass(frozen=True)
class Duplicate:
    article: ArticleRef

    @property
    def reason(self) -> str:
        # Read when the row is written: an article opened earlier in the same batch has an id by then.
        return f"already stored as article {self.article.id} (same Message-ID)"


@dataclass(frozen=True)
class AttachTo:
    ticket: TicketRef
    reason: str


@dataclass(frozen=True)
class NewTicket:
    pass


Outcome = Continue | Quarantine | Duplicate | AttachTo | NewTicket
ReadStep = Callable[[Inbound], Outcome]
MatchStep = Callable[[Known, Inbound], Outcome]


# --- reading: the message alone -------------------------------------------------------------------


def check_size(inbound: Inbound) -> Outcome:
    limit = inbound.channel.max_message_bytes
    if inbound.size > limit:
        return Quarantine(
            f"the message is {_megabytes(inbound.size)}, over this mailbox's limit of "
            f"{_megabytes(limit)}; it is kept here and can be reprocessed after raising the limit"
        )
    return Continue()


def _megabytes(size: int) -> str:
    # Bytes as well: 1.0 MB over a 1.0 MB limit would read like a mistake.
    return f"{size / (1024 * 1024):.1f} MB ({size:,} bytes)"


def parse(inbound: Inbound) -> Outcome:
    try:
        inbound.mail = parse_message(inbound.raw)
    except MailParseError as exc:
        return Quarantine(f"this is not a readable mail message: {exc}")
    return Continue()


def classify_message(inbound: Inbound) -> Outcome:
    inbound.classification = classify(_mail(inbound), own_addresses=inbound.own_addresses)
    return Continue()


# --- matching: the message against what the help desk holds --------------------------------------


def skip_duplicates(known: Known, inbound: Inbound) -> Outcome:
    """The same message fetched again (a resync, a copy in another folder) becomes no second article."""
    message_id = _mail(inbound).message_id
    if message_id is None:
        return Continue()
    existing = known.article_with_message_id(inbound.channel.id, message_id)
    return Duplicate(existing) if existing is not None else Continue()


def follow_up_by_ticket_number(known: Known, inbound: Inbound) -> Outcome:
    """``[Ticket#N]`` in the subject joins ticket N, but only mail from someone who took part in it.

    Anyone can write a number into a subject. Were that enough, a stranger's mail would join another
    customer's ticket, reopen it, and the agent's reply would go to the stranger with the conversation
    quoted. So the From address must be the customer's or have sent, or been sent or copied, mail of the
    ticket; a colleague the customer copied counts. From, not Reply-To: a reply to a follow-up goes to
    its From (``outbox.queue.recipients_for``), and Reply-To is not what a receiving server checks.
    A reply from a new address still joins by In-Reply-To or References (the next step); anything else
    opens a ticket of its own. Its title keeps the number, and ``inbound.notes`` says why it did not
    join, for the agents to merge by hand if it belongs there.
    """
    mail = _mail(inbound)
    sender = mail.sender.email.lower() if mail.sender is not None else None
    for number in ticket_numbers_in_subject(mail.subject, prefix=inbound.ticket_prefix):
        ticket = known.ticket_numbered(number)
        if ticket is None:
            continue
        if sender is not None and sender in ticket.participants:
            return AttachTo(ticket, f"the subject names ticket {number}, and the sender takes part in it")
        inbound.notes.append(
            f"the subject names ticket {number}, but the sender has no part in it, so the mail did not "
            "join it; merge by hand if it belongs there"
        )
    return Continue()


def follow_up_by_references(known: Known, inbound: Inbound) -> Outcome:
    """In-Reply-To and References name a message Postdesk already holds: the same conversation."""
    for message_id in thread_candidates(inbound):
        ticket = known.ticket_holding(message_id)
        if ticket is not None:
            return AttachTo(ticket, f"it answers {message_id}")
    return Continue()


def thread_candidates(inbound: Inbound) -> list[str]:
    """The message ids a reply or a bounce points at, the most telling first."""
    candidates = list(thread_message_ids(_mail(inbound)))
    classification = inbound.classification
    if classification is not None and classification.bounced_message_id:
        candidates.insert(0, classification.bounced_message_id)
    return candidates


def refuse_loops(known: Known, inbound: Inbound) -> Outcome:
    """Mail from our own mailboxes (or a bounce about nothing we sent) must not open a ticket.

    Only From decides a loop. ``X-Loop`` or Exchange's inbox-rule header naming our address is no proof:
    Postdesk writes neither, and anyone can. Such mail becomes a ticket, marked automatic by
    ``classify`` with the header as the reason, so it is never answered automatically. An admin who
    reprocesses quarantined mail has looked at it, and it becomes a ticket even if From is ours.
    """
    classification = inbound.classification
    if classification is None:
        return Continue()
    if classification.from_own_address and not known.released_by_admin(inbound.row_id):
        sender = _mail(inbound).sender
        own = sender.email.lower() if sender is not None else "ours"
        return Quarantine(
            f"sent by one of Postdesk's own mailboxes and not part of a known ticket: From is {own}. Not "
            "turned into a ticket so that two mailboxes cannot answer each other forever; if a person "
            "wrote it, reprocess it to make it a ticket"
        )
    if classification.bounce:
        return Quarantine("a delivery failure report for a message Postdesk does not know; kept for review")
    return NewTicket()


READ_STEPS: tuple[ReadStep, ...] = (check_size, parse, classify_message)
MATCH_STEPS: tuple[MatchStep, ...] = (
    skip_duplicates,
    follow_up_by_ticket_number,
    follow_up_by_references,
    refuse_loops,
)


def read(inbound: Inbound, steps: tuple[ReadStep, ...] = READ_STEPS) -> Outcome:
    for step in steps:
        outcome = step(inbound)
        if not isinstance(outcome, Continue):
            return outcome
    return Continue()


def match(known: Known, inbound: Inbound, steps: tuple[MatchStep, ...] = MATCH_STEPS) -> Outcome:
    for step in steps:
        outcome = step(known, inbound)
        if not isinstance(outcome, Continue):
            return outcome
    return NewTicket()


@dataclass
class Decision:
    """What becomes of one message: the outcome, and the article it is written as if it becomes one."""

    inbound: Inbound
    outcome: Outcome
    article: ArticleRef | None = None


def decide_batch(session: Session, inbounds: Sequence[Inbound]) -> list[Decision]:
    """Decide messages in order: read each, look up what all of them need at once, then match each."""
    outcomes = [read(inbound) for inbound in inbounds]
    message_ids: set[str] = set()
    numbers: set[int] = set()
    for inbound, outcome in zip(inbounds, outcomes, strict=True):
        if isinstance(outcome, Continue):
            ids, named = lookup_keys(inbound)
            message_ids.update(ids)
            numbers.update(named)
    maybe_released = [inbound.row_id for inbound in inbounds if _from_own_address(inbound)]
    known = Known.load(session, message_ids, numbers, maybe_released=maybe_released)
    return [_decide(known, inbound, outcome) for inbound, outcome in zip(inbounds, outcomes, strict=True)]


def _decide(known: Known, inbound: Inbound, outcome: Outcome) -> Decision:
    if not isinstance(outcome, Continue):
        return Decision(inbound, outcome)
    outcome = match(known, inbound)
    if isinstance(outcome, NewTicket):
        ticket = TicketRef(None, None, TicketState.NEW, new=True)
    elif isinstance(outcome, AttachTo):
        ticket = outcome.ticket
    else:
        return Decision(inbound, outcome)
    # Remembered at once: the next message of the batch may be a reply to this one, or a copy of it.
    mail = _mail(inbound)
    article = known.remember(inbound.channel.id, mail.message_id, ticket, people=_people(mail))
    return Decision(inbound, outcome, article)


def _people(mail: ParsedMail) -> list[str]:
    """Who took part in a message: its sender and everyone it was sent or copied to."""
    return [address.email for address in (*mail.to, *mail.cc)] + ([mail.sender.email] if mail.sender else [])


def lookup_keys(inbound: Inbound) -> tuple[list[str], tuple[int, ...]]:
    """What ``match`` will ask ``Known`` about this message: message ids and ticket numbers."""
    mail = _mail(inbound)
    message_ids = [mail.message_id] if mail.message_id else []
    numbers = ticket_numbers_in_subject(mail.subject, prefix=inbound.ticket_prefix)
    return message_ids + thread_candidates(inbound), numbers


def _from_own_address(inbound: Inbound) -> bool:
    return inbound.classification is not None and inbound.classification.from_own_address


def _mail(inbound: Inbound) -> ParsedMail:
    if inbound.mail is None:
        raise RuntimeError("the parse step must run first")
    return inbound.mail
