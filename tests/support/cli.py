"""Running the real `postdesk` command against a test's settings, as an operator's shell would."""

from __future__ import annotations

import os
import subprocess
import sys

from postdesk.config import Settings


def environment_for(settings: Settings) -> dict[str, str]:
    """The process environment with exactly these settings as POSTDESK_* variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("POSTDESK_")}
    values = {
        "DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key.get_secret_value() if settings.secret_key else None,
        "BASE_URL": settings.base_url,
        "MICROSOFT_LOGIN_URL": settings.microsoft_login_url,
        "MICROSOFT_IMAP": settings.microsoft_imap,
        "MICROSOFT_SMTP": settings.microsoft_smtp,
        "MICROSOFT_GRAPH_URL": str(settings.microsoft_graph_url) if settings.microsoft_graph_url else None,
        "CA_BUNDLE": str(settings.ca_bundle) if settings.ca_bundle else None,
        "LOG_LEVEL": "WARNING",
    }
    env.update({f"POSTDESK_{name}": value for name, value in values.items() if value})
    return env


def run_postdesk(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postdesk", *args],
        env=environment_for(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start_postdesk(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    """Start the `postdesk` command in the background, its output thrown away, for a test to kill."""
    return subprocess.Popen(
        [sys.executable, "-m", "postdesk", *args],
        env=environment_for(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
