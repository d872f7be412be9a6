"""The FastAPI application: middleware, error pages and routers."""

from __future__ import annotations

import logging
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from postdesk import __version__
from postdesk.config import Settings
from postdesk.microsoft.clouds import CLOUDS
from postdesk.runtime import Runtime
from postdesk.security.crypto import SecretError
from postdesk.security.csrf import CSRF_COOKIE, new_seed
from postdesk.web import api
from postdesk.web.deps import LoginRequired, csrf_protect
from postdesk.web.routes import (
    api_tokens,
    app_only,
    auth,
    doctor,
    health,
    mail_frame,
    mailboxes,
    metrics,
    microsoft365,
    pages,
    ticket_view,
    tickets,
)
from postdesk.web.templating import render

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"


def content_security_policy(settings: Settings) -> str:
    """No inline script or style anywhere: mail HTML is the most hostile content a help desk shows.

    Forms may post to Postdesk itself and to Microsoft's sign-in hosts (each cloud's, and an override's):
    "Add account" is a form whose answer redirects to the sign-in, and browsers hold those redirects to
    ``form-action`` too.
    """
    logins = {cloud.login_url for cloud in CLOUDS.values()}
    if settings.microsoft_login_url is not None:
        logins.add(_origin(str(settings.microsoft_login_url)))
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"frame-src 'self'; frame-ancestors 'none'; form-action 'self' {' '.join(sorted(logins))}; "
        "base-uri 'none'; object-src 'none'"
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"  # never user:password@ from the setting


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="Postdesk",
        version=__version__,
        description="REST API of the Postdesk help desk. Authenticate with a personal API token: "
        "`Authorization: Bearer pd_…`. Examples: docs/api.md.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        dependencies=[Depends(csrf_protect)],
    )
    app.state.runtime = runtime
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (
        health,
        metrics,
        auth,
        tickets,
        ticket_view,
        mail_frame,
        pages,
        microsoft365,
        mailboxes,
        api_tokens,
        doctor,
        app_only,
    ):
        app.include_router(module.router)
    app.include_router(api.router)  # the only routes in the OpenAPI schema
    _install_middleware(app, runtime)
    _install_error_pages(app)
    return app


def _install_middleware(app: FastAPI, runtime: Runtime) -> None:
    app.state.content_security_policy = content_security_policy(runtime.settings)
    app.add_middleware(
        BrowserProtections, secure=runtime.settings.uses_https, policy=app.state.content_security_policy
    )


class BrowserProtections:
    """Every answer's security headers, and the CSRF seed cookie the pages' tokens are derived from.

    Plain ASGI rather than ``@app.middleware("http")``: that wrapper runs each request through an extra
    task and stream pair, which costs more than everything this does."""

    def __init__(self, app: ASGIApp, *, secure: bool, policy: str) -> None:
        self.app = app
        self.secure = secure
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seed = HTTPConnection(scope).cookies.get(CSRF_COOKIE)
        state = scope.setdefault("state", {})
        state["csrf_seed"] = seed or new_seed()

        async def send_protected(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                if state.get("rotate_csrf") or not seed:
                    headers.append("set-cookie", csrf_cookie(state["csrf_seed"], secure=self.secure))
                protect_headers(headers, secure=self.secure, policy=self.policy)
            await send(message)

        await self.app(scope, receive, send_protected)


def csrf_cookie(seed: str, *, secure: bool) -> str:
    cookie: SimpleCookie = SimpleCookie()
    cookie[CSRF_COOKIE] = seed
    morsel = cookie[CSRF_COOKIE]
    morsel["path"] = "/"
    morsel["httponly"] = True
    morsel["samesite"] = "lax"
    if secure:
        morsel["secure"] = True
    return morsel.OutputString()


def protect(request: Request, response: Response) -> Response:
    """The headers every answer carries, unless its route chose stricter ones (the mail frame)."""
    protect_headers(
        response.headers,
        secure=request.app.state.runtime.settings.uses_https,
        policy=request.app.state.content_security_policy,
    )
    return response


def protect_headers(headers: MutableHeaders, *, secure: bool, policy: str) -> None:
    headers.setdefault("Content-Security-Policy", policy)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "DENY")
    if secure:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")


def _install_error_pages(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_redirect(request: Request, _exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)

    # Starlette's HTTPException (FastAPI's is a subclass): an unknown route raises the former.
    @app.exception_handler(StarletteHTTPException)
    async def error_page(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith("/api/") or request.url.path == "/healthz":
            return await http_exception_handler(request, exc)
        return render(
            request,
            "error.html",
            {"status": exc.status_code, "message": exc.detail},
            status_code=exc.status_code,
        )

    @app.exception_handler(SecretError)
    async def undecryptable(request: Request, exc: SecretError) -> Response:
        log.error("stored secret cannot be decrypted: %s", exc)
        message = f"{exc}. See docs/runbook.md, “Recover from a lost secret key”."
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=500)
        return render(request, "error.html", {"status": 500, "message": message}, status_code=500)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, _exc: Exception) -> Response:
        # The traceback goes to the log (redacted); the browser gets no internals. Starlette answers
        # this one outside every middleware, so the page gets its protections here.
        if request.url.path.startswith("/api/"):
            return protect(
                request,
                JSONResponse({"detail": "Internal error; the server log has the details."}, status_code=500),
            )
        page = render(
            request,
            "error.html",
            {"status": 500, "message": "Something went wrong on our side; the server log has the details."},
            status_code=500,
        )
        return protect(request, page)
