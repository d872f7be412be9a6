"""The ``postdesk`` command as an operator (or a script) runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_SECRET_KEY


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POSTDESK_")}
    clean.update({"POSTDESK_DATA_DIR": str(tmp_path / "data"), "POSTDESK_SECRET_KEY": TEST_SECRET_KEY})
    return clean


def postdesk(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postdesk", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_db_upgrade_creates_the_schema_and_is_repeatable(env: dict[str, str]) -> None:
    first = postdesk(env, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert "Database upgraded" in first.stdout
    second = postdesk(env, "db", "upgrade")
    assert "already up to date" in second.stdout


def test_user_create_reads_the_password_file_and_refuses_duplicates(
    env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "pw").write_text("a-long-enough-password\n")
    created = postdesk(
        env, "user", "create", "Boss@Example.COM", "--admin", "--password-file", str(tmp_path / "pw")
    )
    assert created.returncode == 0, created.stderr
    assert "Created admin Boss@example.com." in created.stdout
    again = postdesk(env, "user", "create", "boss@example.com", "--password-file", str(tmp_path / "pw"))
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_user_create_without_a_terminal_asks_for_a_password_file(env: dict[str, str]) -> None:
    result = postdesk(env, "user", "create", "x@example.com")
    assert result.returncode == 1
    assert "--password-file" in result.stderr


def test_ticket_list_json_has_the_documented_fields(env: dict[str, str]) -> None:
    from postdesk.config import Settings
    from postdesk.db.session import transaction
    from postdesk.runtime import bootstrap
    from postdesk.tickets.people import create_user
    from postdesk.tickets.samples import seed_sample_tickets

    runtime = bootstrap(
        Settings(data_dir=Path(env["POSTDESK_DATA_DIR"]), secret_key=TEST_SECRET_KEY), apply_migrations=True
    )
    with transaction(runtime.sessions) as session:
        seed_sample_tickets(session, agent=create_user(session, email="a@example.com", password=None))
    result = postdesk(env, "ticket", "list", "--json")
    assert result.returncode == 0, result.stderr
    tickets = json.loads(result.stdout)
    assert len(tickets) == 5
    assert {"id", "number", "title", "customer", "state", "articles"} <= set(tickets[0])
    by_title = {t["title"]: t for t in tickets}
    assert by_title["Invoice 2026-1183 charged twice"]["customer"] == "jana.novak@example.org"
    assert by_title["Invoice 2026-1183 charged twice"]["articles"] == 1
    assert by_title["Cannot sign in after password reset"]["state"] == "open"


def test_channel_list_json_is_an_empty_list_before_any_mailbox(env: dict[str, str]) -> None:
    result = postdesk(env, "channel", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_a_bad_setting_stops_every_command_with_exit_code_2(env: dict[str, str]) -> None:
    result = postdesk({**env, "POSTDESK_MICROSOFT_CLOUD": "mars"}, "ticket", "list")
    assert result.returncode == 2
    assert "POSTDESK_MICROSOFT_CLOUD" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["worker"],
        ["user", "create"],
        ["ticket", "list"],
        ["microsoft365", "app", "set"],
        ["channel", "list"],
        ["demo"],
    ],
)
def test_every_command_explains_itself_with_help(env: dict[str, str], command: list[str]) -> None:
    result = postdesk(env, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout
