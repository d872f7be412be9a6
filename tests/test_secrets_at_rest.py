"""Secrets are sealed with an authenticated cipher and never reach the database file in clear."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from postdesk.db.models import MicrosoftApp
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.security.crypto import SecretBox, SecretError, load_or_create_master_key

SECRET_VALUE = "Xq8Q~very.secret-client-value_7aZ0b1c2d3e4f5g6h7i"


def test_it_round_trips_a_value() -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.encrypt("hello", purpose="test")
    assert sealed.startswith("pd1:")
    assert "hello" not in sealed
    assert box.decrypt(sealed, purpose="test") == "hello"


def test_it_refuses_a_value_moved_to_another_column() -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.encrypt("hello", purpose="channel.token_cache")
    with pytest.raises(SecretError, match="cannot decrypt"):
        box.decrypt(sealed, purpose="microsoft_app.client_secret")


def test_it_says_the_key_is_wrong_rather_than_returning_garbage() -> None:
    sealed = SecretBox(b"k" * 32).encrypt("hello", purpose="p")
    with pytest.raises(SecretError, match="POSTDESK_SECRET_KEY differs"):
        SecretBox(b"z" * 32).decrypt(sealed, purpose="p")


def test_it_detects_tampering() -> None:
    box = SecretBox(b"k" * 32)
    sealed = box.encrypt("hello", purpose="p")
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretError):
        box.decrypt(tampered, purpose="p")


def test_it_generates_a_private_key_file_on_first_run(tmp_path: Path) -> None:
    first = load_or_create_master_key(configured=None, data_dir=tmp_path)
    assert stat.S_IMODE((tmp_path / "secret.key").stat().st_mode) == 0o600
    assert load_or_create_master_key(configured=None, data_dir=tmp_path) == first


def test_it_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    load_or_create_master_key(configured=None, data_dir=tmp_path)
    os.chmod(tmp_path / "secret.key", 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        load_or_create_master_key(configured=None, data_dir=tmp_path)


def test_a_stored_secret_is_not_in_the_sqlite_file(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        session.add(MicrosoftApp(client_id="c", tenant="t", client_secret=SECRET_VALUE))
    with runtime.engine.connect() as connection:
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    database = Path(runtime.engine.url.database or "")
    files = [database, *database.parent.glob(database.name + "-*")]
    for path in files:
        assert SECRET_VALUE.encode() not in path.read_bytes(), path
    with runtime.sessions() as session:
        stored = session.query(MicrosoftApp).one()
        assert stored.client_secret == SECRET_VALUE
        raw = session.execute(text("SELECT client_secret FROM microsoft_apps")).scalar_one()
        assert raw.startswith("pd1:")
