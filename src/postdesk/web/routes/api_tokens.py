"""The signed-in person's own API tokens: create (the secret shown once, its scope chosen), list, revoke."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from postdesk.db.models import User
from postdesk.db.types import utcnow
from postdesk.security.api_tokens import (
    TokenError,
    TokenScope,
    create_token,
    list_tokens,
    revoke_token,
    token_status,
)
from postdesk.web.deps import CurrentUser, SessionDep
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)

PAGE = "/account/api-tokens"
EXPIRY_CHOICES = {"30": "30 days", "90": "90 days", "365": "1 year", "never": "Never"}
# Read only first and nothing pre-selected: write access is a choice a person makes, not a default.
SCOPE_CHOICES = {TokenScope.READ: "Read only", TokenScope.WRITE: "Read and write"}


def _page(
    request: Request,
    db: SessionDep,
    user: User,
    *,
    secret: str | None = None,
    error: str | None = None,
    form: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    tokens = list_tokens(db, user=user)
    response = render(
        request,
        "account/api_tokens.html",
        {
            "section": "api_tokens",
            "user": user,
            "tokens": [(token, token_status(token)) for token in tokens],
            "secret": secret,
            "error": error,
            "expiry_choices": EXPIRY_CHOICES,
            "scope_choices": SCOPE_CHOICES,
            # What the person typed, so a refused form need not be filled in again.
            "form": form or {"name": "", "expires": "90", "scope": ""},
        },
        status_code=status_code,
    )
    if secret is not None:
        # The one page that shows the secret must not be kept by a browser or proxy cache.
        response.headers["Cache-Control"] = "no-store"
    return response


@router.get(PAGE)
def api_tokens_page(request: Request, db: SessionDep, user: CurrentUser) -> Response:
    return _page(request, db, user)


@router.post(PAGE)
def api_tokens_create(
    request: Request,
    db: SessionDep,
    user: CurrentUser,
    name: Annotated[str, Form()],
    expires: Annotated[str, Form()] = "90",
    scope: Annotated[str, Form()] = "",
) -> Response:
    if expires not in EXPIRY_CHOICES:
        raise HTTPException(status_code=422, detail="Choose when the token expires.")
    expires_at = None if expires == "never" else utcnow() + timedelta(days=int(expires))
    try:
        created = create_token(db, user, name=name, scope=scope, expires_at=expires_at)
    except TokenError as exc:
        db.rollback()
        form = {"name": name, "expires": expires, "scope": scope}
        error = f"The token was not created: {exc}."
        return _page(request, db, user, error=error, form=form, status_code=422)
    db.commit()
    # Rendered, not redirected: the secret must never travel in a URL, and it is shown this once.
    return _page(request, db, user, secret=created.secret, status_code=201)


@router.post(PAGE + "/{token_id}/revoke")
def api_tokens_revoke(token_id: int, db: SessionDep, user: CurrentUser) -> Response:
    if revoke_token(db, token_id, owner=user) is None:
        raise HTTPException(status_code=404, detail="You have no such token.")
    db.commit()
    return RedirectResponse(PAGE, status_code=303)
