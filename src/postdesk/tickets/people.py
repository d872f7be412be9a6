"""Agents, admins and groups: creating them and checking their passwords."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from postdesk.db.models import Group, Role, User
from postdesk.db.types import utcnow
from postdesk.security.passwords import (
    DUMMY_HASH,
    hash_password,
    needs_rehash,
    password_problem,
    verify_password,
)

MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=15)


class PeopleError(ValueError):
    """A request about a user or group that cannot be carried out; the message is for the admin."""


def normalise_email(address: str) -> str:
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in address):
        raise PeopleError(f"{address!r} is not an email address")
    return f"{local}@{domain.lower()}"


def find_user(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(func.lower(User.email) == email.strip().lower()))


def create_user(
    session: Session, *, email: str, password: str | None, display_name: str = "", role: Role = Role.AGENT
) -> User:
    email = normalise_email(email)
    if find_user(session, email) is not None:
        raise PeopleError(f"a user with the address {email} already exists")
    if password is not None and (problem := password_problem(password)):
        raise PeopleError(f"password not accepted: {problem}")
    user = User(
        email=email,
        display_name=display_name or email.split("@")[0],
        password_hash=hash_password(password) if password is not None else None,
        role=role,
    )
    session.add(user)
    session.flush()
    return user


@dataclass(frozen=True)
class LoginResult:
    user: User | None
    reason: str | None = None


def authenticate(session: Session, *, email: str, password: str, now: datetime | None = None) -> LoginResult:
    """Check a password, counting failures and locking the account for a while after too many."""
    now = now or utcnow()
    user = find_user(session, email)
    if user is None or not user.is_active:
        verify_password(DUMMY_HASH, password)
        return LoginResult(None, "Wrong email address or password.")
    if user.locked_until and user.locked_until > now:
        minutes = max(1, int((user.locked_until - now).total_seconds() // 60))
        return LoginResult(None, f"Too many failed attempts. Try again in {minutes} minutes.")
    if not verify_password(user.password_hash, password):
        user.failed_logins += 1
        if user.failed_logins >= MAX_FAILED_LOGINS:
            user.locked_until = now + LOCKOUT
            user.failed_logins = 0
        return LoginResult(None, "Wrong email address or password.")
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = now
    if user.password_hash and needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return LoginResult(user)


def get_or_create_group(session: Session, name: str) -> Group:
    group = session.scalar(select(Group).where(Group.name == name))
    if group is None:
        group = Group(name=name)
        session.add(group)
        session.flush()
    return group
