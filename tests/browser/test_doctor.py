"""An admin tests a broken mailbox's connection in headless Chromium and sees which layer failed and the
Exchange Online PowerShell that fixes it, swapped into the page without reloading it."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from postdesk.sandbox.submission import SubmissionServer
from tests.browser.conftest import MailDesk, sign_in_page

pytestmark = pytest.mark.browser


def test_an_admin_tests_a_mailbox_whose_smtp_auth_is_off_and_sees_the_fix(
    page: Page, mail_desk: MailDesk, smtp_submission: SubmissionServer
) -> None:
    smtp_submission.set_smtp_auth_disabled(mail_desk.mailbox, True)  # Exchange: SMTP AUTH off for the mailbox
    sign_in_page(page, mail_desk.url)
    page.goto(f"{mail_desk.url}/channels/{mail_desk.channel_id}")
    page.evaluate("window.postdeskTestMarker = 'same document'")

    page.get_by_role("button", name="Test connection").click()

    doctor = page.locator("#doctor")
    expect(doctor.locator("#doctor-outcome")).to_contain_text("Connection test failed at “SMTP AUTH”")
    expect(doctor.locator("tr[data-status='ok']")).to_have_count(8)
    failed = doctor.locator("tr[data-status='failed']")
    expect(failed).to_have_count(1)
    expect(failed).to_contain_text("SMTP AUTH")
    expect(failed).to_contain_text("SMTP AUTH is turned off for this mailbox or the whole tenant")
    expect(failed).to_contain_text("535 5.7.139")
    expect(failed.locator("pre")).to_have_text(
        f"Set-CASMailbox -Identity {mail_desk.mailbox} -SmtpClientAuthenticationDisabled $false"
    )
    expect(doctor.locator("tr[data-check='test_message']")).to_contain_text("Not run")
    assert page.evaluate("window.postdeskTestMarker") == "same document"  # swapped in, not reloaded
    assert smtp_submission.accepted == []
    page.screenshot(
        path=str(Path(__file__).parent.parent.parent / ".pytest_cache" / "doctor.png"), full_page=True
    )
