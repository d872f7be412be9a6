"""Signing in and out of the web UI."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from postdesk.security.csrf import new_seed
from postdesk.security.throttle import LoginThrottle, account_key, client_key
from postdesk.tickets.people import authenticate
from postdesk.web.deps import RuntimeDep, SessionDep, WebSessionDep, safe_next
from postdesk.web.sessions import ABSOLUTE_LIFETIME, SESSION_COOKIE, end_session, start_session
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login_page(request: Request, web_session: WebSessionDep, next: str | None = None) -> Response:
    if web_session is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", {"next": safe_next(next), "email": "", "error": None})


@router.post("/login")
def login(
    request: Request,
    db: SessionDep,
    runtime: RuntimeDep,
    email: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/tickets",
) -> Response:
    throttle = LoginThrottle.from_settings(runtime.settings)
    # The address uvicorn reports: the proxy's client when the proxy is trusted (FORWARDED_ALLOW_IPS).
    client = client_key(request.client.host if request.client else None)
    account = account_key(runtime.secret_box, email)
    if (wait := throttle.record_attempt(db, client=client, account=account)) is not None:
        return _too_many_attempts(request, next=next, email=email, retry_after=wait)
    result = authenticate(db, email=email, password=password)
    if result.user is None:
        db.commit()  # keep the failed-attempt counts
        return render(
            request,
            "login.html",
            {"next": safe_next(next), "email": email, "error": result.reason},
            status_code=401,
        )
    throttle.succeeded(db, client=client, account=account)
    token = start_session(db, result.user)
    db.commit()
    return _signed_in(request, token, next=next, secure=runtime.settings.uses_https)


@router.post("/logout")
def logout(request: Request, db: SessionDep) -> Response:
    end_session(db, request.cookies.get(SESSION_COOKIE))
    db.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    _rotate_csrf(request)
    return response


def _signed_in(request: Request, token: str, *, next: str, secure: bool) -> Response:
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(ABSOLUTE_LIFETIME.total_seconds()),
        httponly=True,
        secure=secure,
        samesite="lax",
        path="/",
    )
    _rotate_csrf(request)
    return response


def _too_many_attempts(request: Request, *, next: str, email: str, retry_after: int) -> Response:
    minutes = max(1, math.ceil(retry_after / 60))
    message = (
        f"Too many failed sign-ins from your network. Try again in {minutes} "
        f"minute{'' if minutes == 1 else 's'}."
    )
    response = render(
        request,
        "login.html",
        {"next": safe_next(next), "email": email, "error": message},
        status_code=429,
    )
    response.headers["Retry-After"] = str(retry_after)
    return response


def _rotate_csrf(request: Request) -> None:
    request.state.csrf_seed = new_seed()
    request.state.rotate_csrf = True
