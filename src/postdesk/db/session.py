"""Engine and session factory, with the SQLite settings Postdesk relies on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, Insert, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the web server read while the worker writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    # FULL, not NORMAL: a committed inbound row is what allows deleting the server copy, so a commit
    # must survive a power cut (NORMAL in WAL mode may lose the last transactions).
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session


def insert_ignoring_duplicates(session: Session, model: type[Any]) -> Insert:
    """INSERT … ON CONFLICT DO NOTHING, in the session's dialect (SQLite or PostgreSQL)."""
    build = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    return build(model).on_conflict_do_nothing()
