"""An agent signs in with a real browser and sees the ticket list."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from postdesk.db.models import User
from postdesk.db.session import transaction
from postdesk.runtime import Runtime
from postdesk.tickets.samples import seed_sample_tickets
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD
from tests.support.live import serve_in_thread

pytestmark = pytest.mark.browser


@pytest.fixture
def live_url(runtime: Runtime, admin: User) -> Iterator[str]:
    with transaction(runtime.sessions) as session:
        seed_sample_tickets(session, agent=session.merge(admin))
    with serve_in_thread(create_app(runtime)) as url:
        yield url


def test_an_admin_signs_in_and_sees_the_ticket_list(page: Page, live_url: str) -> None:
    page.goto(f"{live_url}/tickets")
    expect(page).to_have_url(f"{live_url}/login?next=/tickets")
    page.get_by_label("Email address").fill("admin@example.com")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{live_url}/tickets")
    expect(page.get_by_role("heading", name="Tickets")).to_be_visible()
    expect(page.get_by_role("link", name="Invoice 2026-1183 charged twice")).to_be_visible()
    page.get_by_role("link", name="Invoice 2026-1183 charged twice").click()
    expect(page.get_by_text("my card was charged twice")).to_be_visible()


def test_a_wrong_password_is_reported_on_the_page(page: Page, live_url: str) -> None:
    page.goto(f"{live_url}/login")
    page.get_by_label("Email address").fill("admin@example.com")
    page.get_by_label("Password").fill("definitely-wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong email address or password.")


def test_the_search_box_filters_without_a_page_reload(page: Page, live_url: str) -> None:
    page.goto(f"{live_url}/login")
    page.get_by_label("Email address").fill("admin@example.com")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_label("Search").fill("seats")
    expect(page.get_by_role("link", name="Quote for 40 additional seats")).to_be_visible()
    expect(page.get_by_role("link", name="Invoice 2026-1183 charged twice")).to_have_count(0)
    expect(page).to_have_url(f"{live_url}/tickets?q=seats&group=&owner=&sort=updated")
