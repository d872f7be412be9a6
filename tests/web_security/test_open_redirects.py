"""``next`` after sign-in leads only to a page of this desk, however the address is disguised.

Already covered elsewhere: ``//host`` on POST /login (tests/test_web_foundation.py,
``test_it_ignores_an_offsite_next_parameter``). Here: every disguise browsers are known to resolve
to another site, sent raw and percent-encoded, on both the sign-in page and the form post.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from postdesk.db.models import User
from postdesk.web.deps import safe_next
from tests.conftest import ADMIN_PASSWORD, csrf_from, sign_in

HOSTILE = [
    "//evil.example",
    "//evil.example/tickets",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\\/evil.example",
    "https://evil.example",
    "HTTPS://evil.example/",
    "http:evil.example",
    "//evil.example@127.0.0.1:8025",
    "javascript:alert(document.cookie)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "/\t/evil.example",  # browsers drop tabs and newlines inside URLs: this is //evil.example
    "/\n/evil.example",
    "/\r\n/evil.example",
    " //evil.example",  # and leading spaces and control characters
    "\x00//evil.example",
    "/\x0c/evil.example",
    "/tickets\r\nSet-Cookie: postdesk_session=planted",
]
# As they arrive in a query string: the check applies to the decoded value.
PERCENT_ENCODED = ["%2F%2Fevil.example", "%2f%2fevil.example", "%2F%5Cevil.example", "%2F%09%2Fevil.example"]


def _as_a_browser_reads_it(location: str) -> str:
    """What the URL standard makes of a Location value before resolving it against the page."""
    location = location.strip("".join(chr(c) for c in range(33)))
    location = "".join(c for c in location if c not in "\t\n\r")
    return location.replace("\\", "/")


def _stays_on_this_site(location: str) -> bool:
    seen = _as_a_browser_reads_it(location)
    return seen.startswith("/") and not seen.startswith("//")


def test_a_hostile_next_is_replaced_after_signing_in(client: TestClient, admin: User) -> None:
    landed = {}
    for target in HOSTILE:
        client.cookies.clear()
        page = client.get("/login", params={"next": target})
        assert 'name="next" value="/tickets"' in page.text, target
        response = client.post(
            "/login",
            data={
                "email": admin.email,
                "password": ADMIN_PASSWORD,
                "next": target,
                "csrf_token": csrf_from(page.text),
            },
            follow_redirects=False,
        )
        landed[target] = (response.status_code, response.headers.get("location"))
    assert landed == {target: (303, "/tickets") for target in HOSTILE}


def test_a_hostile_next_is_replaced_when_already_signed_in(client: TestClient, admin: User) -> None:
    sign_in(client, admin.email, ADMIN_PASSWORD)
    raw = [client.get("/login", params={"next": target}, follow_redirects=False) for target in HOSTILE]
    encoded = [client.get(f"/login?next={target}", follow_redirects=False) for target in PERCENT_ENCODED]
    assert [(r.status_code, r.headers["location"]) for r in raw + encoded] == [(303, "/tickets")] * len(
        raw + encoded
    )


def test_a_path_of_this_site_is_kept(client: TestClient, admin: User) -> None:
    """Including a doubly encoded one: a browser asks this desk for the path ``/%2F%2Fevil.example``."""
    sign_in(client, admin.email, ADMIN_PASSWORD)
    for target in ("/tickets/42", "/tickets?state=open&q=vpn", "/channels#channel-3", "/%2F%2Fevil.example"):
        response = client.get(f"/login?next={quote(target, safe='')}", follow_redirects=False)
        assert response.headers["location"] == target
        assert _stays_on_this_site(response.headers["location"])


@given(st.text())
def test_whatever_next_says_a_browser_stays_on_this_site(target: str) -> None:
    assert _stays_on_this_site(safe_next(target))


@given(st.text(alphabet="/\\\t\n\r @:.%2Fevil ", max_size=12))
def test_slashes_backslashes_and_whitespace_in_any_order_stay_on_this_site(target: str) -> None:
    assert _stays_on_this_site(safe_next(target))
