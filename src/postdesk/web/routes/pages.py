"""Admin pages: users and settings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from postdesk.db.models import Role, User
from postdesk.microsoft.clouds import endpoints_for
from postdesk.tickets.people import PeopleError, create_user
from postdesk.web.deps import CurrentAdmin, RuntimeDep, SessionDep
from postdesk.web.templating import render

router = APIRouter(include_in_schema=False)


def _users_page(
    request: Request,
    db: SessionDep,
    admin: User,
    *,
    error: str | None = None,
    form: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    users = db.scalars(select(User).options(selectinload(User.groups)).order_by(User.email)).all()
    return render(
        request,
        "admin/users.html",
        {"section": "users", "user": admin, "users": users, "error": error, "form": form or {}},
        status_code=status_code,
    )


@router.get("/users")
def users(request: Request, db: SessionDep, admin: CurrentAdmin) -> Response:
    return _users_page(request, db, admin)


@router.post("/users")
def users_create(
    request: Request,
    db: SessionDep,
    admin: CurrentAdmin,
    email: Annotated[str, Form()],
    password: Annotated[str, Form()],
    display_name: Annotated[str, Form()] = "",
    role: Annotated[Role, Form()] = Role.AGENT,
) -> Response:
    try:
        create_user(db, email=email, password=password, display_name=display_name, role=role)
    except PeopleError as exc:
        db.rollback()
        return _users_page(
            request,
            db,
            admin,
            error=str(exc),
            form={"email": email, "display_name": display_name},
            status_code=422,
        )
    db.commit()
    return RedirectResponse("/users", status_code=303)


@router.get("/settings")
def settings_page(request: Request, runtime: RuntimeDep, admin: CurrentAdmin) -> Response:
    settings = runtime.settings
    backend = runtime.engine.url.get_backend_name()
    return render(
        request,
        "admin/settings.html",
        {
            "section": "settings",
            "user": admin,
            "settings": settings,
            "endpoints": endpoints_for(settings),
            "database_backend": "PostgreSQL" if backend.startswith("postgres") else backend.capitalize(),
            "key_fingerprint": runtime.secret_box.fingerprint,
            "key_source": "POSTDESK_SECRET_KEY" if settings.secret_key else f"{settings.data_dir}/secret.key",
        },
    )
