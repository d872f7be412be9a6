"""Entry point: ``postdesk serve|worker|db|user|token|ticket|microsoft365|channel|demo``."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from postdesk.cli import alerts, channels, mail, outbox, tickets, tokens, users
from postdesk.cli.common import console, errors, start
from postdesk.cli.demo import run_demo
from postdesk.cli.doctor import doctor_command
from postdesk.cli.server import run_server
from postdesk.db import migrate
from postdesk.runtime import settle_heap
from postdesk.security.crypto import SecretError
from postdesk.worker.jobs import default_jobs
from postdesk.worker.scheduler import Scheduler

app = typer.Typer(
    help="Postdesk: a self-hosted help desk for Microsoft 365 mailboxes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold tokens
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users.app, name="user")
app.add_typer(tickets.app, name="ticket")
app.add_typer(channels.microsoft365_app, name="microsoft365")
app.add_typer(channels.app, name="channel")
app.add_typer(mail.quarantine_app, name="quarantine")
app.add_typer(tokens.app, name="token")
app.add_typer(outbox.app, name="outbox")
app.add_typer(alerts.app, name="alerts")
channels.app.command("fetch")(mail.fetch_command)
app.command("doctor")(doctor_command)
tickets.app.command("reply")(outbox.reply_command)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8025,
    worker: Annotated[
        bool, typer.Option("--worker/--no-worker", help="Also run the background worker.")
    ] = True,
) -> None:
    """Run the web UI and API (and, unless --no-worker, the background worker). Applies migrations first."""
    runtime = start()
    console.print(f"Postdesk on http://{host}:{port} (public URL {runtime.settings.base_url})")
    run_server(runtime, host=host, port=port, with_worker=worker)


@app.command("worker")
def worker_command() -> None:
    """Run only the background worker (fetching mail, sending replies, housekeeping) until SIGTERM.

    With PostgreSQL, run as many as you like, on any hosts: they share the mailboxes (docs/deployment.md).
    """
    runtime = start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    scheduler = Scheduler(runtime, default_jobs())
    settle_heap()
    scheduler.run_until(stop)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all pending migrations (safe to run repeatedly)."""
    runtime = start(apply_migrations=False)
    before = migrate.current_revision(runtime.engine)
    migrate.upgrade(runtime.engine)
    after = migrate.current_revision(runtime.engine)
    console.print(
        "Database already up to date." if before == after else f"Database upgraded: {before} → {after}."
    )


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port for the web UI.")] = 8025,
    sandbox_port: Annotated[
        int, typer.Option(help="Port for the sandbox Microsoft identity platform.")
    ] = 8026,
    data_dir: Annotated[Path, typer.Option(help="Where the demo keeps its data.")] = Path("postdesk-demo"),
) -> None:
    """Run Postdesk with sample tickets and a local Microsoft 365 sandbox, entirely offline."""
    run_demo(port=port, sandbox_port=sandbox_port, data_dir=data_dir)


def main() -> None:
    try:
        app()
    except SecretError as exc:
        errors.print(
            f"[bold red]error:[/] {exc}. See docs/runbook.md, “Recover from a lost secret key”.",
            highlight=False,
        )
        sys.exit(2)
