"""Every route of the app, called as a signed-out visitor, an agent and an admin, against real rows.

``EXPECTED`` says who may use each route. The walk enumerates the routes from the app itself, so a route
added later without a line in ``EXPECTED`` fails ``test_every_route_has_an_expectation``: whoever adds
it must decide who may call it. The rules:

- anonymous: an HTML page redirects to /login (303), an HTML form post without the CSRF token is refused
  (403) and with it redirects to /login; the API answers 401.
- agent: 403 on admin routes; 404 on tickets (and their articles, attachments, mail frames) of groups
  they are not in; otherwise neither refused nor hidden.
- admin: never refused (401/403); every ticket visible.
- anyone: 404 for an article named under a ticket it does not belong to, and for another person's token.
- nobody: never a 5xx; every answer has a Content-Security-Policy that allows no inline script.

Path parameters are ids of real rows: a ticket in a group the agent is not in and one they can see
(each with an HTML mail, an attachment and a failed outbound reply), a mailbox, a quarantined message,
and another person's API token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.routing import Mount

from postdesk.db.models import (
    ApiToken,
    Attachment,
    DeliveryStatus,
    Direction,
    OutboundMessage,
    Role,
    Ticket,
    User,
)
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.security.csrf import CSRF_COOKIE, CSRF_HEADER, token_for
from postdesk.storage import store_bytes
from postdesk.tickets.service import NewArticle, add_article
from postdesk.web.app import create_app
from postdesk.web.routes import mailboxes, ticket_view
from tests.api.conftest import bearer, make_channel, make_ticket, person, quarantine
from tests.api.conftest import token_for as api_token_for
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, sign_in

BASE_URL = "http://127.0.0.1:8025"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Access(Enum):
    PUBLIC = "anyone, signed in or not"
    SIGNED_IN = "any signed-in person"
    OWN = "the signed-in person's own items only (another person's answer 404, even for admins)"
    TICKET = "people who can see the ticket: admins, and agents of its group"
    ADMIN = "administrators only"


@dataclass(frozen=True)
class Rule:
    access: Access
    # A valid request body, so the endpoint itself runs (FastAPI checks the body before the endpoint's
    # own visibility checks: an empty form would answer 422 and hide a missing 404). Values may name
    # the row fields of ``Target`` in braces.
    form: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] | None = None


# Routes that are not walked, and why. Everything else must be in EXPECTED.
NOT_WALKED = {
    "/static": "static files (CSS, JavaScript, htmx): the same for everyone, no data",
    "GET /api/openapi.json": "the OpenAPI schema: public documentation of the API, no data",
    "HEAD /api/openapi.json": "the OpenAPI schema: public documentation of the API, no data",
    "GET /api/docs": "Swagger UI, a static page that reads the OpenAPI schema",
    "HEAD /api/docs": "Swagger UI, a static page that reads the OpenAPI schema",
    "GET /docs/oauth2-redirect": "Swagger UI's OAuth helper page: static",
    "HEAD /docs/oauth2-redirect": "Swagger UI's OAuth helper page: static",
}

PUBLIC, SIGNED_IN, OWN, TICKET, ADMIN = (
    Access.PUBLIC,
    Access.SIGNED_IN,
    Access.OWN,
    Access.TICKET,
    Access.ADMIN,
)
EXPECTED: dict[str, Rule] = {
    "GET /healthz": Rule(PUBLIC),
    "GET /metrics": Rule(PUBLIC),  # channel ids only, no addresses; docs/deployment.md keeps it internal
    "GET /": Rule(PUBLIC),  # a redirect to /tickets
    "GET /login": Rule(PUBLIC),
    "POST /login": Rule(PUBLIC, form={"email": "{email}", "password": "{password}", "next": "/tickets"}),
    "POST /logout": Rule(PUBLIC),
    # Tickets
    "GET /tickets": Rule(SIGNED_IN),
    "GET /attachments/{attachment_id}": Rule(TICKET),
    "GET /tickets/{number}": Rule(TICKET),
    "GET /tickets/{number}/compose": Rule(TICKET),
    "POST /tickets/{number}/reply": Rule(TICKET, form={"kind": "note", "body": "Walked here."}),
    "POST /tickets/{number}/notes": Rule(TICKET, form={"body": "Walked here."}),
    "POST /tickets/{number}/state": Rule(TICKET, form={"state": "open"}),
    "POST /tickets/{number}/properties": Rule(
        TICKET, form={"state": "open", "owner": "", "group": "{group}"}
    ),
    "GET /tickets/{number}/articles/{article_id}/delivery": Rule(TICKET),
    "POST /tickets/{number}/articles/{article_id}/retry": Rule(TICKET),
    "GET /tickets/{number}/articles/{article_id}/body": Rule(TICKET),
    # The signed-in person's API tokens
    "GET /account/api-tokens": Rule(SIGNED_IN),
    "POST /account/api-tokens": Rule(SIGNED_IN, form={"name": "walk", "expires": "30"}),
    "POST /account/api-tokens/{token_id}/revoke": Rule(OWN),
    # Administration
    "GET /users": Rule(ADMIN),
    "POST /users": Rule(
        ADMIN, form={"email": "walked-{role}@example.com", "password": "walk-password-123", "role": "agent"}
    ),
    "GET /settings": Rule(ADMIN),
    "GET /channels": Rule(ADMIN),
    # Invalid on purpose (no client ID): saving an app would make later routes call Microsoft.
    "POST /channels/microsoft365/app": Rule(ADMIN, form={"client_id": "", "tenant": ""}),
    "POST /channels/microsoft365/certificate": Rule(ADMIN),
    "POST /channels/microsoft365/credential": Rule(ADMIN, form={"credential": "secret"}),
    "GET /channels/microsoft365/certificate.cer": Rule(ADMIN),
    "GET /channels/microsoft365/admin-consent": Rule(ADMIN),
    "GET /auth/microsoft365/start": Rule(ADMIN),
    "GET /auth/microsoft365/callback": Rule(ADMIN),
    "GET /channels/add": Rule(ADMIN),
    # An invalid address answers 422 before Postdesk asks Microsoft for a token.
    "POST /channels/app-only": Rule(ADMIN, form={"address": "not an address"}),
    "GET /channels/{channel_id}": Rule(ADMIN),
    # The walked mailbox is a user's own, not a shared one: 409 without reaching out to Microsoft.
    "POST /channels/{channel_id}/check-delegation": Rule(ADMIN),
    "POST /channels/{channel_id}/enable": Rule(ADMIN),
    "POST /channels/{channel_id}/disable": Rule(ADMIN),
    "POST /channels/{channel_id}/delete": Rule(ADMIN, form={"confirm": ""}),  # unconfirmed: 422, kept
    "POST /channels/{channel_id}/settings": Rule(ADMIN, form={"folder": "INBOX"}),
    "POST /channels/{channel_id}/backlog": Rule(ADMIN, form={"decision": "skip"}),
    "POST /channels/{channel_id}/fetch": Rule(ADMIN),
    "GET /channels/{channel_id}/folders": Rule(ADMIN),
    # An invalid test address answers 422 before the doctor would reach out to Microsoft.
    "POST /channels/{channel_id}/doctor": Rule(ADMIN, form={"send_test_to": "not an address"}),
    "GET /quarantine": Rule(ADMIN),
    "GET /quarantine/{row_id}/raw": Rule(ADMIN),
    "POST /quarantine/{row_id}/reprocess": Rule(ADMIN),
    # REST API (Bearer tokens)
    "GET /api/v1/me": Rule(SIGNED_IN),
    "GET /api/v1/tickets": Rule(SIGNED_IN),
    "POST /api/v1/tickets": Rule(
        SIGNED_IN,
        json={"customer_email": "walk@example.org", "title": "Walked", "body": "Filed by the walk."},
    ),
    "GET /api/v1/tickets/{number}": Rule(TICKET),
    "PATCH /api/v1/tickets/{number}": Rule(TICKET, json={"state": "open"}),
    "POST /api/v1/tickets/{number}/replies": Rule(TICKET, json={"body": "Walked here."}),
    "POST /api/v1/tickets/{number}/notes": Rule(TICKET, json={"body": "Walked here."}),
    "GET /api/v1/channels": Rule(ADMIN),
    "GET /api/v1/channels/{channel_id}": Rule(ADMIN),
    "GET /api/v1/quarantine": Rule(ADMIN),
    "POST /api/v1/quarantine/{message_id}/reprocess": Rule(ADMIN),
}
# Run last, in this order: signing in again and out would change the walker's session.
LAST = ("POST /login", "POST /logout")


def walked_routes(app: FastAPI) -> list[str]:
    """``METHOD path`` of every route the app serves (a mount by its path), however it was included."""
    keys = []
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            keys.append(str(route.path))
            continue
        keys.extend(f"{method} {route.path}" for method in sorted(route.methods or ()))
    return keys


def test_every_route_has_an_expectation(runtime: Runtime) -> None:
    routes = walked_routes(create_app(runtime))
    assert len(routes) >= len(EXPECTED), "the route enumeration found fewer routes than expected"
    unknown = sorted(set(routes) - set(EXPECTED) - set(NOT_WALKED))
    assert not unknown, f"add these routes to EXPECTED in {__name__} (who may call them?): {unknown}"
    gone = sorted((set(EXPECTED) | set(NOT_WALKED)) - set(routes))
    assert not gone, f"these routes no longer exist; remove them from {__name__}: {gone}"
    assert not [key for key in NOT_WALKED if "/api/v1/" in key], "the REST API is always walked"


# -- the rows the walk points at ----------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Ids of real rows, by the path parameter and form placeholder names."""

    number: int
    article_id: int
    attachment_id: int
    group: str
    channel_id: int
    row_id: int
    message_id: int
    token_id: int

    def fill(self, text: str, **extra: str) -> str:
        return text.format(**{**vars(self), **extra})


@dataclass(frozen=True)
class World:
    hidden: Target  # a ticket in "Legal", which the agent is not in
    visible: Target  # a ticket in "Support", the agent's group
    admin: User
    agent: User
    bystander_token: str  # the API token of a third person, whose id the walk tries to revoke


def _ticket_with_everything(runtime: Runtime, group: str, channel_id: int) -> tuple[int, int, int, str]:
    """A ticket whose first mail is HTML with an attachment, and a reply whose delivery failed."""
    number = make_ticket(
        runtime,
        f"Walk {group}",
        group=group,
        body_html="<p>Hello <b>team</b></p>",
        channel_id=channel_id,
    )
    raw = f"Subject: Re: Walk {group}\r\n\r\nOn it.\r\n".encode()
    with transaction(runtime.sessions) as session:
        ticket = session.scalars(select(Ticket).where(Ticket.number == number)).one()
        payload = b"%PDF-1.4 walk"
        attachment = Attachment(
            article_id=ticket.articles[0].id,
            filename="walk.pdf",
            content_type="application/pdf",
            size=len(payload),
            sha256=store_bytes(runtime.settings.attachments_dir, payload),
        )
        session.add(attachment)
        reply = add_article(
            session,
            ticket,
            NewArticle(direction=Direction.OUTBOUND, body_text="On it.", body_html="<p>On <i>it</i>.</p>"),
        )
        session.add(
            OutboundMessage(
                article_id=reply.id,
                channel_id=channel_id,
                message_id=f"<walk-{number}@example.com>",
                mail_from="support@example.com",
                recipients="jana.novak@example.org",
                sha256=store_bytes(runtime.settings.spool_dir, raw),
                size=len(raw),
                status=DeliveryStatus.FAILED,
                last_error="550 5.1.1 walk",
            )
        )
        session.flush()
        return number, reply.id, attachment.id, str(ticket.group_id)


@pytest.fixture
def world(runtime: Runtime) -> World:
    admin = person(runtime, "admin@example.com", role=Role.ADMIN, password=ADMIN_PASSWORD)
    agent = person(runtime, "agent@example.com", groups=("Support",), password=AGENT_PASSWORD)
    bystander = person(runtime, "bystander@example.com", groups=("Support",))
    bystander_token = api_token_for(runtime, bystander, name="bystander's script")
    with runtime.sessions() as session:
        token_id = session.scalars(select(ApiToken.id).where(ApiToken.user_id == bystander.id)).one()
    channel_id = make_channel(runtime)
    # Not a mail message: reprocessing leaves it in quarantine, so every call finds it there.
    row_id = quarantine(runtime, channel_id, b"\x00\x01 not a mail message", reason="not a mail message")
    shared = {"channel_id": channel_id, "row_id": row_id, "message_id": row_id, "token_id": token_id}
    targets = {}
    for group in ("Legal", "Support"):
        number, article_id, attachment_id, group_id = _ticket_with_everything(runtime, group, channel_id)
        targets[group] = Target(
            number=number, article_id=article_id, attachment_id=attachment_id, group=group_id, **shared
        )
    return World(
        hidden=targets["Legal"],
        visible=targets["Support"],
        admin=admin,
        agent=agent,
        bystander_token=bystander_token,
    )


@pytest.fixture
def no_background_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetching and sending run in threads that would outlive the test; the walk is about who may ask."""
    monkeypatch.setattr(mailboxes, "start_fetch", lambda _runtime, _channel_id: None)
    monkeypatch.setattr(ticket_view, "start_sending", lambda _runtime: None)


# -- the walk ---------------------------------------------------------------------------------------


@dataclass
class Caller:
    role: str  # "anonymous", "agent" or "admin"
    app: FastAPI
    browser: TestClient  # cookies: the session (if signed in) and the CSRF seed
    api: TestClient  # no cookies: a script with the person's Bearer token (none when anonymous)
    api_token: str | None
    credentials: dict[str, str]  # what POST /login is sent
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, key: str, variant: str, response: httpx.Response, wanted: str) -> None:
        if not ok:
            where = response.headers.get("location", "")
            self.problems.append(
                f"{self.role:9} {key} [{variant or '-'}] answered {response.status_code} {where}"
                f" (expected {wanted})"
            )


@pytest.fixture(params=["anonymous", "agent", "admin"])
def caller(request: pytest.FixtureRequest, runtime: Runtime, world: World) -> Iterator[Caller]:
    role: str = request.param
    app = create_app(runtime)
    with TestClient(app, base_url=BASE_URL) as browser, TestClient(app, base_url=BASE_URL) as api:
        token = None
        # An anonymous visitor signs in as the agent at POST /login (the walk's second to last call).
        email, password = world.agent.email, AGENT_PASSWORD
        if role == "admin":
            email, password = world.admin.email, ADMIN_PASSWORD
        if role != "anonymous":
            sign_in(browser, email, password)
            token = api_token_for(runtime, world.admin if role == "admin" else world.agent)
        else:
            browser.get("/login")  # the CSRF cookie every first visit gets
        yield Caller(role, app, browser, api, token, {"email": email, "password": password, "role": role})


def _request(
    caller: Caller, runtime: Runtime, key: str, rule: Rule, target: Target, *, csrf: bool = True
) -> httpx.Response:
    method, path = key.split(" ", 1)
    url = target.fill(path)
    if url.startswith("/api/"):
        headers = bearer(caller.api_token) if caller.api_token else {}
        body = rule.json if method not in SAFE_METHODS else None
        response: httpx.Response = caller.api.request(
            method, url, json=body, headers=headers, follow_redirects=False
        )
        return response
    headers = {}
    if csrf and method not in SAFE_METHODS:
        # The token the pages embed for this browser: derived from its CSRF cookie (rotated at sign-in).
        headers[CSRF_HEADER] = token_for(runtime.secret_box, caller.browser.cookies.get(CSRF_COOKIE))
    form = {name: target.fill(value, **caller.credentials) for name, value in rule.form.items()}
    response = caller.browser.request(method, url, data=form or None, headers=headers, follow_redirects=False)
    return response


def _judge(caller: Caller, key: str, rule: Rule, variant: str, response: httpx.Response) -> None:
    status, role, access = response.status_code, caller.role, rule.access
    caller.check(status < 500, key, variant, response, "never a server error")
    _judge_content_security_policy(caller, key, variant, response)
    if access is Access.PUBLIC:
        caller.check(status not in (401, 403), key, variant, response, "open to anyone")
    elif role == "anonymous" and key.split(" ", 1)[1].startswith("/api/"):
        caller.check(status == 401, key, variant, response, "401: no API token")
    elif role == "anonymous":
        to_login = status == 303 and response.headers.get("location", "").startswith("/login?next=")
        caller.check(to_login, key, variant, response, "303 to /login")
    elif access is Access.ADMIN and role == "agent":
        caller.check(status == 403, key, variant, response, "403: administrators only")
    elif access is Access.ADMIN:
        caller.check(status not in (401, 403), key, variant, response, "an admin is never refused")
    elif access is Access.OWN:
        caller.check(status == 404, key, variant, response, "404: another person's item")
    elif access is Access.TICKET and variant == "crossed":
        caller.check(status == 404, key, variant, response, "404: the article is not in that ticket")
    elif access is Access.TICKET and role == "agent" and variant == "hidden":
        caller.check(status == 404, key, variant, response, "404: a ticket of another group")
    else:
        caller.check(status not in (401, 403, 404), key, variant, response, "allowed and visible")


def _judge_content_security_policy(caller: Caller, key: str, variant: str, response: httpx.Response) -> None:
    policy = response.headers.get("content-security-policy", "")
    caller.check(bool(policy), key, variant, response, "a Content-Security-Policy header")
    directives: dict[str, str] = {}
    for part in policy.split(";"):
        name, _, sources = part.strip().partition(" ")
        directives[name] = sources
    scripts = directives.get("script-src", directives.get("default-src", ""))
    inline = "'unsafe-inline'" in scripts or "'unsafe-eval'" in scripts or "*" in scripts.split()
    caller.check(not inline, key, variant, response, f"no inline script allowed, not {scripts!r}")


def _variants(key: str, rule: Rule, world: World) -> dict[str, Target]:
    """Ticket routes are called for a ticket the agent cannot see and one they can; those naming an
    article also with the visible ticket's number and the hidden ticket's article ("crossed")."""
    if rule.access is not Access.TICKET:
        return {"": world.visible}
    variants = {"hidden": world.hidden, "visible": world.visible}
    if "{article_id}" in key:
        variants["crossed"] = replace(world.visible, article_id=world.hidden.article_id)
    return variants


def _walk_order(routes: list[str]) -> list[str]:
    return [key for key in routes if key in EXPECTED and key not in LAST] + list(LAST)


def test_every_route_answers_each_role_as_expected(
    caller: Caller, runtime: Runtime, world: World, no_background_work: None
) -> None:
    for key in _walk_order(walked_routes(caller.app)):
        rule = EXPECTED[key]
        for variant, target in _variants(key, rule, world).items():
            method, path = key.split(" ", 1)
            if caller.role == "anonymous" and method not in SAFE_METHODS and not path.startswith("/api/"):
                refused = _request(caller, runtime, key, rule, target, csrf=False)
                caller.check(refused.status_code == 403, key, variant, refused, "403 without a CSRF token")
            _judge(caller, key, rule, variant, _request(caller, runtime, key, rule, target))
    # Nobody could revoke another person's token: the bystander's script still works.
    assert caller.api.get("/api/v1/me", headers=bearer(world.bystander_token)).status_code == 200
    assert not caller.problems, "\n".join(["", *caller.problems])


def test_every_state_changing_route_refuses_a_browser_request_without_the_csrf_token(
    runtime: Runtime, world: World, no_background_work: None
) -> None:
    """Signed in as an admin, whom nothing else refuses: only the missing token can cause the 403. The
    API is included with the session cookie and no Bearer token, as a cross-site form would send it."""
    app = create_app(runtime)
    with TestClient(app, base_url=BASE_URL) as browser:
        sign_in(browser, world.admin.email, ADMIN_PASSWORD)
        credentials = {"email": world.admin.email, "password": ADMIN_PASSWORD, "role": "admin"}
        caller = Caller("admin", app, browser, browser, None, credentials)
        state_changing = [key for key in walked_routes(app) if key.split(" ", 1)[0] not in SAFE_METHODS]
        state_changing = [key for key in state_changing if key in EXPECTED]
        assert len(state_changing) > 20
        for key in state_changing:
            rule = EXPECTED[key]
            method, path = key.split(" ", 1)
            url = world.visible.fill(path)
            form = {name: world.visible.fill(value, **credentials) for name, value in rule.form.items()}
            response = browser.request(
                method, url, data=form or None, json=rule.json if not form else None, follow_redirects=False
            )
            wanted = "403: no CSRF token"
            caller.check(response.status_code == 403, key, "", response, wanted)
            caller.check("expired or was sent from another site" in response.text, key, "", response, wanted)
    assert not caller.problems, "\n".join(["", *caller.problems])
