"""``/api/v1/me``: whose token this is; a cheap way for a script to check its token works."""

from __future__ import annotations

from fastapi import APIRouter, Request

from postdesk.web.api.deps import ApiUser, error_responses
from postdesk.web.api.schemas import MeOut

router = APIRouter(tags=["account"], responses=error_responses(401))


@router.get("/me", summary="The token's owner")
def me_endpoint(request: Request, user: ApiUser) -> MeOut:
    return MeOut(
        id=user.id,
        email=user.email,
        display_name=user.display_name,
        role=user.role,
        groups=sorted(group.name for group in user.groups),
        token_scope=request.state.api_token_scope,
    )
