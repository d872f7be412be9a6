"""classify: auto-replies, bulk mail, bounces, loops and our own mail, one behaviour per test."""

from __future__ import annotations

import pytest

from postdesk.mail import Classification, classify, parse_message
from tests.mail import parse_corpus

OWN = frozenset({"Support@Contoso.com"})


def _classify_headers(headers: str, *, own: frozenset[str] = OWN) -> Classification:
    raw = f"From: Pat <pat@example.com>\r\nTo: support@contoso.com\r\n{headers}\r\n\r\nHello".encode()
    return classify(parse_message(raw), own_addresses=own)


def test_it_classifies_an_exchange_out_of_office_reply_as_an_auto_reply() -> None:
    result = classify(parse_corpus("autoreply-ooo.eml"), own_addresses=OWN)
    assert result.auto_reply
    assert "Auto-Submitted: auto-replied" in result.reasons
    assert not (result.bulk or result.bounce or result.loop)


def test_it_recognises_a_german_out_of_office_subject_without_any_header() -> None:
    result = classify(parse_corpus("autoreply-german.eml"))
    assert result.auto_reply
    assert result.reasons == ("out-of-office subject",)


@pytest.mark.parametrize(
    "subject",
    [
        "Automatic reply: Printer",
        "Out of Office: Printer",
        "AUTOMATISCHE ANTWORT: Drucker",
        "Abwesenheitsnotiz: Drucker",
        "Réponse automatique : Imprimante",
        "Respuesta automática: Impresora",
        "Automatisch antwoord: Printer",
        "Risposta automatica: Stampante",
        "Resposta automática: Impressora",
        "Automatiskt svar: Skrivare",
        "自動応答: プリンター",
    ],
)
def test_it_recognises_out_of_office_subjects_in_common_languages(subject: str) -> None:
    assert _classify_headers(f"Subject: {subject}").auto_reply


def test_it_does_not_take_a_question_about_an_auto_reply_for_one() -> None:
    assert not _classify_headers("Subject: Re: how do I set up an automatic reply?").auto_reply


@pytest.mark.parametrize("value", ["auto-replied", "auto-generated", "auto-notified; owner-email=x@y"])
def test_it_treats_any_auto_submitted_value_but_no_as_automatic(value: str) -> None:
    assert _classify_headers(f"Auto-Submitted: {value}").auto_reply


def test_it_treats_auto_submitted_no_as_written_by_a_person() -> None:
    assert not _classify_headers("Auto-Submitted: no").auto_reply


@pytest.mark.parametrize("value", ["All", "OOF, AutoReply", "DR, RN, NRN, OOF, AutoReply"])
def test_it_treats_x_auto_response_suppress_as_automatic(value: str) -> None:
    assert _classify_headers(f"X-Auto-Response-Suppress: {value}").auto_reply


def test_it_ignores_x_auto_response_suppress_for_receipts_only() -> None:
    assert not _classify_headers("X-Auto-Response-Suppress: DR, RN").auto_reply


@pytest.mark.parametrize("header", ["X-Autoreply: yes", "X-Autorespond: vacation", "Precedence: auto_reply"])
def test_it_recognises_other_autoresponder_headers(header: str) -> None:
    assert _classify_headers(header).auto_reply


def test_it_classifies_a_mailing_list_message_as_bulk() -> None:
    result = classify(parse_corpus("mailing-list.eml"))
    assert result.bulk
    assert not result.auto_reply
    assert "list-id header present" in result.reasons


@pytest.mark.parametrize("value", ["bulk", "list", "junk", "Bulk"])
def test_it_classifies_bulk_precedence_as_bulk(value: str) -> None:
    assert _classify_headers(f"Precedence: {value}").bulk


def test_it_classifies_a_list_unsubscribe_header_as_bulk() -> None:
    assert _classify_headers("List-Unsubscribe: <mailto:leave@example.org>").bulk


def test_it_recognises_an_rfc_3464_bounce_and_the_bounced_message_id() -> None:
    result = classify(parse_corpus("bounce-dsn.eml"), own_addresses=OWN)
    assert result.bounce
    assert result.bounced_message_id == "<ticket-10042-article-3@helpdesk.contoso.com>"


def test_it_recognises_an_exchange_ndr_and_reads_the_id_from_text_rfc822_headers() -> None:
    result = classify(parse_corpus("exchange-ndr.eml"), own_addresses=OWN)
    assert result.bounce
    assert "Exchange non-delivery report" in result.reasons
    assert result.bounced_message_id == (
        "<DB9PR04MB84125B7C1D2E3F4A5B6C7D8E9F@DB9PR04MB8412.eurprd04.prod.outlook.com>"
    )


def test_it_reads_an_original_message_id_field_when_the_original_is_not_attached() -> None:
    raw = (
        b"From: MAILER-DAEMON@mx.example.net\r\nContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="r"\r\n\r\n--r\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n'
        b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n"
        b"Original-Message-ID: <lost-1@helpdesk.contoso.com>\r\n\r\n"
        b"Final-Recipient: rfc822; a@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--r--\r\n"
    )
    assert classify(parse_message(raw)).bounced_message_id == "<lost-1@helpdesk.contoso.com>"


def test_it_recognises_a_bounce_by_null_return_path_and_postmaster_sender() -> None:
    raw = b"Return-Path: <>\r\nFrom: postmaster@example.net\r\nSubject: Delivery failure\r\n\r\nfailed"
    result = classify(parse_message(raw))
    assert result.bounce
    assert result.bounced_message_id is None


def test_it_does_not_take_a_postmaster_with_a_return_path_for_a_bounce() -> None:
    raw = (
        b"Return-Path: <postmaster@example.net>\r\nFrom: postmaster@example.net\r\n\r\nPlease renew the cert"
    )
    assert not classify(parse_message(raw)).bounce


def test_it_treats_a_read_receipt_as_automatic_but_not_as_a_bounce() -> None:
    result = _classify_headers(
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="x"'
    )
    assert (result.auto_reply, result.bounce) == (True, False)


def test_it_gives_no_bounced_message_id_for_mail_that_is_not_a_bounce() -> None:
    assert classify(parse_corpus("forwarded-message-rfc822.eml")).bounced_message_id is None


def test_it_recognises_mail_from_our_own_address_in_any_case() -> None:
    result = classify(parse_message(b"From: SUPPORT@contoso.COM\r\n\r\nhi"), own_addresses=OWN)
    assert result.from_own_address


def test_it_detects_a_loop_when_x_loop_names_our_address() -> None:
    result = _classify_headers("X-Loop: Postdesk <support@contoso.com>")
    assert result.loop
    assert "x-loop names our address" in result.reasons


def test_it_ignores_x_loop_naming_someone_else() -> None:
    assert not _classify_headers("X-Loop: helpdesk@fabrikam.com").loop


def test_it_detects_an_exchange_inbox_rule_loop_through_our_mailbox() -> None:
    assert _classify_headers("X-MS-Exchange-Inbox-Rules-Loop: support@contoso.com").loop


def test_it_classifies_a_person_s_mail_as_nothing_special() -> None:
    result = classify(parse_corpus("outlook-plain-and-html.eml"), own_addresses=OWN)
    assert result == Classification(
        auto_reply=False,
        bulk=False,
        bounce=False,
        from_own_address=False,
        loop=False,
        reasons=(),
        bounced_message_id=None,
    )
