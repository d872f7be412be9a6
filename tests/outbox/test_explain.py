"""Exchange Online's SMTP refusals become plain words and the right retry decision."""

from __future__ import annotations

import pytest

from postdesk.outbox.explain import Retry, explain_refusal


@pytest.mark.parametrize(
    ("code", "text", "words", "retry"),
    [
        (
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
            "Authenticated SMTP",
            Retry.NO,
        ),
        (
            535,
            "5.7.3 Authentication unsuccessful [SN4PR0601CA0002.namprd06.prod.outlook.com]",
            "SMTP.Send",
            Retry.NO,
        ),
        (
            554,
            "5.2.252 SendAsDenied; support@contoso.com not allowed to send as boss@contoso.com",
            "Send as",
            Retry.NO,
        ),
        (550, "5.7.60 SMTP; Client does not have permissions to send as this sender", "Send as", Retry.NO),
        (552, "5.3.4 Message size exceeds fixed maximum message size", "35 MB", Retry.NO),
        (
            554,
            "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed",
            "sending limit",
            Retry.LATER,
        ),
        (
            554,
            "5.2.0 STOREDRV.Submission.Exception:OutboundSpamException; Failed",
            "Restricted entities",
            Retry.NO,
        ),
        (451, "4.7.500 Server busy. Please try again later.", "tries again", Retry.SOON),
        (421, "4.7.66 Too many connections", "tries again", Retry.SOON),
        (550, "5.9.9 Something nobody has seen before", "server's reply", Retry.NO),
    ],
)
def test_each_refusal_is_explained(code: int, text: str, words: str, retry: Retry) -> None:
    explanation = explain_refusal(code, text)
    assert words in explanation.sentence()
    assert explanation.retry is retry


def test_a_bad_token_points_at_re_authentication() -> None:
    assert explain_refusal(535, "5.7.3 Authentication unsuccessful").sign_in
