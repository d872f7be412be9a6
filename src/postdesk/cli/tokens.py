"""``postdesk token …``: personal REST API tokens, for scripts and for people without the web UI."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from postdesk.cli.common import console, errors, fail, print_json, start
from postdesk.db.models import ApiToken
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.security.api_tokens import (
    TokenError,
    TokenScope,
    create_token,
    list_tokens,
    parse_scope,
    revoke_token,
    token_status,
)
from postdesk.tickets.people import find_user

app = typer.Typer(help="Personal REST API tokens.", no_args_is_help=True)


def token_json(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "user": token.user.email,
        "name": token.name,
        "prefix": token.prefix,
        "scope": token.scope,
        "status": token_status(token),
        "created_at": token.created_at,
        "expires_at": token.expires_at,
        "last_used_at": token.last_used_at,
        "revoked_at": token.revoked_at,
    }


@app.command("create")
def create(
    email: Annotated[str, typer.Argument(help="Whose token: the agent's or admin's address.")],
    name: Annotated[str, typer.Option(help="What the token is for, e.g. 'CRM sync'.")],
    scope: Annotated[
        str,
        typer.Option(help="read: GET only, changes nothing; write: whatever that person may do."),
    ] = TokenScope.WRITE.value,
    expires_days: Annotated[
        int | None, typer.Option(min=1, help="Expire after this many days (default: never).")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable).")] = False,
) -> None:
    """Create a token and print it once; it acts with that person's permissions, or only reads."""
    try:
        chosen_scope = parse_scope(scope)
    except TokenError as exc:
        fail(f"--scope: {exc}", code=2)  # a wrong argument, like a usage error
    runtime = start()
    expires_at = utcnow() + timedelta(days=expires_days) if expires_days else None
    try:
        with transaction(runtime.sessions) as session:
            user = find_user(session, email)
            if user is None:
                fail(f"there is no user {email}")
            created = create_token(session, user, name=name, scope=chosen_scope, expires_at=expires_at)
            shown = {**token_json(created.token), "token": created.secret}
    except TokenError as exc:
        fail(str(exc))
    if json_output:
        print_json(shown)
        return
    # Only the token on stdout, so `TOKEN=$(postdesk token create …)` works; the advice goes to stderr.
    sys.stdout.write(shown["token"] + "\n")
    errors.print(
        f"Token {shown['id']} ({shown['scope']}) for {shown['user']}. Copy it now: it cannot be shown again."
    )


@app.command("list")
def list_command(
    user: Annotated[str | None, typer.Option(help="Only this person's tokens.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable).")] = False,
) -> None:
    """List tokens (never their secrets), newest first."""
    runtime = start()
    with runtime.sessions() as session:
        owner = None
        if user is not None:
            owner = find_user(session, user)
            if owner is None:
                fail(f"there is no user {user}")
        rows = [token_json(token) for token in list_tokens(session, user=owner)]
    if json_output:
        print_json(rows)
        return
    table = Table("ID", "User", "Name", "Token", "Scope", "Status", "Created", "Last used", "Expires")
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["user"],
            row["name"],
            f"{row['prefix']}…",
            row["scope"],
            row["status"],
            _day(row["created_at"]),
            _day(row["last_used_at"]) or "never",
            _day(row["expires_at"]) or "never",
        )
    console.print(table if rows else "No API tokens.")


def _day(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


@app.command("revoke")
def revoke(
    token_id: Annotated[int, typer.Argument(help="The token's ID (see `postdesk token list`).")],
) -> None:
    """Revoke a token at once; requests with it are refused from now on."""
    runtime = start()
    with transaction(runtime.sessions) as session:
        token = revoke_token(session, token_id)
        if token is None:
            fail(f"there is no API token with ID {token_id}")
        shown = f"Revoked token {token.id} ({token.name}) of {token.user.email}."
    console.print(shown, highlight=False)
