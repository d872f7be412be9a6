"""``/api/v1/channels`` (admins): the connected mailboxes and how each is doing."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import func, select

from postdesk.db.models import Channel
from postdesk.web.api.deps import ApiAdmin, PageParams, error_responses
from postdesk.web.api.schemas import ChannelOut, ChannelPageOut, ChannelStatusOut
from postdesk.web.deps import SessionDep

router = APIRouter(prefix="/channels", tags=["channels"], responses=error_responses(401, 403))


def _channel_fields(channel: Channel) -> dict[str, object]:
    # The fields and names of `postdesk channel list --json`.
    return {
        "id": channel.id,
        "email": channel.email,
        "display_name": channel.display_name,
        "transport": channel.transport,
        "status": channel.status,
        "signed_in_as": channel.account_username,
        "tenant_id": channel.tenant_id,
        "connected_at": channel.connected_at,
        "last_fetch_at": channel.last_fetch_at,
        "last_error": channel.last_error,
    }


@router.get("", summary="List mailboxes")
def list_endpoint(db: SessionDep, admin: ApiAdmin, paging: PageParams) -> ChannelPageOut:
    total = db.scalar(select(func.count()).select_from(Channel)) or 0
    channels = db.scalars(select(Channel).order_by(Channel.id).limit(paging.per_page).offset(paging.offset))
    return ChannelPageOut(
        items=[ChannelOut.model_validate(_channel_fields(channel)) for channel in channels],
        total=total,
        page=paging.page,
        per_page=paging.per_page,
        pages=paging.pages(total),
    )


@router.get("/{channel_id}", summary="A mailbox's status", responses=error_responses(404))
def status_endpoint(channel_id: int, db: SessionDep, admin: ApiAdmin) -> ChannelStatusOut:
    channel = db.get(Channel, channel_id)
    if channel is None:
        raise HTTPException(status_code=404, detail=f"There is no mailbox with ID {channel_id}.")
    return ChannelStatusOut.model_validate(
        {
            **_channel_fields(channel),
            "folder": channel.folder,
            "group": channel.group.name if channel.group else None,
            "last_fetch_summary": channel.last_fetch_summary,
            "last_mail_at": channel.last_mail_at,
            "last_error_at": channel.last_error_at,
            "token_refreshed_at": channel.token_refreshed_at,
        }
    )
