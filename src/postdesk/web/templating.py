"""Jinja2 templates with the globals every page needs (CSRF token, the signed-in user, flash)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.responses import HTMLResponse

from postdesk import __version__
from postdesk.alerts.banner import attention_items
from postdesk.mail import sanitise_html
from postdesk.runtime import Runtime
from postdesk.security.csrf import CSRF_FIELD, token_for

TEMPLATES_DIR = Path(__file__).parent / "templates"
templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
templates.env.globals["postdesk_version"] = __version__
templates.env.globals["csrf_field_name"] = CSRF_FIELD
# Mail HTML is never trusted: it is sanitised (scripts, handlers, remote images removed) on every display.
templates.env.filters["sanitise_mail_html"] = lambda html: Markup(sanitise_html(html or ""))  # noqa: S704 - sanitised just here


def csrf_token(request: Request) -> str:
    runtime: Runtime = request.app.state.runtime
    return token_for(runtime.secret_box, request.state.csrf_seed)


def render(
    request: Request, name: str, context: dict[str, Any] | None = None, *, status_code: int = 200
) -> HTMLResponse:
    values: dict[str, Any] = {"csrf_token": csrf_token(request), "user": None, "section": None}
    values.update(context or {})
    user = values["user"]
    if getattr(user, "is_admin", False) and not Path(name).name.startswith("_"):
        # Every full page shows admins what needs attention (fragments loaded by htmx do not).
        runtime: Runtime = request.app.state.runtime
        with runtime.sessions() as session:
            values["attention"] = attention_items(session)
    return templates.TemplateResponse(request, name, values, status_code=status_code)
