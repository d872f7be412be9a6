"""A mailbox's mail settings, fetching now, the first-connection import, shared mailboxes' delegation
check, and the quarantine."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Annotated, Literal
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from postdesk.db.models import (
    BacklogPolicy,
    Channel,
    ChannelEvent,
    ChannelStatus,
    InboundMessage,
    InboundStatus,
    Transport,
    User,
)
from postdesk.ingest.background import start_fetch
from postdesk.ingest.fetch import access_token_for_channel, default_mailbox
from postdesk.ingest.graph_fetch import GraphAccount, open_channel_mailbox
from postdesk.ingest.quarantine import quarantined, reprocess
from postdesk.microsoft.clouds import endpoints_for
from postdesk.microsoft.connect import AccessCheck, DelegationMissing, verify_delegation
from postdesk.microsoft.identity import HTTP_TIMEOUT, tls_context
from postdesk.microsoft.tokens import TokenError
from postdesk.runtime import Runtime
from postdesk.storage import read_bytes
from postdesk.transports.errors import TransportError
from postdesk.web.deps import CurrentAdmin, RuntimeDep, SessionDep, channel_or_404
from postdesk.web.templating import render

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)
WATCHDOG_MAX_HOURS = 720  # 30 days
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


# -- shared mailboxes: the choice on "Add account", and whether the delegate can open the mailbox


def choice_problem(form: dict[str, str]) -> str | None:
    """What is wrong with the "Add account" answers, in words for the form; None when they are usable."""
    if form["mailbox"] not in ("user", "shared"):
        return "Choose whose mailbox it is: a user's or a shared mailbox."
    if form["transport"] not in {transport.value for transport in Transport}:
        return "Choose how Postdesk reaches the mailbox: IMAP/SMTP or Microsoft Graph."
    if form["mailbox"] == "shared" and not _ADDRESS.match(form["shared_address"]):
        return "Enter the shared mailbox's address, for example support@yourcompany.com."
    return None


def access_check(runtime: Runtime) -> AccessCheck:
    """Opens a mailbox the way fetching will: IMAP (sign in as the mailbox, open its folder) or Graph."""

    def check(transport: Transport, mailbox: str, access_token: str) -> str | None:
        if transport is Transport.GRAPH:
            return _graph_problem(runtime, mailbox, access_token)
        return _imap_problem(runtime, mailbox, access_token)

    return check


def _imap_problem(runtime: Runtime, mailbox: str, access_token: str) -> str | None:
    try:
        with default_mailbox(runtime) as imap:
            imap.login(mailbox, access_token)
            imap.open("INBOX")
    except TransportError as exc:
        return str(exc)
    return None


def _graph_problem(runtime: Runtime, mailbox: str, access_token: str) -> str | None:
    url = f"{endpoints_for(runtime.settings).graph_url}/v1.0/users/{quote(mailbox)}/mailFolders/inbox"
    try:
        with httpx.Client(
            verify=tls_context(runtime.settings), trust_env=False, timeout=HTTP_TIMEOUT
        ) as client:
            response = client.get(url, headers={"Authorization": f"Bearer {access_token}"})
    except httpx.HTTPError as exc:
        return f"Microsoft Graph could not be reached: {exc}"
    if response.status_code == 200:
        return None
    try:
        code = str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = "no error code"
    return f"Microsoft Graph answered HTTP {response.status_code} ({code})"


def delegation_page(
    request: Request, admin: User, missing: DelegationMissing, *, reauth: bool, status_code: int = 409
) -> Response:
    return render(
        request,
        "channels/delegation.html",
        {
            "section": "channels",
            "user": admin,
            "shared": missing.shared,
            "delegate": missing.delegate,
            "problem": missing.problem,
            "commands": missing.commands,
            "channel_id": missing.channel_id,
            "reauth": reauth,
        },
        status_code=status_code,
    )


@router.post("/channels/{channel_id}/check-delegation")
def check_delegation(
    request: Request, channel_id: int, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin
) -> Response:
    """ "Check again" after the admin ran the commands: open the shared mailbox with the stored sign-in."""
    channel = channel_or_404(db, channel_id)
    if not channel.shared:
        raise HTTPException(409, f"{channel.email} is not a shared mailbox: it has no delegation to check.")
    delegate = channel.account_username or ""
    try:
        problem = verify_delegation(
            channel, access_token_for_channel(db, runtime, channel), access_check(runtime)
        )
    except TokenError as exc:
        problem = f"{exc.explanation.title}: {exc.explanation.fix}"
    except TransportError as exc:
        problem = str(exc)
    if problem is not None:
        db.commit()
        missing = DelegationMissing(
            shared=channel.email, delegate=delegate, problem=problem, channel_id=channel.id
        )
        return delegation_page(request, admin, missing, reauth=False)
    channel.status = ChannelStatus.OK
    channel.last_error = None
    channel.last_error_at = None
    db.add(
        _admin_event(channel, admin, "delegation", f"{delegate} opened the shared mailbox {channel.email}.")
    )
    db.commit()
    start_fetch(runtime, channel.id)
    return RedirectResponse(f"/channels?notice=delegation-ok#channel-{channel.id}", status_code=303)


@router.post("/channels/{channel_id}/settings")
def save_settings(
    channel_id: int,
    db: SessionDep,
    admin: CurrentAdmin,
    folder: Annotated[str, Form()] = "INBOX",
    group_id: Annotated[str, Form()] = "",
    after_fetch: Annotated[Literal["keep", "delete", "move"], Form()] = "keep",
    move_to_folder: Annotated[str, Form(max_length=255)] = "",
    max_message_mb: Annotated[int, Form(ge=1, le=150)] = 25,
    fetch_interval_seconds: Annotated[int, Form(ge=10, le=3600)] = 30,
    backlog_policy: Annotated[BacklogPolicy, Form()] = BacklogPolicy.UNREAD,
    backlog_since: Annotated[str, Form()] = "",
    sender_name: Annotated[str | None, Form(max_length=200)] = None,
    watchdog_hours: Annotated[str | None, Form()] = None,
    # FastAPI reads an empty field as absent; this marker says the form had the field, so empty means off.
    watchdog_in_form: Annotated[bool, Form()] = False,
) -> Response:
    channel = channel_or_404(db, channel_id)
    if sender_name is not None:
        channel.sender_name = " ".join(sender_name.split())
    if watchdog_in_form or watchdog_hours is not None:  # older forms lack it: leave it as it is
        channel.watchdog_hours = _watchdog_hours(watchdog_hours or "")
    if folder.strip() and folder.strip() != channel.folder:
        # Another folder is another UID space: start from where it stands now.
        channel.folder = folder.strip()
        channel.imap_uidvalidity = None
        channel.imap_baseline_uid = None
        channel.imap_last_uid = 0
        # On Graph: the folder's id is looked up again from its path, and a new delta round starts.
        channel.graph_folder_id = None
        channel.graph_delta_link = None
        _ask_about_backlog_again(channel)
    channel.group_id = int(group_id) if group_id.isdigit() else None
    channel.delete_after_fetch = after_fetch == "delete"
    # One or the other: the folder field is kept only when moving is chosen.
    channel.move_to_folder = None
    if after_fetch == "move":
        channel.move_to_folder = _move_to_folder(move_to_folder, read_folder=channel.folder)
    channel.max_message_bytes = max_message_mb * 1024 * 1024
    channel.fetch_interval_seconds = fetch_interval_seconds
    since = _date(backlog_since)
    if (backlog_policy, since) != (channel.backlog_policy, channel.backlog_since):
        _ask_about_backlog_again(channel)
    channel.backlog_policy = backlog_policy
    channel.backlog_since = since
    doing = f"move to {channel.move_to_folder}" if channel.move_to_folder else after_fetch
    summary = f"Folder {channel.folder}, after fetching: {doing}, limit {max_message_mb} MB."
    db.add(_admin_event(channel, admin, "settings", summary))
    db.commit()
    return RedirectResponse(f"/channels/{channel_id}?notice=saved", status_code=303)


def _ask_about_backlog_again(channel: Channel) -> None:
    """The existing mail is counted again and the admin asked again what to do with it."""
    channel.backlog_done = False
    channel.backlog_confirmed = False
    channel.backlog_count = None


def _admin_event(channel: Channel, admin: User, kind: str, message: str) -> ChannelEvent:
    """An entry in the channel's event log, naming the admin who acted."""
    return ChannelEvent(channel_id=channel.id, kind=kind, actor_id=admin.id, message=message)


def _move_to_folder(value: str, *, read_folder: str) -> str:
    """The folder to move fetched mail to, checked: given, and not the folder read (moving there would
    bring every message back as new mail). Whether it exists is checked at the next fetch."""
    folder = value.strip().strip("/")
    if not folder:
        raise HTTPException(status_code=422, detail="Enter the folder to move fetched mail to.")
    if folder.lower() == read_folder.strip().strip("/").lower():
        detail = f"Fetched mail cannot be moved to {folder}, the folder it is read from; choose another."
        raise HTTPException(status_code=422, detail=detail)
    return folder


def _watchdog_hours(value: str) -> int | None:
    if not value.strip():
        return None
    if not value.strip().isdigit() or not 1 <= int(value) <= WATCHDOG_MAX_HOURS:
        raise HTTPException(
            status_code=422, detail=f"Enter whole hours from 1 to {WATCHDOG_MAX_HOURS}, or leave it empty."
        )
    return int(value)


def _date(value: str) -> datetime | None:
    try:
        return datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=UTC) if value.strip() else None
    except ValueError as exc:
        raise HTTPException(status_code=422, detail="Enter the date as YYYY-MM-DD.") from exc


@router.post("/channels/{channel_id}/backlog")
def decide_backlog(
    channel_id: int,
    db: SessionDep,
    runtime: RuntimeDep,
    admin: CurrentAdmin,
    decision: Annotated[str, Form()],
) -> Response:
    channel = channel_or_404(db, channel_id)
    if decision == "import":
        channel.backlog_confirmed = True
        message = f"Import of {channel.backlog_count or 0} existing messages confirmed."
    else:
        channel.backlog_done = True
        message = "Existing messages left alone; only new mail is fetched."
    db.add(_admin_event(channel, admin, "backlog", message))
    db.commit()
    if decision == "import":
        start_fetch(runtime, channel_id)
    return RedirectResponse(f"/channels/{channel_id}?notice=backlog", status_code=303)


@router.post("/channels/{channel_id}/fetch")
def fetch_now(channel_id: int, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    channel_or_404(db, channel_id)
    start_fetch(runtime, channel_id)
    return RedirectResponse(f"/channels/{channel_id}?notice=fetching", status_code=303)


@router.get("/channels/{channel_id}/folders")
def folder_choices(
    request: Request, channel_id: int, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin
) -> Response:
    """The folder field as a list of the mailbox's real folders (loaded into the settings form by htmx)."""
    channel = channel_or_404(db, channel_id)
    try:
        token = access_token_for_channel(db, runtime, channel)
        db.commit()
        if channel.transport is Transport.GRAPH:
            with open_channel_mailbox(runtime, GraphAccount.of(channel), token) as graph:
                folders = [choice.path for choice in graph.folders()]
        else:
            with default_mailbox(runtime) as mailbox:
                mailbox.login(channel.email, token)
                folders = mailbox.folders()
        problem = None
    except TransportError as exc:
        folders, problem = [], str(exc)
    except Exception as exc:  # listing folders is a convenience; the field stays editable
        log.warning("listing folders of mailbox %s failed: %s", channel_id, exc)
        folders, problem = [], str(exc)
    return render(
        request, "channels/_folders.html", {"channel": channel, "folders": folders, "problem": problem}
    )


@router.get("/quarantine")
def quarantine_page(request: Request, db: SessionDep, admin: CurrentAdmin) -> Response:
    return render(
        request,
        "quarantine.html",
        {
            "section": "quarantine",
            "user": admin,
            "rows": quarantined(db),
            "notice": request.query_params.get("notice"),
        },
    )


@router.get("/quarantine/{row_id}/raw")
def quarantine_raw(row_id: int, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    row = db.get(InboundMessage, row_id)
    if row is None:
        raise HTTPException(status_code=404, detail="No such message.")
    # Served as a download, never rendered: it is untrusted mail.
    return Response(
        read_bytes(runtime.settings.spool_dir, row.sha256),
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="message-{row.id}.eml"'},
    )


@router.post("/quarantine/{row_id}/reprocess")
def quarantine_reprocess(row_id: int, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    row, _counts = reprocess(runtime, row_id)
    if row is None:
        raise HTTPException(status_code=404, detail="That message is not in quarantine any more.")
    notice = "released" if row.status is not InboundStatus.QUARANTINED else "still"
    return RedirectResponse(f"/quarantine?notice={notice}", status_code=303)
