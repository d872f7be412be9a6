"""Channels › Microsoft 365: the app registration, adding mailboxes, and the OAuth callback."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus, Group, MicrosoftApp, Transport, User
from postdesk.db.types import utcnow
from postdesk.microsoft.audit import describe_app_change, record_credential_change
from postdesk.microsoft.certificates import certificate_der, generate_certificate
from postdesk.microsoft.clouds import CLOUDS
from postdesk.microsoft.connect import (
    DelegationMissing,
    MailboxChoice,
    SignInError,
    begin_admin_consent,
    begin_sign_in,
    claim_flow,
    complete_sign_in,
    current_registration,
    identity_failure,
)
from postdesk.microsoft.errors import IdentityError
from postdesk.microsoft.identity import MicrosoftIdentity
from postdesk.microsoft.registration import (
    ACCOUNT_TYPES,
    REQUIRED_DELEGATED_PERMISSIONS,
    admin_consent_url,
    normalise_tenant,
    parse_account_types,
    validate_app_registration,
)
from postdesk.runtime import Runtime
from postdesk.web.deps import CurrentAdmin, RuntimeDep, SessionDep, WebSessionDep, channel_or_404
from postdesk.web.routes.mailboxes import access_check, choice_problem, delegation_page
from postdesk.web.sessions import SESSION_COOKIE, session_id_for
from postdesk.web.templating import render

log = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

NOTICES = {
    "app-saved": "The app registration was saved. You can now add mailboxes.",
    "certificate": "A new certificate was generated. Download it, upload it to the app registration under "
    "Certificates & secrets › Certificates, then choose “Use the certificate”. "
    "Until then the secret stays in use.",
    "credential-certificate": "Postdesk now signs in with the certificate.",
    "credential-secret": "Postdesk now signs in with the client secret.",
    "connected": "The mailbox is connected.",
    "reauthenticated": "The mailbox was re-authenticated; mail continues with the new sign-in.",
    "enabled": "The mailbox is enabled.",
    "disabled": "The mailbox is disabled; Postdesk no longer reads it or sends from it.",
    "deleted": "The mailbox was removed from Postdesk. Its tickets stay.",
    "consented": "Admin consent was granted for your organisation.",
    "delegation-ok": "The shared mailbox opens with the delegate's sign-in; mail is fetched from now on.",
}


def _web_session_id(request: Request) -> str:
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise HTTPException(status_code=401, detail="Sign in again.")
    return session_id_for(token)


def channels_page(
    request: Request, db: Session, runtime: Runtime, admin: User, *, status_code: int = 200, **extra: Any
) -> Response:
    registration = current_registration(db)
    settings = runtime.settings
    consent_url = None
    if registration is not None:
        consent_url = "/channels/microsoft365/admin-consent"
    context: dict[str, Any] = {
        "section": "channels",
        "user": admin,
        "registration": registration,
        "channels": db.scalars(select(Channel).order_by(Channel.email)).all(),
        "callback_url": settings.oauth_redirect_uri,
        "permissions": REQUIRED_DELEGATED_PERMISSIONS,
        "account_types": ACCOUNT_TYPES,
        "clouds": CLOUDS,
        "default_cloud": settings.microsoft_cloud,
        "consent_url": consent_url,
        "notice": NOTICES.get(request.query_params.get("notice", "")),
        "problems": [],
        "form": None,
        "sign_in_error": None,
    }
    context.update(extra)
    return render(request, "channels/list.html", context, status_code=status_code)


@router.get("/channels")
def channels(request: Request, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    return channels_page(request, db, runtime, admin)


@router.post("/channels/microsoft365/app")
def save_app(
    request: Request,
    db: SessionDep,
    runtime: RuntimeDep,
    admin: CurrentAdmin,
    client_id: Annotated[str, Form()] = "",
    tenant: Annotated[str, Form()] = "",
    client_secret: Annotated[str, Form()] = "",
    secret_expires: Annotated[str, Form()] = "",
    cloud: Annotated[str, Form()] = "global",
    account_types: Annotated[str, Form()] = "single",
) -> Response:
    registration = current_registration(db)
    form = {
        "client_id": client_id.strip(),
        "tenant": tenant,
        "secret_expires": secret_expires,
        "cloud": cloud,
        "account_types": account_types,
    }
    # An empty secret field keeps the stored secret (it is never sent back to the browser).
    keeps_secret = not client_secret and registration is not None and bool(registration.client_secret)
    has_certificate = registration is not None and bool(registration.certificate_private_key)
    kinds = parse_account_types(account_types) or "single"
    problems = validate_app_registration(
        client_id=client_id.strip(),
        tenant=tenant,
        client_secret=client_secret or None,
        has_certificate=has_certificate or keeps_secret,
        cloud=cloud,
        base_url=runtime.settings.base_url,
        account_types=kinds,
    )
    expires_at, date_problem = _parse_date(secret_expires)
    errors = [p for p in problems if p.severity == "error"]
    if errors or date_problem:
        return channels_page(
            request,
            db,
            runtime,
            admin,
            status_code=422,
            problems=problems,
            form=form,
            date_problem=date_problem,
        )
    registration = registration or MicrosoftApp()
    registration.client_id = client_id.strip().lower()
    registration.tenant = normalise_tenant(tenant) or "common"
    registration.cloud = cloud
    registration.account_types = kinds
    if client_secret:
        registration.client_secret = client_secret.strip()
    if client_secret or secret_expires:
        registration.client_secret_expires_at = expires_at
    registration.updated_at = utcnow()
    db.add(registration)
    record_credential_change(
        db, registration, describe_app_change(registration, new_secret=bool(client_secret)), actor=admin
    )
    db.commit()
    warnings = [p for p in problems if p.severity == "warning"]
    if warnings:
        return channels_page(request, db, runtime, admin, problems=warnings, notice=NOTICES["app-saved"])
    return RedirectResponse("/channels?notice=app-saved", status_code=303)


def _parse_date(value: str) -> tuple[datetime | None, str | None]:
    if not value.strip():
        return None, None
    try:
        parsed = datetime.strptime(value.strip(), "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        return None, "Enter the secret's expiry date as shown in the Azure portal, as YYYY-MM-DD."
    return parsed, None


@router.post("/channels/microsoft365/certificate")
def create_certificate(db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    registration = current_registration(db)
    if registration is None:
        raise HTTPException(status_code=409, detail="Save the app registration first.")
    host = runtime.settings.base_url.split("://", 1)[1].split("/")[0]
    generated = generate_certificate(f"Postdesk {host}")
    registration.certificate_pem = generated.certificate_pem
    registration.certificate_private_key = generated.private_key_pem
    registration.certificate_thumbprint = generated.thumbprint
    registration.certificate_expires_at = generated.expires_at
    registration.use_certificate = False
    registration.updated_at = utcnow()
    record_credential_change(
        db,
        registration,
        f"New certificate generated (thumbprint {generated.thumbprint}); not used until it is chosen.",
        actor=admin,
    )
    db.commit()
    return RedirectResponse("/channels?notice=certificate", status_code=303)


@router.post("/channels/microsoft365/credential")
def choose_credential(db: SessionDep, admin: CurrentAdmin, credential: Annotated[str, Form()]) -> Response:
    registration = current_registration(db)
    if registration is None:
        raise HTTPException(status_code=409, detail="Save the app registration first.")
    if credential == "certificate" and not registration.certificate_private_key:
        raise HTTPException(status_code=409, detail="Generate a certificate first.")
    if credential == "secret" and not registration.client_secret:
        raise HTTPException(status_code=409, detail="Enter a client secret first.")
    registration.use_certificate = credential == "certificate"
    registration.updated_at = utcnow()
    record_credential_change(
        db, registration, f"Signing in with the {registration.credential_kind} from now on.", actor=admin
    )
    db.commit()
    return RedirectResponse(f"/channels?notice=credential-{registration.credential_kind}", status_code=303)


@router.get("/channels/microsoft365/certificate.cer")
def download_certificate(db: SessionDep, admin: CurrentAdmin) -> Response:
    registration = current_registration(db)
    if registration is None or not registration.certificate_pem:
        raise HTTPException(status_code=404, detail="No certificate has been generated yet.")
    return Response(
        certificate_der(registration.certificate_pem),
        media_type="application/pkix-cert",
        headers={"Content-Disposition": 'attachment; filename="postdesk.cer"'},
    )


@router.get("/channels/microsoft365/admin-consent")
def admin_consent(request: Request, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    registration = current_registration(db)
    if registration is None:
        raise HTTPException(status_code=409, detail="Save the app registration first.")
    identity = MicrosoftIdentity(runtime.settings, registration)
    state = begin_admin_consent(db, web_session_id=_web_session_id(request))
    db.commit()
    scopes = [*identity.scopes, "offline_access", "openid", "profile", "email"]
    url = admin_consent_url(
        scopes=scopes,
        login_url=identity.endpoints.login_url,
        tenant=registration.tenant,
        client_id=registration.client_id,
        redirect_uri=runtime.settings.oauth_redirect_uri,
        state=state,
    )
    return RedirectResponse(url, status_code=302)


@router.get("/channels/add")
def add_account(
    request: Request,
    db: SessionDep,
    admin: CurrentAdmin,
    mailbox: str = "user",
    shared_address: str = "",
    transport: str = "imap",
) -> Response:
    """ "Add account" asks whose mailbox it is and how Postdesk should reach it; its form goes straight
    to the sign-in (``/auth/microsoft365/start``), which checks the choice and comes back here if it is
    incomplete."""
    if current_registration(db) is None:
        return RedirectResponse("/channels#app", status_code=303)
    form = {"mailbox": mailbox, "shared_address": shared_address.strip(), "transport": transport}
    return add_account_page(request, admin, form=form)


def add_account_page(
    request: Request, admin: User, *, form: dict[str, str], problem: str | None = None, status_code: int = 200
) -> Response:
    return render(
        request,
        "channels/add.html",
        {"section": "channels", "user": admin, "form": form, "problem": problem},
        status_code=status_code,
    )


@router.get("/auth/microsoft365/start")
def start_sign_in(
    request: Request,
    db: SessionDep,
    runtime: RuntimeDep,
    admin: CurrentAdmin,
    channel: int | None = None,
    login_hint: str | None = None,
    mailbox: str = "user",
    shared_address: str = "",
    transport: str = "imap",
) -> Response:
    registration = current_registration(db)
    if registration is None:
        raise HTTPException(
            status_code=409, detail="Connect the Microsoft 365 app first (Channels › Microsoft 365 app)."
        )
    target = db.get(Channel, channel) if channel is not None else None
    if channel is not None and target is None:
        raise HTTPException(status_code=404, detail="That mailbox no longer exists.")
    form = {"mailbox": mailbox, "shared_address": shared_address.strip(), "transport": transport}
    problem = None if target else choice_problem(form)
    if problem is not None:
        return add_account_page(request, admin, form=form, problem=problem, status_code=422)
    choice = MailboxChoice(
        shared_address=form["shared_address"].lower() if mailbox == "shared" else None,
        transport=Transport(transport),
    )
    identity = MicrosoftIdentity(runtime.settings, registration)
    try:
        pending = begin_sign_in(
            db,
            identity,
            web_session_id=_web_session_id(request),
            purpose="reauth" if target else "connect",
            channel=target,
            login_hint=login_hint,
            choice=choice,
        )
    except (ValueError, OSError) as exc:
        return channels_page(
            request,
            db,
            runtime,
            admin,
            status_code=502,
            sign_in_error=SignInError(
                "Microsoft's sign-in service could not be reached",
                f"Postdesk could not read the sign-in configuration for tenant {registration.tenant}: {exc}. "
                "Check the Directory (tenant) ID and that this server can reach the identity platform.",
            ),
        )
    db.commit()
    return RedirectResponse(pending.auth_uri, status_code=302)


@router.get("/auth/microsoft365/callback")
def callback(
    request: Request, db: SessionDep, runtime: RuntimeDep, admin: CurrentAdmin, web_session: WebSessionDep
) -> Response:
    params = dict(request.query_params)
    registration = current_registration(db)
    try:
        if registration is None or web_session is None:
            raise SignInError("No sign-in in progress", "Connect the Microsoft 365 app first.")
        flow_row = claim_flow(db, state=params.get("state"), web_session_id=web_session.id)
        db.commit()  # the flow is spent even if what follows fails: no replay
        if flow_row.purpose == "admin_consent":
            return _admin_consent_result(request, db, runtime, admin, params)
        identity = MicrosoftIdentity(runtime.settings, registration)
        result = complete_sign_in(
            db, identity, flow_row=flow_row, params=params, actor=admin, check_access=access_check(runtime)
        )
    except DelegationMissing as missing:
        # A new shared mailbox is kept (needing attention) so that "Check again" can use the sign-in;
        # a re-authentication that could not open the mailbox changed nothing.
        if flow_row.purpose == "reauth":
            db.rollback()
        else:
            db.commit()
        log.warning("shared mailbox %s: the delegate cannot open it", missing.channel_id)
        return delegation_page(request, admin, missing, reauth=flow_row.purpose == "reauth")
    except SignInError as failure:
        db.rollback()
        # Kept in the log so support can match it with Microsoft's trace and correlation IDs.
        log.warning("mailbox sign-in failed: %s (%s)", failure.title, failure.reference or "no reference")
        return channels_page(request, db, runtime, admin, status_code=400, sign_in_error=failure)
    db.commit()
    notice = "reauthenticated" if result.purpose == "reauth" or not result.created else "connected"
    return RedirectResponse(f"/channels?notice={notice}#channel-{result.channel.id}", status_code=303)


def _admin_consent_result(
    request: Request, db: Session, runtime: Runtime, admin: User, params: dict[str, str]
) -> Response:
    registration = current_registration(db)
    if params.get("error") and registration is not None:
        identity = MicrosoftIdentity(runtime.settings, registration)
        raise identity_failure(IdentityError.from_redirect(params), identity)
    return RedirectResponse("/channels?notice=consented", status_code=303)


@router.post("/channels/{channel_id}/enable")
def enable_channel(channel_id: int, db: SessionDep, admin: CurrentAdmin) -> Response:
    channel = channel_or_404(db, channel_id)
    channel.status = ChannelStatus.OK
    db.add(ChannelEvent(channel_id=channel.id, kind="enabled", actor_id=admin.id, message="Enabled."))
    db.commit()
    return RedirectResponse("/channels?notice=enabled", status_code=303)


@router.post("/channels/{channel_id}/disable")
def disable_channel(channel_id: int, db: SessionDep, admin: CurrentAdmin) -> Response:
    channel = channel_or_404(db, channel_id)
    channel.status = ChannelStatus.DISABLED
    db.add(ChannelEvent(channel_id=channel.id, kind="disabled", actor_id=admin.id, message="Disabled."))
    db.commit()
    return RedirectResponse("/channels?notice=disabled", status_code=303)


@router.post("/channels/{channel_id}/delete")
def delete_channel(
    channel_id: int, db: SessionDep, admin: CurrentAdmin, confirm: Annotated[str, Form()] = ""
) -> Response:
    channel = channel_or_404(db, channel_id)
    if confirm.strip().lower() != channel.email.lower():
        raise HTTPException(
            status_code=422, detail=f"To delete, type the mailbox address {channel.email} to confirm."
        )
    db.delete(channel)
    db.commit()
    return RedirectResponse("/channels?notice=deleted", status_code=303)


@router.get("/channels/{channel_id}")
def channel_detail(request: Request, channel_id: int, db: SessionDep, admin: CurrentAdmin) -> Response:
    channel = channel_or_404(db, channel_id)
    events = db.scalars(
        select(ChannelEvent)
        .where(ChannelEvent.channel_id == channel.id)
        .order_by(ChannelEvent.created_at.desc(), ChannelEvent.id.desc())
        .limit(200)
    ).all()
    groups = db.scalars(select(Group).order_by(Group.name)).all()
    notice = {
        "saved": "Settings saved.",
        "fetching": "Fetching now; reload in a moment for the result.",
        "backlog": "Your choice about the existing mail is saved.",
    }.get(request.query_params.get("notice", ""))
    return render(
        request,
        "channels/detail.html",
        {
            "section": "channels",
            "user": admin,
            "channel": channel,
            "events": events,
            "groups": groups,
            "notice": notice,
        },
    )
