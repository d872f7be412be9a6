"""App-only mailboxes: Postdesk reads and answers a mailbox as the app itself, with nobody signing in.

For unattended production use. The app gets its token through the client credentials flow (with its
certificate, or a client secret), in one of two ways Microsoft documents:

- Microsoft Graph: the application permissions Mail.ReadWrite and Mail.Send. Granted in Entra ID they
  cover every mailbox of the tenant; Exchange Online narrows them to chosen mailboxes with RBAC for
  Applications (a management scope on the app's role assignments), which is what ``rbac_powershell``
  sets up. Adding a mailbox first opens its Inbox through Graph (``GET
  /users/{address}/mailFolders/inbox``).
- IMAP and SMTP: the Office 365 Exchange Online application permissions IMAP.AccessAsApp and
  SMTP.SendAsApp, with admin consent; then Exchange Online must know the app's service principal
  (``New-ServicePrincipal``) and give it FullAccess on each mailbox (``Add-MailboxPermission``), which
  is what ``mailbox_permission_powershell`` writes. The token is for the Outlook resource
  (``https://outlook.office.com/.default``), and IMAP and SMTP sign in with XOAUTH2 as the mailbox's
  address and that token. Adding a mailbox first signs in over IMAP and selects its INBOX.

A refusal comes back with what to do: the permission to grant, or the PowerShell with the app's real
ids and the address filled in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jwt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus, Transport
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.ingest.fetch import default_mailbox
from postdesk.ingest.graph_fetch import GraphAccount, open_channel_mailbox
from postdesk.microsoft.connect import current_registration
from postdesk.microsoft.identity import MicrosoftIdentity, NotConfigured
from postdesk.microsoft.tokens import AccessToken, TokenError, app_access_token
from postdesk.runtime import Runtime
from postdesk.transports.errors import TransportError
from postdesk.transports.graph import GraphRefusal

# The Microsoft Graph application permissions a help desk needs, and what fails without each.
REQUIRED_PERMISSIONS: dict[str, str] = {
    "Mail.ReadWrite": "Postdesk cannot read the mailbox or mark its mail as read",
    "Mail.Send": "replies cannot be sent",
}
# The Office 365 Exchange Online application permissions for IMAP and SMTP without a user.
IMAP_PERMISSIONS: dict[str, str] = {
    "IMAP.AccessAsApp": "Postdesk cannot open the mailbox over IMAP",
    "SMTP.SendAsApp": "replies cannot be sent over SMTP",
}
SCOPE_NAME = "Postdesk mailboxes"
# Addresses go into PowerShell and an OPATH filter: only characters that mean nothing to either (a
# single quote is doubled inside the filter's quoted value).
_ADDRESS = re.compile(r"^[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
OBJECT_ID_PLACEHOLDER = "<object ID from Entra ID > Enterprise applications > Postdesk>"


class AddressProblem(ValueError):
    """Not an address Postdesk puts into a PowerShell line."""


def checked_address(address: str) -> str:
    cleaned = address.strip().lower()
    if not _ADDRESS.match(cleaned):
        raise AddressProblem(f"{address!r} is not a mailbox address such as support@contoso.com")
    return cleaned


def rbac_powershell(client_id: str, mailboxes: Sequence[str], *, object_id: str | None = None) -> str:
    """Exchange Online PowerShell that lets the app (``client_id``) read and send as these mailboxes
    and no others: one management scope covering them all, the two application roles assigned within
    it, and a test per mailbox. ``object_id`` is the app's service principal (enterprise application)
    in the tenant, the ``oid`` of its app-only token."""
    addresses = [checked_address(address) for address in mailboxes]
    if not addresses:
        raise AddressProblem("name at least one mailbox")
    matches = " -or ".join(f"PrimarySmtpAddress -eq '{_opath_quoted(address)}'" for address in addresses)
    lines = [
        "# In Exchange Online PowerShell (Connect-ExchangeOnline), as an Exchange administrator:",
        f"New-ServicePrincipal -AppId {client_id} -ObjectId {object_id or OBJECT_ID_PLACEHOLDER} "
        '-DisplayName "Postdesk"',
        f'New-ManagementScope -Name "{SCOPE_NAME}" -RecipientRestrictionFilter "{matches}"',
        *(
            f'New-ManagementRoleAssignment -App {client_id} -Role "Application {permission}" '
            f'-CustomResourceScope "{SCOPE_NAME}"'
            for permission in REQUIRED_PERMISSIONS
        ),
        *(
            f"Test-ServicePrincipalAuthorization -Identity {client_id} -Resource {address}"
            for address in addresses
        ),
    ]
    return "\n".join(lines)


def _opath_quoted(value: str) -> str:
    return value.replace("'", "''")


def mailbox_permission_powershell(
    client_id: str,
    mailboxes: Sequence[str],
    *,
    object_id: str | None = None,
    admin_consent_url: str | None = None,
) -> str:
    """What lets the app (``client_id``) open these mailboxes over IMAP and send from them over SMTP:
    the Exchange Online application permissions with admin consent (``admin_consent_url``, Microsoft's
    ``/adminconsent`` address for the tenant), then in Exchange Online PowerShell the app's service
    principal and FullAccess for it on each mailbox. ``object_id`` is the service principal (enterprise
    application) in the tenant, the ``oid`` of its app-only token."""
    addresses = [checked_address(address) for address in mailboxes]
    if not addresses:
        raise AddressProblem("name at least one mailbox")
    principal = object_id or OBJECT_ID_PLACEHOLDER
    names = " and ".join(IMAP_PERMISSIONS)
    lines = [
        f"# First, in Entra ID: App registrations > your app > API permissions > Add a permission > APIs my "
        f"organization uses > Office 365 Exchange Online > Application permissions > {names}, then "
        "“Grant admin consent”"
        + (f" (or open {admin_consent_url} as an administrator)." if admin_consent_url else "."),
        "# Then in Exchange Online PowerShell (Connect-ExchangeOnline), as an Exchange administrator:",
        f'New-ServicePrincipal -AppId {client_id} -ObjectId {principal} -DisplayName "Postdesk"',
        *(
            f"Add-MailboxPermission -Identity '{_powershell_quoted(address)}' -User {principal} "
            "-AccessRights FullAccess"
            for address in addresses
        ),
    ]
    return "\n".join(lines)


def _powershell_quoted(value: str) -> str:
    # Inside a single-quoted PowerShell string only the single quote means anything; it is doubled.
    return value.replace("'", "''")


def required_permissions(transport: Transport) -> dict[str, str]:
    """The application permissions an app-only mailbox on ``transport`` needs, and what fails without each."""
    return REQUIRED_PERMISSIONS if transport is Transport.GRAPH else IMAP_PERMISSIONS


@dataclass(frozen=True)
class AppGrant:
    """What the app's token says about it in the tenant. Read without checking the signature, only to
    explain a refusal: Graph, not Postdesk, decides what the token allows."""

    tenant_id: str | None
    object_id: str | None
    roles: frozenset[str]

    @classmethod
    def of(cls, access_token: str) -> AppGrant:
        try:
            claims: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
        except jwt.PyJWTError:
            claims = {}
        roles = claims.get("roles")
        return cls(
            tenant_id=_text(claims.get("tid")),
            object_id=_text(claims.get("oid")),
            roles=frozenset(str(role) for role in roles) if isinstance(roles, list) else frozenset(),
        )

    @property
    def missing(self) -> list[str]:
        return self.missing_for(Transport.GRAPH)

    def missing_for(self, transport: Transport) -> list[str]:
        held = {role.lower() for role in self.roles}
        return [name for name in required_permissions(transport) if name.lower() not in held]


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str) and value else None


@dataclass(frozen=True)
class AppOnlyOutcome:
    """The answer to "add this mailbox app-only": the channel, or why not and what to run."""

    address: str
    channel_id: int | None = None
    transport: str = Transport.GRAPH.value
    problem: str = ""
    fix: str = ""
    powershell: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.channel_id is not None


def grant_instructions(missing: Sequence[str]) -> str:
    names = " and ".join(missing)
    return (
        f"Grant the Microsoft Graph application permission{'s' if len(missing) > 1 else ''} {names}: "
        "Entra ID > App registrations > your app > API permissions > Add a permission > Microsoft Graph > "
        f"Application permissions > {names}, then “Grant admin consent”. Or assign "
        + " and ".join(f'"Application {name}"' for name in missing)
        + " to the app in Exchange Online with RBAC for Applications (the PowerShell below)"
    )


def imap_grant_instructions(missing: Sequence[str]) -> str:
    names = " and ".join(missing)
    return (
        f"Grant the Office 365 Exchange Online application permission{'s' if len(missing) > 1 else ''} "
        f"{names}: Entra ID > App registrations > your app > API permissions > Add a permission > APIs my "
        f"organization uses > Office 365 Exchange Online > Application permissions > {names}, then “Grant "
        "admin consent”"
    )


def add_app_only_mailbox(
    runtime: Runtime, address: str, *, transport: Transport = Transport.GRAPH
) -> AppOnlyOutcome:
    """Check that the app may open ``address`` (through Graph, or over IMAP) and, if so, add it as an
    app-only channel on ``transport``.

    Over Graph the PowerShell in a refusal covers every app-only Graph mailbox Postdesk already has plus
    this one, so running it leaves one management scope for them all. Over IMAP, mailbox permissions are
    per mailbox: it names this one."""
    try:
        address = checked_address(address)
    except AddressProblem as exc:
        return AppOnlyOutcome(address=address, transport=transport.value, problem=str(exc))
    with runtime.sessions() as session:
        registration = current_registration(session)
        if session.scalar(select(Channel.id).where(Channel.email == address)) is not None:
            return AppOnlyOutcome(
                address=address,
                transport=transport.value,
                problem=f"{address} is already connected to Postdesk.",
            )
        if registration is None:
            return AppOnlyOutcome(
                address=address,
                transport=transport.value,
                problem="No Microsoft 365 app registration is set up yet.",
                fix="Connect the Microsoft 365 app under Channels (or postdesk microsoft365 app set) first.",
            )
        others = list(
            session.scalars(
                select(Channel.email).where(Channel.app_only.is_(True), Channel.transport == Transport.GRAPH)
            )
        )
        identity = MicrosoftIdentity(runtime.settings, registration)
        session.expunge(registration)
    if transport is Transport.GRAPH:
        return _check_and_add(runtime, identity, address, sorted({*others, address}))
    return _check_and_add_over_imap(runtime, identity, address)


def _app_token(
    identity: MicrosoftIdentity, address: str, transport: Transport
) -> AccessToken | AppOnlyOutcome:
    """The app's token for ``transport``, or the outcome saying why there is none."""
    try:
        return app_access_token(identity, transport=transport)
    except TokenError as exc:
        words = exc.explanation
        return AppOnlyOutcome(
            address=address,
            transport=transport.value,
            problem=f"{words.title}: {words.cause} ({exc.reference})",
            fix=words.fix,
        )
    except NotConfigured as exc:
        return AppOnlyOutcome(
            address=address,
            transport=transport.value,
            problem=f"The app registration is not complete: {exc}.",
        )


def _check_and_add(
    runtime: Runtime, identity: MicrosoftIdentity, address: str, scope: list[str]
) -> AppOnlyOutcome:
    token = _app_token(identity, address, Transport.GRAPH)
    if isinstance(token, AppOnlyOutcome):
        return token
    grant = AppGrant.of(token.value)
    client_id = identity.registration.client_id
    powershell = rbac_powershell(client_id, scope, object_id=grant.object_id)
    try:
        with open_channel_mailbox(runtime, GraphAccount(address, None, False, True), token.value) as mailbox:
            mailbox.folder_id("inbox")
    except GraphRefusal as exc:
        return _refused(address, exc, grant, powershell)
    except TransportError as exc:
        return AppOnlyOutcome(address=address, problem=str(exc))
    return _added(runtime, identity, address, grant, Transport.GRAPH, powershell)


def _check_and_add_over_imap(runtime: Runtime, identity: MicrosoftIdentity, address: str) -> AppOnlyOutcome:
    """Sign in to the mailbox over IMAP as the app (XOAUTH2, ``user=`` the mailbox) and select its INBOX,
    as every fetch will; add it only if that works."""
    token = _app_token(identity, address, Transport.IMAP)
    if isinstance(token, AppOnlyOutcome):
        return token
    grant = AppGrant.of(token.value)
    powershell = mailbox_permission_powershell(
        identity.registration.client_id,
        [address],
        object_id=grant.object_id,
        admin_consent_url=_admin_consent_url(identity, grant),
    )
    try:
        with default_mailbox(runtime) as mailbox:
            mailbox.login(address, token.value)
            mailbox.open("INBOX")
    except TransportError as exc:
        return _refused_over_imap(address, exc, grant, powershell)
    return _added(runtime, identity, address, grant, Transport.IMAP, powershell)


def _admin_consent_url(identity: MicrosoftIdentity, grant: AppGrant) -> str:
    # Microsoft's admin consent endpoint grants the permissions configured on the app registration.
    tenant = grant.tenant_id or identity.registration.tenant
    return f"{identity.endpoints.login_url}/{tenant}/adminconsent?client_id={identity.registration.client_id}"


def _added(
    runtime: Runtime,
    identity: MicrosoftIdentity,
    address: str,
    grant: AppGrant,
    transport: Transport,
    powershell: str,
) -> AppOnlyOutcome:
    try:
        channel_id = _store(runtime, identity, address, grant, transport)
    except IntegrityError:  # added meanwhile, by another admin or command
        problem = f"{address} is already connected to Postdesk."
        return AppOnlyOutcome(address=address, transport=transport.value, problem=problem)
    return AppOnlyOutcome(
        address=address,
        channel_id=channel_id,
        transport=transport.value,
        warnings=_warnings(identity, grant, transport),
        powershell=powershell if grant.missing_for(transport) else "",  # the warnings refer to it
    )


def _refused(address: str, exc: GraphRefusal, grant: AppGrant, powershell: str) -> AppOnlyOutcome:
    missing = grant.missing
    if exc.status == 401:
        fix = grant_instructions(missing or list(REQUIRED_PERMISSIONS))
        return AppOnlyOutcome(address=address, problem=str(exc), fix=fix, powershell=powershell)
    if exc.status == 403:
        fix = (
            f"Exchange Online does not let the app open {address}. Run the PowerShell below, which puts "
            "this mailbox into the app's management scope, then add it again (new role assignments can "
            "take up to an hour to apply)."
        )
        if missing:
            fix = f"{grant_instructions(missing)}. {fix}"
        return AppOnlyOutcome(address=address, problem=str(exc), fix=fix, powershell=powershell)
    return AppOnlyOutcome(address=address, problem=str(exc))


def _refused_over_imap(address: str, exc: TransportError, grant: AppGrant, powershell: str) -> AppOnlyOutcome:
    outcome = AppOnlyOutcome(address=address, transport=Transport.IMAP.value, problem=str(exc))
    if not exc.needs_reauth:  # the server could not be reached, or it opened the mailbox but not INBOX
        return outcome
    # Exchange answers a missing permission and a missing mailbox permission alike: AUTHENTICATE failed.
    fix = (
        f"Exchange Online did not let the app sign in to {address} over IMAP. Run the PowerShell below, "
        "which registers the app's service principal in Exchange Online and gives it FullAccess on this "
        "mailbox, then add it again (new permissions can take up to an hour to apply). Also check that "
        f"IMAP is on for the mailbox (Set-CASMailbox -Identity {address} -ImapEnabled $true)."
    )
    missing = grant.missing_for(Transport.IMAP)
    if missing:
        fix = f"{imap_grant_instructions(missing)}. {fix}"
    return replace(outcome, fix=fix, powershell=powershell)


def _warnings(identity: MicrosoftIdentity, grant: AppGrant, transport: Transport) -> tuple[str, ...]:
    needed = required_permissions(transport)
    if transport is Transport.GRAPH:
        warnings = [
            f"The app's token does not carry the application permission {name}, so {needed[name]} unless "
            f"Exchange assigns “Application {name}” to the app. {grant_instructions([name])}."
            for name in grant.missing_for(transport)
        ]
    else:
        warnings = [
            f"The app's token does not carry the application permission {name}, so {needed[name]}. "
            f"{imap_grant_instructions([name])}."
            for name in grant.missing_for(transport)
        ]
    if identity.registration.credential_kind == "secret":
        warnings.append(
            "Postdesk signs in to this mailbox with the app's client secret. For unattended access Microsoft "
            "recommends a certificate: create one under Channels > Microsoft 365 app and switch to it."
        )
    return tuple(warnings)


def _store(
    runtime: Runtime, identity: MicrosoftIdentity, address: str, grant: AppGrant, transport: Transport
) -> int:
    now = utcnow()
    with transaction(runtime.sessions) as session:
        channel = Channel(
            email=address,
            display_name=address.split("@", maxsplit=1)[0],
            transport=transport,
            app_only=True,
            microsoft_app_id=identity.registration.id,
            tenant_id=grant.tenant_id,
            status=ChannelStatus.OK,
            connected_at=now,
        )
        session.add(channel)
        session.flush()
        over = "Graph" if transport is Transport.GRAPH else "IMAP and SMTP"
        session.add(
            ChannelEvent(
                channel_id=channel.id, kind="connected", message=f"{address} added app-only ({over})"
            )
        )
        return channel.id
