"""`postdesk demo` as a new user tries it: sign in, connect a sandbox mailbox, mail it, see the ticket."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import add_user_mailbox
from tests.support.postgres import free_port

pytestmark = pytest.mark.browser


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTDESK_")}
    env["COLUMNS"] = "200"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "postdesk",
            "demo",
            "--port",
            str(port),
            "--sandbox-port",
            str(sandbox_port),
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    password, lines = None, []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and password is None:
        line = process.stdout.readline()
        lines.append(line)
        if match := re.search(r"with password (\S+)", line):
            password = match.group(1)
    assert password, "".join(lines)
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    try:
        yield url, f"https://127.0.0.1:{sandbox_port}", password
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_new_user_connects_a_sandbox_mailbox_and_mail_becomes_a_ticket(
    page: Page, demo: tuple[str, str, str]
) -> None:
    url, sandbox_url, password = demo
    page.goto(f"{url}/login")
    page.get_by_label("Email address").fill("admin@example.com")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("link", name="Invoice 2026-1183 charged twice")).to_be_visible()

    page.get_by_role("link", name="Channels").click()
    add_user_mailbox(page)
    page.get_by_role("button", name="support@contoso.onmicrosoft.com").click()
    page.get_by_role("button", name="Accept").click()
    expect(page.locator("tr[data-email='support@contoso.onmicrosoft.com']")).to_contain_text("Connected")

    page.goto(f"{sandbox_url}/_sandbox/mail")
    page.get_by_label("To").select_option("support@contoso.onmicrosoft.com")
    page.get_by_label("Subject").fill("Demo: the coffee machine is leaking")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_text("Delivered to support@contoso.onmicrosoft.com")).to_be_visible()

    page.goto(f"{url}/tickets")
    for _ in range(120):
        if page.get_by_role("link", name="Demo: the coffee machine is leaking").count():
            break
        page.wait_for_timeout(500)
        page.reload()
    page.get_by_role("link", name="Demo: the coffee machine is leaking").click()
    expect(page.get_by_text("the printer in room 4 is smoking")).to_be_visible()
