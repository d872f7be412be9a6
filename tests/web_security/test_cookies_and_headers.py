"""Cookies and browser protections on every kind of answer, including error pages.

Already covered elsewhere: ``HttpOnly`` and ``SameSite`` of the session cookie over http
(tests/test_web_foundation.py, ``test_it_sets_session_cookies_httponly_and_samesite``), and a
Content-Security-Policy allowing no inline script on every route for every role
(tests/test_route_walk.py, ``_judge_content_security_policy``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from postdesk.config import Settings
from postdesk.db.models import Role
from postdesk.runtime import Runtime, bootstrap
from postdesk.web.app import content_security_policy, create_app
from postdesk.web.templating import TEMPLATES_DIR
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, add_user, csrf_from, sign_in

PUBLIC_URL = "https://helpdesk.example.com"


@pytest.fixture
def https_desk(make_settings: Callable[..., Settings]) -> Iterator[Runtime]:
    runtime = bootstrap(make_settings(base_url=PUBLIC_URL), apply_migrations=True)
    add_user(runtime, "admin@example.com", ADMIN_PASSWORD, role=Role.ADMIN)
    yield runtime
    runtime.engine.dispose()


def _cookie(response: httpx.Response, name: str) -> dict[str, str]:
    """The attributes of one Set-Cookie header, lower-cased names; flags map to ""."""
    header = next(h for h in response.headers.get_list("set-cookie") if h.startswith(f"{name}="))
    attributes = {}
    for part in header.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        attributes[key.lower()] = value.lower()
    return attributes


def test_over_https_the_session_and_csrf_cookies_are_secure_httponly_and_same_site(
    https_desk: Runtime,
) -> None:
    with TestClient(create_app(https_desk), base_url=PUBLIC_URL) as browser:
        page = browser.get("/login")
        signed_in = browser.post(
            "/login",
            data={
                "email": "admin@example.com",
                "password": ADMIN_PASSWORD,
                "csrf_token": csrf_from(page.text),
            },
            follow_redirects=False,
        )
    assert signed_in.status_code == 303
    for response, name in (
        (page, "postdesk_csrf"),
        (signed_in, "postdesk_session"),
        (signed_in, "postdesk_csrf"),
    ):
        attributes = _cookie(response, name)
        assert {"secure", "httponly"} <= attributes.keys(), (name, attributes)
        assert attributes.get("samesite") in ("lax", "strict"), (name, attributes)
        assert attributes.get("path") == "/"
    assert page.headers["strict-transport-security"].startswith("max-age=")


def test_the_session_cookie_is_a_long_random_value_that_the_database_does_not_hold(
    https_desk: Runtime,
) -> None:
    from sqlalchemy import select

    from postdesk.db.models import WebSession

    with TestClient(create_app(https_desk), base_url=PUBLIC_URL) as browser:
        sign_in(browser, "admin@example.com", ADMIN_PASSWORD)
        token = browser.cookies["postdesk_session"]
    assert len(token) >= 43  # 256 bits, URL-safe base64
    with https_desk.sessions() as session:
        stored = list(session.scalars(select(WebSession.id)))
    assert stored and token not in stored


def _is_protected(response: httpx.Response) -> bool:
    policy = response.headers.get("content-security-policy", "")
    return (
        "script-src 'self'" in policy
        and "unsafe-inline" not in policy
        and "frame-ancestors 'none'" in policy
        and response.headers.get("x-frame-options") == "DENY"
        and response.headers.get("x-content-type-options") == "nosniff"
    )


def test_error_pages_carry_the_same_protections_as_every_page(runtime: Runtime) -> None:
    app = create_app(runtime)

    @app.get("/broken-on-purpose")
    def broken() -> None:
        raise RuntimeError("a bug")

    add_user(runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    with TestClient(app, base_url="http://127.0.0.1:8025", raise_server_exceptions=False) as browser:
        sign_in(browser, "agent@example.com", AGENT_PASSWORD)
        answers = {
            "500": browser.get("/broken-on-purpose"),
            "403": browser.get("/users"),
            "404 page": browser.get("/tickets/999999"),
            "404 route": browser.get("/no-such-page"),
            "405": browser.put("/login"),
        }
    assert answers["500"].status_code == 500 and "Something went wrong" in answers["500"].text
    assert [name for name, response in answers.items() if not _is_protected(response)] == []


_INLINE_CODE = re.compile(
    r"<script(?![^>]*\bsrc=)[^>]*>"  # a script element without src
    r"|\son[a-z]+\s*="  # onclick=, onload=, …
    r"|\shx-on[:\w-]*\s*="  # htmx's inline handlers
    r"|<style|\sstyle\s*="  # inline style
    r"|javascript:",
    re.IGNORECASE,
)


@pytest.mark.parametrize("template", sorted(TEMPLATES_DIR.rglob("*.html")), ids=lambda p: str(p.name))
def test_no_template_needs_inline_script_or_style(template: Path) -> None:
    """The policy forbids inline code, so a page that used some would break: keep it all in /static."""
    assert _INLINE_CODE.findall(template.read_text(encoding="utf-8")) == []


def test_forms_may_lead_to_microsofts_sign_in_hosts_and_nowhere_else(
    make_settings: Callable[..., Settings],
) -> None:
    policy = content_security_policy(
        make_settings(microsoft_login_url="https://admin:hunter2@login.example.test:8443/tenant")
    )
    [form_action] = [rule for rule in policy.split("; ") if rule.startswith("form-action ")]
    assert form_action.split()[1:] == [
        "'self'",
        "https://login.chinacloudapi.cn",
        "https://login.example.test:8443",  # the override's origin, without its credentials
        "https://login.microsoftonline.com",
        "https://login.microsoftonline.us",
    ]
    assert "hunter2" not in policy
