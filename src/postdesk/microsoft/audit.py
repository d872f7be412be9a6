"""Credential changes of the app registration, written into the event log of every mailbox using it,
and changes of the delegate whose sign-in a shared mailbox uses.

When mail stops on a Monday, "the client secret was replaced on Friday by Dana" is the first thing
an admin needs to read; it belongs in each mailbox's log, never with the secret itself.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, ChannelEvent, MicrosoftApp, User


def record_credential_change(
    session: Session, registration: MicrosoftApp, message: str, *, actor: User | None
) -> None:
    if registration.id is None:
        session.flush()
    channel_ids = session.scalars(select(Channel.id).where(Channel.microsoft_app_id == registration.id))
    for channel_id in channel_ids:
        session.add(
            ChannelEvent(
                channel_id=channel_id,
                kind="credentials",
                message=message,
                actor_id=actor.id if actor else None,
            )
        )


def describe_app_change(registration: MicrosoftApp, *, new_secret: bool) -> str:
    """What was saved, without any secret: IDs, cloud, and whether (and until when) a new secret applies."""
    parts = [f"App registration saved: client ID {registration.client_id}, tenant {registration.tenant}"]
    if new_secret:
        expiry = registration.client_secret_expires_at
        parts.append(f"new client secret{f' (expires {expiry:%Y-%m-%d})' if expiry else ''}")
    return ", ".join(parts) + "."


def record_delegate_change(
    session: Session, channel: Channel, *, previous: str, current: str, actor: User | None
) -> None:
    """A shared mailbox re-authenticated by another delegate: both names go into its event log, so
    that whose sign-in Postdesk now uses (and whose it stopped using) is never a guess."""
    session.add(
        ChannelEvent(
            channel_id=channel.id,
            kind="delegate",
            message=f"The shared mailbox {channel.email} now uses the sign-in of {current} "
            f"instead of {previous}.",
            actor_id=actor.id if actor else None,
        )
    )
