"""Who is calling the API: a personal token in ``Authorization: Bearer``, never a session cookie."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from postdesk.db.models import User
from postdesk.security.api_tokens import SAFE_METHODS, TokenScope, authenticate, scope_allows
from postdesk.web.api.schemas import ErrorOut
from postdesk.web.deps import SessionDep

MAX_PER_PAGE = 100

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="PersonalApiToken",
    description=(
        "A personal API token (`pd_…`), created under “API tokens” or with `postdesk token create`. "
        "A read-only token may only use GET, HEAD and OPTIONS; a write token may do whatever its owner may."
    ),
)
READ_ONLY_DETAIL = (
    f"This API token is read-only: it may only use {', '.join(sorted(SAFE_METHODS))}. "
    "To change anything, create a token with write access under “API tokens” (/account/api-tokens) "
    "or with `postdesk token create EMAIL --name NAME --scope write`."
)


def _unauthorized(detail: str, *, invalid: bool) -> HTTPException:
    # RFC 6750: say which scheme to use, and whether the token given was the problem.
    challenge = 'Bearer realm="postdesk", error="invalid_token"' if invalid else 'Bearer realm="postdesk"'
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": challenge})


def _read_only() -> HTTPException:
    # RFC 6750 §3.1: a valid token without the rights the request needs is a 403, not a 401, and the
    # challenge names the scope that would do.
    challenge = f'Bearer realm="postdesk", error="insufficient_scope", scope="{TokenScope.WRITE}"'
    return HTTPException(status_code=403, detail=READ_ONLY_DETAIL, headers={"WWW-Authenticate": challenge})


def require_api_user(
    request: Request,
    db: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> User:
    """The token's owner, if the token is valid and its scope allows this request's method.

    Every ``/api/v1`` endpoint depends on this, so the scope is checked before any role check
    (``require_api_admin``) and before the request body is validated.
    """
    if credentials is None:
        raise _unauthorized(
            "Send a personal API token in the header Authorization: Bearer pd_…", invalid=False
        )
    check = authenticate(db, credentials.credentials)
    if check.user is None:
        raise _unauthorized(check.reason or "Unknown API token.", invalid=True)
    if db.dirty:
        db.commit()  # last_used_at: a refused write with a read-only token is still a use
    if not scope_allows(check.scope, request.method):
        raise _read_only()
    request.state.api_token_scope = check.scope
    return check.user


ApiUser = Annotated[User, Depends(require_api_user)]


def require_api_admin(user: ApiUser) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=403, detail="Only administrators can use this endpoint.")
    return user


ApiAdmin = Annotated[User, Depends(require_api_admin)]


@dataclass(frozen=True)
class Pagination:
    page: int
    per_page: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def pages(self, total: int) -> int:
        return max(1, -(-total // self.per_page))


def pagination(
    page: Annotated[int, Query(ge=1, description="1 for the first page.")] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="Items per page.")] = 25,
) -> Pagination:
    return Pagination(page=page, per_page=per_page)


PageParams = Annotated[Pagination, Depends(pagination)]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the JSON errors an endpoint answers with."""
    meaning = {
        401: "No token, or a token that is unknown, revoked, expired or whose owner is deactivated.",
        403: "A read-only token asked to change something, or the token's owner is not an administrator.",
        404: "No such item, or the token's owner may not see it.",
        409: "The item is not in a state that allows this.",
    }
    return {code: {"model": ErrorOut, "description": meaning[code]} for code in codes}
