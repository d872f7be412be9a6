"""parse_message on the corpus and on hand-made broken input: one behaviour per test."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from postdesk.mail import MailParseError, parse_message
from postdesk.mail.message import MAX_HEADER_CHARS, MAX_PARTS, MAX_REFERENCES
from tests.mail import corpus_bytes, parse_corpus

SIMPLE = b"From: Pat <pat@example.com>\r\nTo: support@contoso.com\r\nSubject: Hello\r\n\r\nBody text\r\n"


def _with_body(headers: bytes, body: bytes) -> bytes:
    return b"From: pat@example.com\r\nSubject: test\r\nMIME-Version: 1.0\r\n" + headers + b"\r\n\r\n" + body


# --- not a mail message at all ---------------------------------------------------------------------


def test_it_rejects_empty_input() -> None:
    with pytest.raises(MailParseError):
        parse_message(b"")


def test_it_rejects_whitespace_only_input() -> None:
    with pytest.raises(MailParseError):
        parse_message(b"\r\n\r\n  \t\r\n")


def test_it_rejects_bytes_without_any_header_field() -> None:
    with pytest.raises(MailParseError):
        parse_message(b"just some text that someone saved as .eml\r\nand a second line\r\n")


def test_mail_parse_error_is_a_value_error() -> None:
    assert issubclass(MailParseError, ValueError)


def test_it_accepts_a_message_with_headers_and_no_body() -> None:
    mail = parse_message(b"From: pat@example.com\r\nSubject: only a subject\r\n")
    assert (mail.subject, mail.body_text) == ("only a subject", "")


def test_it_removes_blank_lines_before_the_first_header() -> None:
    mail = parse_message(b"\r\n\r\n" + SIMPLE)
    assert mail.subject == "Hello"
    assert any("blank lines" in defect for defect in mail.defects)


def test_it_records_the_size_of_the_raw_message() -> None:
    assert parse_message(SIMPLE).size == len(SIMPLE)


# --- headers ---------------------------------------------------------------------------------------


def test_it_decodes_rfc2047_subjects_across_charsets_and_folded_lines() -> None:
    mail = parse_corpus("rfc2047-subject-and-names.eml")
    assert mail.subject == "Änderung der Rechnungsadresse für Filiale Zürich"


def test_it_decodes_rfc2047_display_names() -> None:
    mail = parse_corpus("rfc2047-subject-and-names.eml")
    assert mail.sender is not None
    assert mail.sender.name == "Björn Åström"
    assert mail.reply_to[0].name == "Иван Петров"


def test_it_keeps_commas_inside_quoted_display_names() -> None:
    mail = parse_corpus("rfc2047-subject-and-names.eml")
    assert [address.name for address in mail.to] == ["Müller, Jürgen", "Support, Contoso"]


def test_it_reads_gb2312_labelled_names_as_gb18030() -> None:
    # 喆 is in GBK but not in GB2312; Chinese mail clients label GBK text as GB2312 anyway.
    assert parse_corpus("rfc2047-subject-and-names.eml").cc[0].name == "王喆"


def test_it_drops_empty_groups_from_address_lists() -> None:
    assert [address.email for address in parse_corpus("rfc2047-subject-and-names.eml").cc] == [
        "wang.zhe@example.cn"
    ]


def test_it_lower_cases_the_domain_and_keeps_the_local_part() -> None:
    sender = parse_corpus("rfc2047-subject-and-names.eml").sender
    assert sender is not None
    assert sender.email == "Bjorn.Astrom@example.se"


def test_it_drops_garbage_addresses() -> None:
    mail = parse_message(
        b'From: pat@example.com\r\nTo: nobody, "" <>, <@>, a@b, x@@y\r\nSubject: x\r\n\r\nhi'
    )
    assert [address.email for address in mail.to] == ["a@b"]


def test_it_removes_duplicate_recipients() -> None:
    mail = parse_message(b"From: pat@example.com\r\nTo: a@example.com, A <a@EXAMPLE.com>\r\n\r\nhi")
    assert len(mail.to) == 1


def test_it_reads_raw_utf8_in_headers() -> None:
    mail = parse_message("From: Zoë Brandt <zoe@example.com>\r\nSubject: Grüße\r\n\r\nhi".encode())
    assert mail.sender is not None
    assert (mail.sender.name, mail.subject) == ("Zoë Brandt", "Grüße")


def test_it_reads_raw_latin1_in_headers_and_notes_it() -> None:
    mail = parse_corpus("broken-charset-declared-utf8-is-latin1.eml")
    assert mail.sender is not None
    assert mail.sender.name == "José García"
    assert any("From header" in defect for defect in mail.defects)


def test_it_returns_no_sender_when_from_is_missing() -> None:
    assert parse_corpus("no-from.eml").sender is None


def test_it_normalises_the_message_id_to_angle_brackets() -> None:
    mail = parse_corpus("exchange-ndr.eml")
    assert mail.message_id == "<7d1e6f2a-0b3c-4d5e-8f90-1a2b3c4d5e6f@DB9PR04MB8412.eurprd04.prod.outlook.com>"


def test_it_wraps_a_bare_message_id() -> None:
    mail = parse_message(b"From: pat@example.com\r\nMessage-ID:  abc.123@example.com \r\n\r\nhi")
    assert mail.message_id == "<abc.123@example.com>"


def test_it_returns_no_message_id_when_it_is_missing() -> None:
    assert parse_corpus("no-message-id.eml").message_id is None


def test_it_returns_no_message_id_when_it_is_unusable() -> None:
    mail = parse_message(b"From: pat@example.com\r\nMessage-ID: not an id at all\r\n\r\nhi")
    assert mail.message_id is None
    assert any("Message-ID" in defect for defect in mail.defects)


def test_it_reads_in_reply_to_and_references_in_order() -> None:
    mail = parse_corpus("reply-chain.eml")
    assert mail.in_reply_to == ("<reply-2-3b4c5d6e@helpdesk.contoso.com>",)
    assert mail.references == (
        "<root-1a2b3c4d@contoso.com>",
        "<reply-1-2a3b4c5d@example.com>",
        "<reply-2-3b4c5d6e@helpdesk.contoso.com>",
    )


def test_it_removes_duplicate_references_and_ignores_comments() -> None:
    mail = parse_message(b"From: p@example.com\r\nReferences: <a@x> (first) <b@x> <a@x>\r\n\r\nhi")
    assert mail.references == ("<a@x>", "<b@x>")


def test_it_caps_references_keeping_the_root_and_the_newest() -> None:
    ids = b" ".join(b"<id-%d@example.com>" % number for number in range(300))
    mail = parse_message(b"From: p@example.com\r\nReferences: " + ids + b"\r\n\r\nhi")
    assert len(mail.references) == MAX_REFERENCES
    assert mail.references[0] == "<id-0@example.com>"
    assert mail.references[-1] == "<id-299@example.com>"


def test_it_converts_the_date_to_utc() -> None:
    assert parse_corpus("iso-2022-jp.eml").date == datetime(2026, 3, 9, 1, 12, 45, tzinfo=UTC)


def test_it_ignores_an_unparseable_date_and_notes_it() -> None:
    mail = parse_message(b"From: p@example.com\r\nDate: the day after tomorrow\r\n\r\nhi")
    assert mail.date is None
    assert any("Date" in defect for defect in mail.defects)


def test_it_reads_a_date_without_zone_as_utc() -> None:
    mail = parse_message(b"From: p@example.com\r\nDate: Mon, 2 Mar 2026 10:00:00 -0000\r\n\r\nhi")
    assert mail.date == datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def test_it_folds_whitespace_in_the_subject() -> None:
    mail = parse_message(b"From: p@example.com\r\nSubject: a\r\n \t  b\tc  \r\n\r\nhi")
    assert mail.subject == "a b c"


def test_it_returns_an_empty_subject_when_there_is_none() -> None:
    assert parse_message(b"From: p@example.com\r\n\r\nhi").subject == ""


def test_it_keeps_the_headers_classification_needs() -> None:
    fields = parse_corpus("autoreply-ooo.eml").header_fields
    assert fields["auto-submitted"] == "auto-replied"
    assert fields["x-auto-response-suppress"] == "All"
    assert "thread-topic" not in fields


def test_it_truncates_gigantic_headers_and_notes_it() -> None:
    raw = b"From: p@example.com\r\nSubject: " + b"A" * 5_000_000 + b"\r\n\r\nhi"
    mail = parse_message(raw)
    assert len(mail.subject) == MAX_HEADER_CHARS
    assert any("longer than 64 KB" in defect for defect in mail.defects)


def test_it_removes_nul_and_control_characters_from_headers() -> None:
    mail = parse_message(b"From: p@example.com\r\nSubject: a\x00b\x07c\r\n\r\nhi")
    assert mail.subject == "abc"


# --- bodies ----------------------------------------------------------------------------------------


def test_it_prefers_text_plain_in_multipart_alternative() -> None:
    mail = parse_corpus("outlook-plain-and-html.eml")
    assert mail.body_text.startswith("Hi team,\n\nthe VPN client asks")
    assert mail.body_html is not None
    assert "<b>Monday</b>" in mail.body_html


def test_it_decodes_windows_1252_quoted_printable() -> None:
    assert "every hour – since" in parse_corpus("outlook-plain-and-html.eml").body_text
    assert "20€" in parse_corpus("outlook-plain-and-html.eml").body_text


def test_it_converts_html_only_mail_to_text() -> None:
    mail = parse_corpus("outlook-html-only.eml")
    assert mail.body_text == (
        "Hello,\n\nsince this morning my laptop will not dock at desk 4.17. The screens stay black.\n\n"
        "Kind regards,\nMegan"
    )


def test_it_keeps_the_original_html() -> None:
    body_html = parse_corpus("outlook-html-only.eml").body_html
    assert body_html is not None
    assert 'src="cid:image001.png@01DA6D2B.8C5E1F20"' in body_html


def test_it_has_no_html_body_for_plain_text_mail() -> None:
    assert parse_corpus("no-message-id.eml").body_html is None


def test_it_decodes_iso_2022_jp() -> None:
    mail = parse_corpus("iso-2022-jp.eml")
    assert mail.subject == "お問い合わせ：請求書の再発行"
    assert "先月分の請求書を再発行していただけますでしょうか。" in mail.body_text
    assert mail.sender is not None
    assert mail.sender.name == "山田 太郎"


def test_it_reads_latin1_declared_as_utf8_and_notes_it() -> None:
    mail = parse_corpus("broken-charset-declared-utf8-is-latin1.eml")
    assert "Grüße an das Team in München, ¡gracias!" in mail.body_text
    assert any("declared as utf-8" in defect for defect in mail.defects)


def test_it_reads_utf8_declared_as_latin1() -> None:
    raw = _with_body(b"Content-Type: text/plain; charset=iso-8859-1", "Grüße".encode())
    assert parse_message(raw).body_text == "Grüße"


def test_it_guesses_unknown_8bit_text() -> None:
    mail = parse_corpus("unknown-8bit.eml")
    assert "the “premium” tier was quoted at € 1,200 – is that per year?" in mail.body_text
    assert any("unknown-8bit" in defect for defect in mail.defects)


@pytest.mark.parametrize("charset", ["x-unknown", "no-such-charset", "punycode", "base64", "../../x"])
def test_it_never_trusts_a_charset_it_does_not_know(charset: str) -> None:
    raw = _with_body(f"Content-Type: text/plain; charset={charset}".encode(), "café".encode())
    assert parse_message(raw).body_text == "café"


def test_it_replaces_undecodable_bytes_in_multibyte_charsets() -> None:
    raw = _with_body(b"Content-Type: text/plain; charset=shift_jis", "日本".encode("cp932") + b"\x81")
    mail = parse_message(raw)
    assert mail.body_text.startswith("日本")
    assert any("not valid shift_jis" in defect for defect in mail.defects)


def test_it_removes_nul_characters_from_bodies() -> None:
    assert parse_message(_with_body(b"", b"a\x00b")).body_text == "ab"


def test_it_normalises_line_endings_in_bodies() -> None:
    assert parse_message(_with_body(b"", b"one\r\ntwo\rthree\n")).body_text == "one\ntwo\nthree"


def test_it_concatenates_inline_text_parts_of_multipart_mixed() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nFirst part\r\n"
        b"--b\r\nContent-Type: image/png\r\nContent-Disposition: inline\r\n\r\nPNG\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nSecond part\r\n--b--\r\n"
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert mail.body_text == "First part\nSecond part"


def test_it_treats_a_named_text_part_as_an_attachment() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nSee file\r\n"
        b'--b\r\nContent-Type: text/plain; name="notes.txt"\r\n\r\nnot the body\r\n--b--\r\n'
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert mail.body_text == "See file"
    assert [attachment.filename for attachment in mail.attachments] == ["notes.txt"]


def test_it_shows_a_plain_text_footer_next_to_html_as_preformatted_text() -> None:
    body = (
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\n<footer> & co\r\n--b--\r\n"
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert mail.body_html == "<p>Hello</p>\n<pre>&lt;footer&gt; &amp; co</pre>"


# --- attachments -----------------------------------------------------------------------------------


def test_it_keeps_outlook_signature_images_as_inline_attachments() -> None:
    (image,) = parse_corpus("outlook-html-only.eml").attachments
    assert (image.filename, image.content_type, image.inline) == ("image001.png", "image/png", True)
    assert image.content_id == "image001.png@01DA6D2B.8C5E1F20"
    assert image.content.startswith(b"\x89PNG")


def test_it_keeps_apple_mail_inline_images_with_their_content_ids() -> None:
    mail = parse_corpus("apple-mail-inline-images.eml")
    assert [(a.filename, a.inline, a.content_id) for a in mail.attachments] == [
        ("Screenshot 1.png", True, "1C2D3E4F-5061-7283-94A5-B6C7D8E9F0A1"),
        ("Screenshot 2.png", True, "2D3E4F50-6172-8394-A5B6-C7D8E9F0A1B2"),
    ]


def test_it_takes_the_html_of_apple_mail_from_the_related_part() -> None:
    mail = parse_corpus("apple-mail-inline-images.eml")
    assert mail.body_text.startswith("Bonjour,")
    assert mail.body_html is not None
    assert "cid:1C2D3E4F-5061-7283-94A5-B6C7D8E9F0A1" in mail.body_html


def test_it_keeps_winmail_dat_as_an_attachment() -> None:
    (tnef,) = parse_corpus("winmail-dat.eml").attachments
    assert (tnef.filename, tnef.content_type) == ("winmail.dat", "application/ms-tnef")
    assert tnef.content.startswith(b"\x78\x9f\x3e\x22")


def test_it_names_an_unnamed_tnef_part_winmail_dat() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--b\r\nContent-Type: application/ms-tnef\r\n\r\nx\r\n--b--"
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert mail.attachments[0].filename == "winmail.dat"


def test_it_keeps_a_forwarded_message_as_an_eml_attachment() -> None:
    (forwarded,) = parse_corpus("forwarded-message-rfc822.eml").attachments
    assert (forwarded.filename, forwarded.content_type) == ("Invoice 2026-0311 overdue.eml", "message/rfc822")
    assert b"Message-ID: <inv-2026-0311@fabrikam.example>" in forwarded.content


def test_it_does_not_unpack_the_attachments_of_a_forwarded_message() -> None:
    mail = parse_corpus("forwarded-message-rfc822.eml")
    assert [attachment.content_type for attachment in mail.attachments] == ["message/rfc822"]
    assert b'filename="invoice.pdf"' in mail.attachments[0].content


def test_it_never_decompresses_zip_attachments() -> None:
    (archive,) = parse_corpus("zip-attachment.eml").attachments
    assert (archive.filename, archive.content_type) == ("report.zip", "application/zip")
    assert archive.content.startswith(b"PK\x03\x04")


def test_it_names_unnamed_parts_from_their_content_type() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment\r\n\r\n%PDF\r\n"
        b"--b\r\nContent-Type: image/png\r\nContent-Disposition: attachment\r\n\r\nPNG\r\n"
        b"--b\r\nContent-Type: application/x-unheard-of\r\n\r\n?\r\n--b--\r\n"
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert [a.filename for a in mail.attachments] == ["attachment-1.pdf", "image-2.png", "attachment-3.bin"]


def test_it_makes_hostile_attachment_filenames_safe() -> None:
    names = [attachment.filename for attachment in parse_corpus("filename-path-traversal.eml").attachments]
    assert names == ["passwd", "evil.exe", "invoice .pdf.exe", "_CON.txt", "photogpj.exe"]


def test_it_decodes_rfc2047_encoded_attachment_names() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b'--b\r\nContent-Type: application/pdf; name="=?utf-8?B?UsOpc3Vtw6kucGRm?="\r\n'
        b"Content-Disposition: attachment\r\n\r\n%PDF\r\n--b--\r\n"
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert mail.attachments[0].filename == "Résumé.pdf"


def test_it_decodes_rfc2231_encoded_attachment_names() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        b"--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''Angebot%20M%C3%BCller.pdf\r\n"
        b"\r\n%PDF\r\n--b--\r\n"
    )
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', body))
    assert mail.attachments[0].filename == "Angebot Müller.pdf"


def test_it_keeps_a_huge_attachment_intact() -> None:
    payload = bytes(range(256)) * 40_000  # 10 MB
    encoded = base64.encodebytes(payload)
    raw = corpus_bytes("huge-attachment.eml")
    start = raw.index(b"H4sI")
    end = raw.index(b"\r\n\r\n--logs-boundary-7f8e9d--")
    mail = parse_message(raw[:start] + encoded.replace(b"\n", b"\r\n") + raw[end:])
    assert mail.attachments[0].content == payload


def test_it_keeps_a_non_multipart_root_attachment() -> None:
    raw = _with_body(b'Content-Type: application/pdf; name="scan.pdf"', b"%PDF-1.7")
    mail = parse_message(raw)
    assert (mail.body_text, mail.attachments[0].filename) == ("", "scan.pdf")


# --- limits against hostile input ------------------------------------------------------------------


def test_it_stops_descending_past_twenty_levels_and_keeps_the_rest_as_an_attachment() -> None:
    mail = parse_corpus("nested-multipart.eml")
    assert mail.body_text == "See the attached chain."
    assert any("nested more than 20" in defect for defect in mail.defects)
    (rest,) = mail.attachments
    assert rest.content_type == "multipart/mixed"
    assert b"The innermost part." in rest.content


def test_it_survives_nesting_deeper_than_the_parser_can_recurse() -> None:
    body = b"hello"
    for level in range(3000):
        boundary = b"b%d" % level
        body = b'Content-Type: multipart/mixed; boundary="%s"\r\n\r\n--%s\r\n%s\r\n--%s--' % (
            boundary, boundary, body, boundary
        )  # fmt: skip
    mail = parse_message(b"From: p@example.com\r\nSubject: deep\r\n" + body)
    assert mail.subject == "deep"
    assert any("nested too deeply" in defect for defect in mail.defects)


def test_it_ignores_parts_beyond_the_limit() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % n for n in range(MAX_PARTS + 50))
    mail = parse_message(_with_body(b'Content-Type: multipart/mixed; boundary="b"', parts + b"--b--"))
    assert "part 498" in mail.body_text
    assert "part 499" not in mail.body_text  # the root multipart is part number one
    assert any(f"more than {MAX_PARTS}" in defect for defect in mail.defects)


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(b"From: " + b"a@example.com, " * 5000, id="huge-address-list"),
        pytest.param(b"From: " + b'"(<' * 20000, id="unbalanced-address-punctuation"),
        pytest.param(b"Content-Type: text/plain; " + b"a=b; " * 12000, id="thousands-of-parameters"),
        pytest.param(b"Subject: " + b"=?utf-8?q?=C3=A4?= " * 3000, id="thousands-of-encoded-words"),
        pytest.param(b"".join(b"To: a%d@example.com\r\n" % n for n in range(20000)), id="many-headers"),
    ],
)
@pytest.mark.timeout(60)  # a guard against a hang (quadratic parsing), not a speed target
def test_it_does_not_hang_on_hostile_headers(hostile: bytes) -> None:
    assert parse_message(b"Subject: x\r\n" + hostile + b"\r\n\r\nbody").subject == "x"
