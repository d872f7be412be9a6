"""App-only mailboxes: Postdesk reads and answers a mailbox as the app itself, with nobody signing in.

For unattended production use. The app gets its token through the client credentials flow (with its
certificate, or a client secret) and needs the Microsoft Graph application permissions Mail.ReadWrite
and Mail.Send. Granted in Entra ID they cover every mailbox of the tenant; Exchange Online narrows them
to chosen mailboxes with RBAC for Applications (a management scope on the app's role assignments),
which is what the PowerShell generated here sets up.

Adding a mailbox first opens its Inbox through Graph (``GET /users/{address}/mailFolders/inbox``); a
refusal comes back with what to do: the permission to grant, or the PowerShell with the app's real
ids and the address filled in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from postdesk.db.models import Channel, ChannelEvent, ChannelStatus, Transport
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.ingest.graph_fetch import GraphAccount, open_channel_mailbox
from postdesk.microsoft.connect import current_registration
from postdesk.microsoft.identity import MicrosoftIdentity, NotConfigured
from postdesk.microsoft.tokens import TokenError, app_access_token
from postdesk.runtime import Runtime
from postdesk.transports.errors import TransportError
from postdesk.transports.graph import GraphRefusal

# The Microsoft Graph application permissions a help desk needs, and what fails without each.
REQUIRED_PERMISSIONS: dict[str, str] = {
    "Mail.ReadWrite": "Postdesk cannot read the mailbox or mark its mail as read",
    "Mail.Send": "replies cannot be sent",
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
        held = {role.lower() for role in self.roles}
        return [name for name in REQUIRED_PERMISSIONS if name.lower() not in held]


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str) and value else None


@dataclass(frozen=True)
class AppOnlyOutcome:
    """The answer to "add this mailbox app-only": the channel, or why not and what to run."""

    address: str
    channel_id: int | None = None
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


def add_app_only_mailbox(
    runtime: Runtime, address: str, *, transport: Transport = Transport.GRAPH
) -> AppOnlyOutcome:
    """Check that the app may open ``address`` through Graph and, if so, add it as an app-only channel.

    The PowerShell in a refusal covers every app-only mailbox Postdesk already has plus this one, so
    running it leaves one management scope for them all."""
    try:
        address = checked_address(address)
    except AddressProblem as exc:
        return AppOnlyOutcome(address=address, problem=str(exc))
    if transport is not Transport.GRAPH:
        return AppOnlyOutcome(
            address=address,
            problem="App-only access works through Microsoft Graph only for now (not IMAP and SMTP).",
            fix="Add the mailbox with --transport graph.",
        )
    with runtime.sessions() as session:
        registration = current_registration(session)
        if session.scalar(select(Channel.id).where(Channel.email == address)) is not None:
            return AppOnlyOutcome(address=address, problem=f"{address} is already connected to Postdesk.")
        if registration is None:
            return AppOnlyOutcome(
                address=address,
                problem="No Microsoft 365 app registration is set up yet.",
                fix="Connect the Microsoft 365 app under Channels (or postdesk microsoft365 app set) first.",
            )
        others = list(session.scalars(select(Channel.email).where(Channel.app_only.is_(True))))
        identity = MicrosoftIdentity(runtime.settings, registration)
        session.expunge(registration)
    return _check_and_add(runtime, identity, address, sorted({*others, address}))


def _check_and_add(
    runtime: Runtime, identity: MicrosoftIdentity, address: str, scope: list[str]
) -> AppOnlyOutcome:
    try:
        token = app_access_token(identity)
    except TokenError as exc:
        words = exc.explanation
        return AppOnlyOutcome(
            address=address, problem=f"{words.title}: {words.cause} ({exc.reference})", fix=words.fix
        )
    except NotConfigured as exc:
        return AppOnlyOutcome(address=address, problem=f"The app registration is not complete: {exc}.")
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
    try:
        channel_id = _store(runtime, identity, address, grant)
    except IntegrityError:  # added meanwhile, by another admin or command
        return AppOnlyOutcome(address=address, problem=f"{address} is already connected to Postdesk.")
    return AppOnlyOutcome(
        address=address,
        channel_id=channel_id,
        warnings=_warnings(identity, grant),
        powershell=powershell if grant.missing else "",  # the warnings refer to it
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


def _warnings(identity: MicrosoftIdentity, grant: AppGrant) -> tuple[str, ...]:
    warnings = [
        f"The app's token does not carry the application permission {name}, so {REQUIRED_PERMISSIONS[name]} "
        f"unless Exchange assigns “Application {name}” to the app. {grant_instructions([name])}."
        for name in grant.missing
    ]
    if identity.registration.credential_kind == "secret":
        warnings.append(
            "Postdesk signs in to this mailbox with the app's client secret. For unattended access Microsoft "
            "recommends a certificate: create one under Channels > Microsoft 365 app and switch to it."
        )
    return tuple(warnings)


def _store(runtime: Runtime, identity: MicrosoftIdentity, address: str, grant: AppGrant) -> int:
    now = utcnow()
    with transaction(runtime.sessions) as session:
        channel = Channel(
            email=address,
            display_name=address.split("@", maxsplit=1)[0],
            transport=Transport.GRAPH,
            app_only=True,
            microsoft_app_id=identity.registration.id,
            tenant_id=grant.tenant_id,
            status=ChannelStatus.OK,
            connected_at=now,
        )
        session.add(channel)
        session.flush()
        session.add(
            ChannelEvent(channel_id=channel.id, kind="connected", message=f"{address} added app-only")
        )
        return channel.id
