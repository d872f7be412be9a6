"""The REST API on a real database (SQLite and PostgreSQL), called as a script would, with tokens."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from postdesk.db.models import Channel, Direction, InboundMessage, InboundStatus, Role, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.security.api_tokens import create_token
from postdesk.storage import store_bytes
from postdesk.tickets.people import create_user, get_or_create_group
from postdesk.tickets.service import NewArticle, create_ticket, get_or_create_customer
from postdesk.web.app import create_app


@pytest.fixture
def api_client(db_runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(db_runtime), base_url="http://127.0.0.1:8025") as test_client:
        yield test_client


def person(
    runtime: Runtime,
    email: str,
    *,
    role: Role = Role.AGENT,
    groups: tuple[str, ...] = (),
    password: str | None = None,
) -> User:
    with transaction(runtime.sessions) as session:
        user = create_user(session, email=email, password=password, role=role)
        user.groups.extend(get_or_create_group(session, name) for name in groups)
        return user


def token_for(
    runtime: Runtime, user: User, *, name: str = "script", expires_at: datetime | None = None
) -> str:
    with transaction(runtime.sessions) as session:
        owner = session.get(User, user.id)
        assert owner is not None
        return create_token(session, owner, name=name, expires_at=expires_at).secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def admin_token(db_runtime: Runtime) -> str:
    return token_for(db_runtime, person(db_runtime, "boss@example.com", role=Role.ADMIN))


@pytest.fixture
def admin_headers(admin_token: str) -> dict[str, str]:
    return bearer(admin_token)


def make_ticket(
    runtime: Runtime,
    title: str,
    *,
    group: str | None = None,
    customer: str = "jana.novak@example.org",
    body_html: str | None = None,
    channel_id: int | None = None,
) -> int:
    with transaction(runtime.sessions) as session:
        channel = session.get(Channel, channel_id) if channel_id is not None else None
        ticket = create_ticket(
            session,
            title=title,
            customer=get_or_create_customer(session, customer),
            group=get_or_create_group(session, group) if group else None,
            channel=channel,
            first_article=NewArticle(
                direction=Direction.INBOUND,
                body_text=f"Body of {title}",
                body_html=body_html,
                sender=customer,
                subject=title,
                to_addresses=channel.email if channel else "",
                message_id=f"<{title.replace(' ', '-')}@mail.example.org>",
                channel=channel,
            ),
        )
        return ticket.number


def make_channel(runtime: Runtime, email: str = "support@example.com") -> int:
    with transaction(runtime.sessions) as session:
        channel = Channel(email=email, display_name="Support")
        session.add(channel)
        session.flush()
        return channel.id


def quarantine(runtime: Runtime, channel_id: int, raw: bytes, *, reason: str, uid: int = 1) -> int:
    """A message as the pipeline leaves one it refused: raw bytes in the spool, the row quarantined."""
    with transaction(runtime.sessions) as session:
        row = InboundMessage(
            channel_id=channel_id,
            folder="INBOX",
            uidvalidity=1,
            uid=uid,
            sha256=store_bytes(runtime.settings.spool_dir, raw),
            size=len(raw),
            status=InboundStatus.QUARANTINED,
            reason=reason,
            subject="Scanned contract",
            sender="Jana Novák <jana.novak@example.org>",
            message_id="<contract@mail.example.org>",
        )
        session.add(row)
        session.flush()
        return row.id
