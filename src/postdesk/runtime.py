"""Wires settings, database and the secret key together; every entry point starts here."""

from __future__ import annotations

import gc
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from postdesk.config import Settings, load_settings
from postdesk.db import migrate
from postdesk.db.session import make_engine, make_session_factory
from postdesk.security.crypto import SecretBox, install_secret_box, load_or_create_master_key


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    secret_box: SecretBox


def bootstrap(settings: Settings | None = None, *, apply_migrations: bool = False) -> Runtime:
    settings = settings or load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    configured_key = settings.secret_key.get_secret_value() if settings.secret_key else None
    box = SecretBox(load_or_create_master_key(configured=configured_key, data_dir=settings.data_dir))
    install_secret_box(box)
    engine = make_engine(settings.resolved_database_url)
    if apply_migrations:
        migrate.upgrade(engine)
    return Runtime(settings=settings, engine=engine, sessions=make_session_factory(engine), secret_box=box)


def settle_heap() -> None:
    """Set aside what start-up built, once a long-running process is ready to serve.

    Imports, mappers, compiled templates and the app itself (some 200,000 objects) live as long as the
    process, yet every full garbage collection walked them all: a pause of 50–120 ms, at random, in the
    middle of whichever web request or fetch triggered it. Frozen, they are skipped; what the process
    makes afterwards is collected as before.
    """
    gc.collect()
    gc.freeze()
