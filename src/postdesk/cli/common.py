"""What every subcommand shares: starting the runtime, printing JSON, failing with a clear message."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError

from postdesk.config import ConfigError, load_settings
from postdesk.runtime import Runtime, bootstrap
from postdesk.security.crypto import SecretError
from postdesk.security.redact import configure_logging

console = Console()
errors = Console(stderr=True, soft_wrap=True)


def fail(message: str, *, code: int = 1) -> NoReturn:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def start(*, apply_migrations: bool = True) -> Runtime:
    """Settings, logging, database (migrated to the latest schema) and the secret key, or a clear error."""
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        return bootstrap(settings, apply_migrations=apply_migrations)
    except (ConfigError, SecretError) as exc:
        fail(str(exc), code=2)
    except OperationalError as exc:
        fail(f"cannot open the database ({exc.orig}); check POSTDESK_DATABASE_URL", code=2)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
