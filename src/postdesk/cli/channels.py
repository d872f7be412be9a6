"""``postdesk microsoft365 app …`` and ``postdesk channel …``"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy import select

from postdesk.cli.common import console, errors, fail, print_json, start
from postdesk.db.models import Channel, MicrosoftApp, Transport
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.microsoft.app_only import (
    AddressProblem,
    AppGrant,
    AppOnlyOutcome,
    add_app_only_mailbox,
    rbac_powershell,
)
from postdesk.microsoft.audit import describe_app_change, record_credential_change
from postdesk.microsoft.certificates import generate_certificate, load_certificate_and_key
from postdesk.microsoft.connect import current_registration
from postdesk.microsoft.identity import MicrosoftIdentity, NotConfigured
from postdesk.microsoft.registration import normalise_tenant, parse_account_types, validate_app_registration
from postdesk.microsoft.tokens import TokenError, app_access_token

microsoft365_app = typer.Typer(help="The Microsoft Entra ID app registration.", no_args_is_help=True)
app_commands = typer.Typer(help="Set or show the app registration.", no_args_is_help=True)
microsoft365_app.add_typer(app_commands, name="app")
app = typer.Typer(help="Connected mailboxes.", no_args_is_help=True)


def _read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


@app_commands.command("set")
def app_set(
    client_id: Annotated[str, typer.Option(help="Application (client) ID from the app's Overview page.")],
    tenant: Annotated[
        str, typer.Option(help="Directory (tenant) ID or domain; 'organizations'/'common' for multitenant.")
    ],
    client_secret_file: Annotated[
        Path | None, typer.Option(help="File holding the client secret Value.")
    ] = None,
    certificate: Annotated[
        str | None,
        typer.Option(help="'generate' for a new key pair, or a PEM file with certificate and private key."),
    ] = None,
    secret_expires: Annotated[str | None, typer.Option(help="The secret's expiry date (YYYY-MM-DD).")] = None,
    cloud: Annotated[
        str | None, typer.Option(help="global, usgov or china (default: unchanged, else global).")
    ] = None,
    account_types: Annotated[
        str | None, typer.Option(help="single, multi or multi_personal (default: unchanged, else single).")
    ] = None,
) -> None:
    """Store the app registration Postdesk signs in with (secret or certificate encrypted at rest)."""
    if (client_secret_file is None) == (certificate is None):
        fail("give exactly one of --client-secret-file FILE or --certificate (generate | FILE.pem)")
    runtime = start()
    with runtime.sessions() as session:
        existing = current_registration(session)
        cloud = cloud or (existing.cloud if existing else runtime.settings.microsoft_cloud)
        account_types = account_types or (existing.account_types if existing else "single")
    kinds = parse_account_types(account_types)
    if kinds is None:
        fail("--account-types must be single, multi or multi_personal")
    secret = _read_secret(client_secret_file) if client_secret_file else None
    problems = validate_app_registration(
        client_id=client_id,
        tenant=tenant,
        client_secret=secret,
        has_certificate=certificate is not None,
        cloud=cloud,
        base_url=runtime.settings.base_url,
        account_types=kinds,
    )
    for problem in problems:
        (fail if problem.severity == "error" else _warn)(f"{problem.field}: {problem.message}")
    expires = _date(secret_expires)
    with transaction(runtime.sessions) as session:
        registration = current_registration(session) or MicrosoftApp()
        registration.client_id = client_id.strip().lower()
        registration.tenant = normalise_tenant(tenant)
        registration.cloud = cloud
        registration.account_types = kinds
        registration.updated_at = utcnow()
        if secret is not None:
            registration.client_secret = secret
            registration.client_secret_expires_at = expires
        if certificate is not None:
            # On the command line the certificate is named deliberately, so it is used at once.
            _apply_certificate(registration, certificate, runtime.settings.data_dir)
            registration.use_certificate = True
        session.add(registration)
        message = describe_app_change(registration, new_secret=secret is not None)
        if certificate is not None:
            message += f" Signing in with the certificate {registration.certificate_thumbprint}."
        record_credential_change(session, registration, f"{message} (command line)", actor=None)
    console.print(f"Saved. Register this Web redirect URI in Entra ID: {runtime.settings.oauth_redirect_uri}")


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False)


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        fail(f"--secret-expires: expected YYYY-MM-DD, got {value!r}")


def _apply_certificate(registration: MicrosoftApp, certificate: str, data_dir: Path) -> None:
    if certificate == "generate":
        generated = generate_certificate("Postdesk")
        public = data_dir / "postdesk-app.cer.pem"
        public.write_text(generated.certificate_pem, encoding="ascii")
        console.print(
            f"Upload {public} under Certificates & secrets › Certificates "
            f"(thumbprint {generated.thumbprint})."
        )
    else:
        try:
            generated = load_certificate_and_key(Path(certificate).read_text(encoding="ascii"))
        except (OSError, ValueError) as exc:
            fail(f"--certificate {certificate}: {exc}")
    registration.certificate_pem = generated.certificate_pem
    registration.certificate_private_key = generated.private_key_pem
    registration.certificate_thumbprint = generated.thumbprint
    registration.certificate_expires_at = generated.expires_at


def registration_json(registration: MicrosoftApp, redirect_uri: str) -> dict[str, Any]:
    return {
        "client_id": registration.client_id,
        "tenant": registration.tenant,
        "cloud": registration.cloud,
        "account_types": registration.account_types,
        "credential": registration.credential_kind,
        "client_secret_expires_at": registration.client_secret_expires_at,
        "certificate_thumbprint": registration.certificate_thumbprint,
        "certificate_expires_at": registration.certificate_expires_at,
        "redirect_uri": redirect_uri,
    }


@app_commands.command("show")
def app_show(json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the app registration (never the secret)."""
    runtime = start()
    with runtime.sessions() as session:
        registration = current_registration(session)
        if registration is None:
            fail("no app registration yet; run: postdesk microsoft365 app set --help")
        shown = registration_json(registration, runtime.settings.oauth_redirect_uri)
    if json_output:
        print_json(shown)
        return
    for key, value in shown.items():
        console.print(f"{key.replace('_', ' ')}: {value if value is not None else '—'}", highlight=False)


def channel_json(channel: Channel) -> dict[str, Any]:
    return {
        "id": channel.id,
        "email": channel.email,
        "display_name": channel.display_name,
        "transport": channel.transport.value,
        "shared": channel.shared,
        "app_only": channel.app_only,
        "status": channel.status.value,
        "signed_in_as": channel.account_username,
        "tenant_id": channel.tenant_id,
        "connected_at": channel.connected_at,
        "last_fetch_at": channel.last_fetch_at,
        "last_error": channel.last_error,
    }


@app.command("list")
def channel_list(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable).")] = False,
) -> None:
    """List connected mailboxes with their status."""
    runtime = start()
    with runtime.sessions() as session:
        rows = [channel_json(channel) for channel in session.scalars(select(Channel).order_by(Channel.id))]
    if json_output:
        print_json(rows)
        return
    table = Table("ID", "Mailbox", "Transport", "Status", "Last fetch", "Last error")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["email"],
            row["transport"],
            row["status"],
            str(row["last_fetch_at"] or "never"),
            row["last_error"] or "",
        )
    console.print(table if rows else "No mailboxes connected.")


@app.command("add-app-only")
def channel_add_app_only(
    address: Annotated[str, typer.Argument(help="The mailbox, e.g. support@contoso.com.")],
    transport: Annotated[
        str,
        typer.Option(
            help="graph (application permissions Mail.ReadWrite, Mail.Send) or imap (IMAP and SMTP with "
            "IMAP.AccessAsApp, SMTP.SendAsApp and FullAccess on the mailbox)."
        ),
    ] = "graph",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Add a mailbox that Postdesk opens as the app itself (no sign-in), after checking access: over
    Graph it opens the Inbox, over IMAP it signs in as the mailbox and selects INBOX. A refusal prints
    what to grant and the Exchange Online PowerShell that does it."""
    if transport not in {choice.value for choice in Transport}:
        fail("--transport must be graph or imap")
    runtime = start()
    outcome = add_app_only_mailbox(runtime, address, transport=Transport(transport))
    if json_output:
        print_json(dataclasses.asdict(outcome) | {"ok": outcome.ok})
    else:
        _print_app_only_outcome(outcome)
    if not outcome.ok:
        raise typer.Exit(1)


def _print_app_only_outcome(outcome: AppOnlyOutcome) -> None:
    if outcome.ok:
        over = "through Graph" if outcome.transport == Transport.GRAPH.value else "over IMAP and SMTP"
        console.print(f"Added {outcome.address} (channel {outcome.channel_id}), app-only {over}.")
    else:
        # Server replies carry brackets ("[AUTHENTICATIONFAILED]") that must not be read as Rich markup.
        errors.print(f"[bold red]error:[/] {escape(outcome.problem)}", highlight=False)
        if outcome.fix:
            errors.print(f"How to fix it: {escape(outcome.fix)}", highlight=False)
    for warning in outcome.warnings:
        _warn(warning)
    if outcome.powershell:
        # Plain stdout, so the lines can be piped or copied as they are.
        print(outcome.powershell)


@app.command("app-only-powershell")
def channel_app_only_powershell(
    addresses: Annotated[list[str], typer.Argument(help="The mailboxes the app may open, and only these.")],
    object_id: Annotated[
        str | None,
        typer.Option(help="The enterprise application's object ID (default: asked from Microsoft)."),
    ] = None,
) -> None:
    """Print the Exchange Online PowerShell that limits the app to these mailboxes (RBAC for Applications)."""
    runtime = start()
    with runtime.sessions() as session:
        registration = current_registration(session)
        if registration is None:
            fail("no app registration yet; run: postdesk microsoft365 app set --help")
        identity = MicrosoftIdentity(runtime.settings, registration)
        if object_id is None:
            object_id = _service_principal_id(identity)
        try:
            print(rbac_powershell(registration.client_id, addresses, object_id=object_id))
        except AddressProblem as exc:
            fail(str(exc))


def _service_principal_id(identity: MicrosoftIdentity) -> str | None:
    """The app's service principal in the tenant, from its app-only token (``oid``), if it gets one."""
    try:
        return AppGrant.of(app_access_token(identity).value).object_id
    except (TokenError, NotConfigured) as exc:
        _warn(f"the enterprise application's object ID is unknown ({exc}); fill it in by hand")
        return None
