"""The web shell: health, signing in and out, CSRF, security headers, the ticket pages."""

from __future__ import annotations

from fastapi.testclient import TestClient

from postdesk.db.models import Direction, Role, User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.tickets.people import get_or_create_group
from postdesk.tickets.service import NewArticle, create_ticket, get_or_create_customer
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, add_user, csrf_from, sign_in


def _ticket(
    runtime: Runtime, title: str, *, group: str | None = None, customer: str = "c@example.org"
) -> int:
    with transaction(runtime.sessions) as session:
        ticket = create_ticket(
            session,
            title=title,
            customer=get_or_create_customer(session, customer),
            group=get_or_create_group(session, group) if group else None,
            first_article=NewArticle(
                direction=Direction.INBOUND, body_text=f"Body of {title}", sender=customer
            ),
        )
        return ticket.number


def test_it_answers_healthz_with_the_database_status(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_it_sends_anonymous_visitors_to_the_login_page_with_a_return_path(client: TestClient) -> None:
    response = client.get("/tickets?state=new", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=/tickets%3Fstate%3Dnew"


def test_it_says_the_password_is_wrong_without_a_stack_trace(client: TestClient, admin: User) -> None:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"email": admin.email, "password": "not-the-password", "csrf_token": csrf_from(page.text)},
    )
    assert response.status_code == 401
    assert "Wrong email address or password." in response.text
    assert "Traceback" not in response.text


def test_it_refuses_a_post_without_the_csrf_token(client: TestClient, admin: User) -> None:
    client.get("/login")
    response = client.post("/login", data={"email": admin.email, "password": ADMIN_PASSWORD})
    assert response.status_code == 403
    assert "expired or was sent from another site" in response.text


def test_it_refuses_a_csrf_token_minted_for_another_browser(client: TestClient, admin: User) -> None:
    token = csrf_from(client.get("/login").text)
    client.cookies.clear()
    client.get("/login")  # a new browser: a new CSRF cookie
    response = client.post(
        "/login", data={"email": admin.email, "password": ADMIN_PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 403


def test_it_signs_in_and_shows_the_ticket_list(client: TestClient, runtime: Runtime, admin: User) -> None:
    number = _ticket(runtime, "Printer on fire")
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get("/tickets")
    assert page.status_code == 200
    assert "Printer on fire" in page.text
    assert f'href="/tickets/{number}"' in page.text


def test_it_sets_session_cookies_httponly_and_samesite(client: TestClient, admin: User) -> None:
    page = client.get("/login")
    response = client.post(
        "/login",
        data={"email": admin.email, "password": ADMIN_PASSWORD, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    cookies = response.headers.get_list("set-cookie")
    session_cookie = next(c for c in cookies if c.startswith("postdesk_session="))
    assert "HttpOnly" in session_cookie
    assert "SameSite=lax" in session_cookie


def test_it_rotates_the_csrf_cookie_at_login(client: TestClient, admin: User) -> None:
    page = client.get("/login")
    before = client.cookies.get("postdesk_csrf")
    client.post(
        "/login",
        data={"email": admin.email, "password": ADMIN_PASSWORD, "csrf_token": csrf_from(page.text)},
        follow_redirects=False,
    )
    assert client.cookies.get("postdesk_csrf") not in (None, before)


def test_it_ignores_an_offsite_next_parameter(client: TestClient, admin: User) -> None:
    page = client.get("/login?next=//evil.example/phish")
    response = client.post(
        "/login",
        data={
            "email": admin.email,
            "password": ADMIN_PASSWORD,
            "next": "//evil.example/phish",
            "csrf_token": csrf_from(page.text),
        },
        follow_redirects=False,
    )
    assert response.headers["location"] == "/tickets"


def test_it_locks_an_account_after_five_wrong_passwords(client: TestClient, admin: User) -> None:
    for _ in range(5):
        token = csrf_from(client.get("/login").text)
        client.post("/login", data={"email": admin.email, "password": "wrong-password!", "csrf_token": token})
    token = csrf_from(client.get("/login").text)
    response = client.post(
        "/login", data={"email": admin.email, "password": ADMIN_PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 401
    assert "Too many failed attempts" in response.text


def test_it_signs_out_and_forgets_the_session(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    token = csrf_from(client.get("/tickets").text)
    client.post("/logout", data={"csrf_token": token})
    assert client.get("/tickets", follow_redirects=False).status_code == 303


def test_it_sends_a_strict_content_security_policy(client: TestClient) -> None:
    policy = client.get("/login").headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy


def test_it_shows_a_ticket_with_its_articles_and_adds_a_note(
    client: TestClient, runtime: Runtime, admin: User
) -> None:
    number = _ticket(runtime, "VPN drops every hour")
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get(f"/tickets/{number}")
    assert "Body of VPN drops every hour" in page.text
    client.post(
        f"/tickets/{number}/notes", data={"body": "Asked for logs.", "csrf_token": csrf_from(page.text)}
    )
    assert "Asked for logs." in client.get(f"/tickets/{number}").text


def test_it_filters_the_ticket_list_by_search_term(client: TestClient, runtime: Runtime, admin: User) -> None:
    _ticket(runtime, "Refund request")
    _ticket(runtime, "Password reset")
    sign_in(client, admin.email, ADMIN_PASSWORD)
    page = client.get("/tickets?q=refund")
    assert "Refund request" in page.text
    assert "Password reset" not in page.text


def test_it_hides_other_groups_tickets_from_an_agent(client: TestClient, runtime: Runtime) -> None:
    add_user(runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    secret_number = _ticket(runtime, "Salary question", group="HR")
    sign_in(client, "agent@example.com", AGENT_PASSWORD)
    assert "Salary question" not in client.get("/tickets").text
    assert client.get(f"/tickets/{secret_number}").status_code == 404


def test_it_keeps_admin_pages_from_agents(client: TestClient, runtime: Runtime) -> None:
    add_user(runtime, "agent@example.com", AGENT_PASSWORD, role=Role.AGENT)
    sign_in(client, "agent@example.com", AGENT_PASSWORD)
    for path in ("/users", "/settings", "/channels"):
        assert client.get(path).status_code == 403, path


def test_it_creates_a_user_from_the_users_page(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    token = csrf_from(client.get("/users").text)
    client.post(
        "/users",
        data={
            "email": "new.agent@example.com",
            "password": "long-enough-password",
            "role": "agent",
            "csrf_token": token,
        },
    )
    assert "new.agent@example.com" in client.get("/users").text


def test_it_explains_why_a_short_password_is_refused(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    token = csrf_from(client.get("/users").text)
    response = client.post(
        "/users", data={"email": "x@example.com", "password": "short", "csrf_token": token}
    )
    assert response.status_code == 422
    assert "at least 12 characters" in response.text
