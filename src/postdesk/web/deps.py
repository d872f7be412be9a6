"""FastAPI dependencies as short Annotated aliases: the runtime, a DB session, who is signed in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from postdesk.db.models import Channel, User, WebSession
from postdesk.runtime import Runtime
from postdesk.security.csrf import CSRF_COOKIE, CSRF_FIELD, CSRF_HEADER, token_is_valid
from postdesk.web.sessions import SESSION_COOKIE, resolve_session

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to /login?next=…"""


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_db(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def get_web_session(request: Request, db: SessionDep) -> WebSession | None:
    row = resolve_session(db, request.cookies.get(SESSION_COOKIE))
    if row is not None and db.dirty:
        db.commit()
    return row


WebSessionDep = Annotated[WebSession | None, Depends(get_web_session)]


def require_user(web_session: WebSessionDep) -> User:
    if web_session is None:
        raise LoginRequired
    return web_session.user


CurrentUser = Annotated[User, Depends(require_user)]


def require_admin(user: CurrentUser) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=403, detail="Only administrators can open this page.")
    return user


CurrentAdmin = Annotated[User, Depends(require_admin)]


async def csrf_protect(request: Request, runtime: RuntimeDep) -> None:
    """Refuse any state-changing browser request that lacks the token of this browser's CSRF cookie."""
    if request.method in SAFE_METHODS or _is_api_call_without_ambient_credentials(request):
        return
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        value = (await request.form()).get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    if not token_is_valid(runtime.secret_box, request.cookies.get(CSRF_COOKIE), token):
        raise HTTPException(
            status_code=403,
            detail="This form has expired or was sent from another site. Reload the page and try again.",
        )


def _is_api_call_without_ambient_credentials(request: Request) -> bool:
    """The REST API authenticates only by ``Authorization: Bearer``, which a cross-site page cannot
    make a browser send, so such calls need no CSRF token. An /api/ request carrying a session
    cookie and no bearer token is checked like any form post (the API ignores the cookie anyway)."""
    if not request.url.path.startswith("/api/"):
        return False
    scheme, _, _ = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" or SESSION_COOKIE not in request.cookies


def channel_or_404(db: Session, channel_id: int) -> Channel:
    channel = db.get(Channel, channel_id)
    if channel is None:
        raise HTTPException(status_code=404, detail="That mailbox no longer exists.")
    return channel


def safe_next(target: str | None, default: str = "/tickets") -> str:
    """Only same-site relative paths may be redirect targets (no //host, no scheme, no backslashes)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(c) < 32 for c in target):
        return default
    return target
