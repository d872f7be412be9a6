"""``postdesk demo``: Postdesk plus a local Microsoft 365 sandbox, with sample data, entirely offline."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

from rich.panel import Panel

from postdesk.cli.common import console
from postdesk.cli.server import run_server
from postdesk.config import Settings
from postdesk.db.models import MicrosoftApp, Role
from postdesk.db.session import transaction
from postdesk.db.types import utcnow
from postdesk.microsoft.connect import current_registration
from postdesk.runtime import Runtime, bootstrap
from postdesk.sandbox import CONTOSO_TENANT_ID, SandboxDirectory, SandboxServer
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.sandbox.submission import SubmissionServer
from postdesk.security.passwords import hash_password
from postdesk.security.redact import configure_logging
from postdesk.tickets.people import create_user, find_user
from postdesk.tickets.samples import seed_sample_tickets

DEMO_ADMIN = "admin@example.com"
# Fixed so that a restarted demo keeps the same app registration.
DEMO_CLIENT_ID = "5a3f0c6e-8d1b-4c2a-9e7f-0b1d2c3e4f50"


def _reset_admin(runtime: Runtime) -> str:
    password = secrets.token_urlsafe(12)
    with transaction(runtime.sessions) as session:
        admin = find_user(session, DEMO_ADMIN)
        if admin is None:
            admin = create_user(
                session, email=DEMO_ADMIN, password=password, display_name="Demo Admin", role=Role.ADMIN
            )
        admin.password_hash = hash_password(password)
        admin.failed_logins = 0
        admin.locked_until = None
        seed_sample_tickets(session, agent=admin)
    return password


def _register_sandbox_app(runtime: Runtime, directory: SandboxDirectory) -> str:
    """Register Postdesk in the sandbox tenant and store it as the Microsoft 365 app, as an admin would."""
    tenant = directory.tenants[CONTOSO_TENANT_ID]
    registered = directory.register_app(
        display_name="Postdesk demo",
        client_id=DEMO_CLIENT_ID,
        home_tenant_id=tenant.tenant_id,
        redirect_uris=[runtime.settings.oauth_redirect_uri],
        sign_in_audience="AzureADMyOrg",
    )
    secret = registered.client_secrets[0].value
    with transaction(runtime.sessions) as session:
        app = current_registration(session) or MicrosoftApp()
        app.client_id = registered.client_id
        app.tenant = tenant.domain
        app.cloud = "global"
        app.account_types = "single"
        app.client_secret = secret
        app.client_secret_expires_at = None
        app.updated_at = utcnow()
        session.add(app)
    return tenant.domain


def _start_mail_server(
    directory: SandboxDirectory, sandbox: SandboxServer, data_dir: Path
) -> DovecotServer | None:
    """The sandbox's stand-in for outlook.office365.com:993, when Dovecot is installed (and we are root)."""
    if not Path("/usr/sbin/dovecot").exists() or os.geteuid() != 0:
        return None
    server = DovecotServer(
        data_dir / "mailserver", sandbox_base_url=sandbox.base_url, sandbox_ca=sandbox.ca_path
    )
    try:
        server.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        console.print(f"[yellow]The sandbox mail server did not start ({exc}); mail will not arrive.[/]")
        return None
    directory.mail_delivery = server.deliver
    return server


def _start_submission_server(
    directory: SandboxDirectory, mail_server: DovecotServer | None, data_dir: Path
) -> SubmissionServer | None:
    """The sandbox's stand-in for smtp.office365.com:587, filing sent mail into the Dovecot mailboxes."""
    if mail_server is None:
        return None
    server = SubmissionServer(directory, data_dir / "submission", dovecot=mail_server)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        console.print(f"[yellow]The sandbox SMTP server did not start ({exc}); replies will not be sent.[/]")
        return None
    return server


def _trusted_cas(data_dir: Path, ca_paths: list[Path]) -> Path:
    bundle = data_dir / "sandbox-cas.pem"
    bundle.write_text("".join(path.read_text() for path in ca_paths))
    return bundle


def run_demo(*, port: int, sandbox_port: int, data_dir: Path) -> None:
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    directory = SandboxDirectory.default()
    sandbox = SandboxServer(directory, state_dir=data_dir / "sandbox", port=sandbox_port)
    sandbox.start()
    mail_server = _start_mail_server(directory, sandbox, data_dir)
    submission = _start_submission_server(directory, mail_server, data_dir)
    try:
        ca_paths = [sandbox.ca_path] + [server.ca_path for server in (mail_server, submission) if server]
        settings = Settings(
            data_dir=data_dir,
            base_url=f"http://127.0.0.1:{port}",
            microsoft_login_url=sandbox.base_url,
            ca_bundle=_trusted_cas(data_dir, ca_paths),
            # Without mail servers nothing listens here, and the channel page says so plainly.
            microsoft_imap=f"127.0.0.1:{mail_server.port if mail_server else 9}",
            microsoft_smtp=f"127.0.0.1:{submission.port if submission else 9}",
        )
        runtime = bootstrap(settings, apply_migrations=True)
        configure_logging(settings.log_level)
        password = _reset_admin(runtime)
        tenant = _register_sandbox_app(runtime, directory)
        mail_line = (
            f"Write a customer's email into a sandbox mailbox at {sandbox.base_url}/_sandbox/mail"
            if mail_server
            else "Incoming mail in the demo needs Dovecot: apt-get install dovecot-imapd, as root."
        )
        if submission is not None:
            mail_line += (
                f"\nReplies go out through the sandbox SMTP server (127.0.0.1:{submission.port}); a copy"
                " lands in the sending mailbox's Sent Items."
            )
        users = ", ".join(
            user.upn for user in directory.users.values() if user.tenant_id == CONTOSO_TENANT_ID
        )
        console.print(
            Panel.fit(
                f"Postdesk demo: [bold]http://127.0.0.1:{port}[/]\n\n"
                f"Sign in as [bold]{DEMO_ADMIN}[/] with password [bold]{password}[/]"
                " (new on every start).\n\n"
                f"A sandbox Microsoft 365 tenant ({tenant}) runs at {sandbox.base_url}.\n"
                "To add a mailbox: Channels › Add account, then pick a sandbox user and accept.\n"
                f"Sandbox users: {users}\n"
                f"{mail_line}\n"
                f"Your browser will warn about the sandbox's own certificate authority ({sandbox.ca_path});\n"
                "accept it for 127.0.0.1, or import that file. Data lives in " + str(data_dir) + ".\n"
                "Stop with Ctrl+C.",
                title="Postdesk demo",
                border_style="green",
            )
        )
        run_server(runtime, host="127.0.0.1", port=port, with_worker=True)
    finally:
        if submission is not None:
            submission.stop()
        if mail_server is not None:
            mail_server.stop()
        sandbox.stop()
