"""``postdesk user …``"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from postdesk.cli.common import console, fail, start
from postdesk.db.models import Role
from postdesk.db.session import transaction
from postdesk.tickets.people import PeopleError, create_user

app = typer.Typer(help="Agents and admins.", no_args_is_help=True)


def _read_password(password_file: Path | None) -> str:
    if password_file is not None:
        try:
            return password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            fail(f"cannot read {password_file}: {exc.strerror}")
    if not sys.stdin.isatty():
        fail("no terminal to ask for the password; pass --password-file FILE")
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@app.command("create")
def create(
    email: Annotated[str, typer.Argument(help="The user's email address; also their sign-in name.")],
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an administrator.")] = False,
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password from this file instead of asking.")
    ] = None,
    name: Annotated[str, typer.Option(help="Display name (default: the part before @).")] = "",
) -> None:
    """Create an agent (or, with --admin, an administrator) who signs in with a password."""
    runtime = start()
    password = _read_password(password_file)
    try:
        with transaction(runtime.sessions) as session:
            user = create_user(
                session,
                email=email,
                password=password,
                display_name=name,
                role=Role.ADMIN if admin else Role.AGENT,
            )
            created = f"Created {user.role.value} {user.email}."
    except PeopleError as exc:
        fail(str(exc))
    console.print(created)
