"""Failed sign-ins are limited per client address, in the database, across web processes (issue #9)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from postdesk.cli import server
from postdesk.config import Settings
from postdesk.db.models import LoginAttempt, User
from postdesk.db.types import utcnow
from postdesk.runtime import Runtime, bootstrap
from postdesk.security.throttle import LoginThrottle, client_key, purge_old_attempts
from postdesk.web.app import create_app
from tests.conftest import ADMIN_PASSWORD, AGENT_PASSWORD, csrf_from
from tests.web_security.conftest import ADMIN, AGENT, BASE_URL, LIMIT, Browsers, attempt

ATTACKER = "198.51.100.66"
WINDOW = timedelta(minutes=15)


def _spray(browser: TestClient, count: int) -> list[int]:
    """Wrong passwords for ``count`` different accounts, the way a password-spraying attack goes."""
    return [attempt(browser, f"victim{n}@example.com", "Winter2026!").status_code for n in range(count)]


def _age_attempts(runtime: Runtime, by: timedelta) -> None:
    with runtime.sessions() as session:
        for row in session.scalars(select(LoginAttempt)):
            row.attempted_at -= by
        session.commit()


def _stored_attempts(runtime: Runtime) -> list[LoginAttempt]:
    with runtime.sessions() as session:
        return list(session.scalars(select(LoginAttempt)))


def test_the_attempt_after_the_limit_is_refused_with_429_and_retry_after(
    browsers: Browsers, throttled: Runtime
) -> None:
    browser = browsers(ATTACKER)
    assert _spray(browser, LIMIT) == [401] * LIMIT
    refused = attempt(browser, ADMIN, ADMIN_PASSWORD)  # even the right password
    assert refused.status_code == 429
    assert WINDOW.total_seconds() - 30 <= int(refused.headers["retry-after"]) <= WINDOW.total_seconds()
    assert "Too many failed sign-ins from your network. Try again in 15 minutes." in refused.text
    assert "postdesk_session" not in refused.headers.get("set-cookie", "")
    assert "script-src 'self'" in refused.headers["content-security-policy"]


def test_a_refused_attempt_does_not_check_the_password_or_count_against_the_account(
    browsers: Browsers, throttled: Runtime
) -> None:
    browser = browsers(ATTACKER)
    _spray(browser, LIMIT)
    for _ in range(3):
        assert attempt(browser, ADMIN, "a wrong guess").status_code == 429
    with throttled.sessions() as session:
        admin = session.scalars(select(User).where(User.email == ADMIN)).one()
        assert (admin.failed_logins, admin.locked_until) == (0, None)
    assert len(_stored_attempts(throttled)) == LIMIT  # refusals are not stored either


def test_other_addresses_are_not_held_up(browsers: Browsers) -> None:
    _spray(browsers(ATTACKER), LIMIT + 2)
    assert attempt(browsers("203.0.113.20"), AGENT, AGENT_PASSWORD).status_code == 303


def test_addresses_in_one_ipv6_64_share_their_count(browsers: Browsers) -> None:
    assert _spray(browsers("2001:db8:7:1::1"), LIMIT) == [401] * LIMIT
    assert attempt(browsers("2001:db8:7:1:ffff:ab:cd:ef"), AGENT, AGENT_PASSWORD).status_code == 429
    assert attempt(browsers("2001:db8:7:2::1"), AGENT, AGENT_PASSWORD).status_code == 303


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        (None, "unknown"),
        ("", "unknown"),
        ("testclient", "testclient"),
    ],
)
def test_a_client_address_is_counted_by_its_ipv4_address_or_ipv6_64(host: str | None, key: str) -> None:
    assert client_key(host) == key


def test_signing_in_to_ones_own_account_does_not_reset_the_count_for_other_accounts(
    browsers: Browsers,
) -> None:
    """An attacker with an agent account of their own cannot clear their guesses by signing in."""
    attacker = browsers(ATTACKER)
    assert _spray(attacker, LIMIT - 1) == [401] * (LIMIT - 1)
    assert attempt(attacker, AGENT, AGENT_PASSWORD).status_code == 303
    attacker.cookies.clear()
    assert _spray(attacker, 1) == [401]
    assert attempt(attacker, AGENT, AGENT_PASSWORD).status_code == 429


def test_a_successful_sign_in_forgives_that_accounts_own_typing_mistakes(browsers: Browsers) -> None:
    """Colleagues behind the same address do not pay for one person's mistyped password."""
    office = browsers("192.0.2.10")
    assert [attempt(office, AGENT, "agent-pasword-123").status_code for _ in range(LIMIT - 1)] == [401, 401]
    assert attempt(office, AGENT, AGENT_PASSWORD).status_code == 303
    colleague = browsers("192.0.2.10")
    assert [attempt(colleague, ADMIN, "admin-pasword-123").status_code for _ in range(LIMIT - 1)] == [
        401,
        401,
    ]
    assert attempt(colleague, ADMIN, ADMIN_PASSWORD).status_code == 303


def test_the_limit_lifts_when_the_oldest_failure_leaves_the_window(
    browsers: Browsers, throttled: Runtime
) -> None:
    browser = browsers(ATTACKER)
    _spray(browser, LIMIT)
    _age_attempts(throttled, WINDOW - timedelta(seconds=20))
    refused = attempt(browser, AGENT, AGENT_PASSWORD)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert "Try again in 1 minute." in refused.text
    _age_attempts(throttled, timedelta(seconds=21))
    assert attempt(browser, AGENT, AGENT_PASSWORD).status_code == 303


def test_old_attempts_are_deleted_and_the_typed_address_is_not_stored(
    browsers: Browsers, throttled: Runtime
) -> None:
    browser = browsers(ATTACKER)
    attempt(browser, "My Secret Password 1", "x")  # a password typed into the address field
    _spray(browser, 1)
    [typed, _] = _stored_attempts(throttled)
    assert typed.client == ATTACKER
    assert "secret" not in typed.account.lower() and len(typed.account) <= 64
    _age_attempts(throttled, WINDOW)
    _spray(browsers("203.0.113.5"), 1)
    assert [row.client for row in _stored_attempts(throttled)] == ["203.0.113.5"]


def test_a_limit_of_zero_turns_the_per_address_limit_off(make_settings: Callable[..., Settings]) -> None:
    runtime = bootstrap(make_settings(login_attempts_per_address=0), apply_migrations=True)
    try:
        with TestClient(create_app(runtime), base_url=BASE_URL, client=(ATTACKER, 1)) as browser:
            assert _spray(browser, LIMIT + 3) == [401] * (LIMIT + 3)
        assert _stored_attempts(runtime) == []
    finally:
        runtime.engine.dispose()


# -- several web processes ------------------------------------------------------------------------


@pytest.fixture
def two_processes(make_settings: Callable[..., Settings], database_url: str) -> Iterator[list[Runtime]]:
    """Two web processes of one desk: separate engines and apps, nothing shared but the database."""
    settings = make_settings(database_url=database_url, login_attempts_per_address=LIMIT)
    runtimes = [bootstrap(settings, apply_migrations=True), bootstrap(settings)]
    yield runtimes
    for runtime in runtimes:
        runtime.engine.dispose()


def test_failures_in_one_web_process_count_in_another(two_processes: list[Runtime]) -> None:
    first, second = (create_app(runtime) for runtime in two_processes)
    with (
        TestClient(first, base_url=BASE_URL, client=(ATTACKER, 1)) as one,
        TestClient(second, base_url=BASE_URL, client=(ATTACKER, 2)) as other,
    ):
        statuses = [_spray(one if n % 2 else other, 1)[0] for n in range(LIMIT)]
        assert statuses == [401] * LIMIT
        assert _spray(one, 1) == [429]
        assert _spray(other, 1) == [429]


def test_a_burst_of_parallel_attempts_checks_at_most_the_limit_of_passwords(
    two_processes: list[Runtime],
) -> None:
    """Sent at the same moment to two processes, the attempts cannot all pass before one is counted."""
    apps = [create_app(runtime) for runtime in two_processes]
    burst = 4 * LIMIT
    clients = [TestClient(apps[n % 2], base_url=BASE_URL, client=(ATTACKER, n)) for n in range(burst)]
    tokens = [csrf_from(client.get("/login").text) for client in clients]
    start = threading.Barrier(burst)
    statuses: list[int] = []

    def guess(n: int) -> None:
        start.wait()
        form = {"email": f"victim{n}@example.com", "password": "Winter2026!", "csrf_token": tokens[n]}
        statuses.append(clients[n].post("/login", data=form, follow_redirects=False).status_code)

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(statuses) == burst and set(statuses) <= {401, 429}
    assert 1 <= statuses.count(401) <= LIMIT, statuses
    with two_processes[0].sessions() as session:
        assert session.scalar(select(func.count()).select_from(LoginAttempt)) == statuses.count(401)


# -- the address `postdesk serve` sees behind a reverse proxy -------------------------------------


@pytest.fixture
def served_app(throttled: Runtime, monkeypatch: pytest.MonkeyPatch) -> object:
    """The ASGI app exactly as ``postdesk serve`` hands it to uvicorn, with uvicorn's own wrapping."""
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    started: dict[str, object] = {}

    def capture(app: object, **options: object) -> None:
        started.update(options, app=app)

    monkeypatch.setattr(uvicorn, "run", capture)
    monkeypatch.setattr(server, "settle_heap", lambda: None)  # the test run's heap is not to be frozen
    server.run_server(throttled, host="127.0.0.1", port=8025, with_worker=False)
    options = dict(started)
    config = uvicorn.Config(options.pop("app"), **options)  # type: ignore[arg-type]
    config.load()
    return config.loaded_app


def test_behind_a_proxy_on_the_same_host_each_forwarded_client_has_its_own_count(
    served_app: object, browsers: Browsers
) -> None:
    proxy = browsers("127.0.0.1", app=served_app)
    attacker = {"x-forwarded-for": ATTACKER}
    for n in range(LIMIT):
        assert attempt(proxy, f"victim{n}@example.com", "Winter2026!", **attacker).status_code == 401
    assert attempt(proxy, AGENT, AGENT_PASSWORD, **attacker).status_code == 429
    assert attempt(proxy, AGENT, AGENT_PASSWORD, **{"x-forwarded-for": "203.0.113.20"}).status_code == 303


def test_a_client_that_is_not_a_trusted_proxy_cannot_choose_its_address(
    served_app: object, browsers: Browsers
) -> None:
    direct = browsers(ATTACKER, app=served_app)
    for n in range(LIMIT):
        spoofed = {"x-forwarded-for": f"203.0.113.{n + 1}"}
        assert attempt(direct, f"victim{n}@example.com", "Winter2026!", **spoofed).status_code == 401
    response: httpx.Response = attempt(direct, AGENT, AGENT_PASSWORD, **{"x-forwarded-for": "203.0.113.99"})
    assert response.status_code == 429


def test_the_housekeeping_purge_deletes_only_attempts_older_than_the_window(
    browsers: Browsers, throttled: Runtime
) -> None:
    _spray(browsers("203.0.113.5"), 1)
    with throttled.sessions() as session:
        session.add(LoginAttempt(client=ATTACKER, account="x", attempted_at=utcnow() - WINDOW))
        session.commit()
        assert purge_old_attempts(session, LoginThrottle.from_settings(throttled.settings)) == 1
        session.commit()
    assert [row.client for row in _stored_attempts(throttled)] == ["203.0.113.5"]
