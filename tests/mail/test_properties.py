"""Property-based tests: everything that reads untrusted input survives arbitrary input."""

from __future__ import annotations

from html.parser import HTMLParser
from types import MappingProxyType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postdesk.mail import (
    Address,
    MailAttachment,
    MailParseError,
    ParsedMail,
    add_ticket_reference,
    classify,
    html_to_text,
    parse_message,
    safe_filename,
    sanitise_html,
    strip_reply_prefixes,
    thread_message_ids,
    ticket_numbers_in_subject,
)
from postdesk.mail.filenames import MAX_FILENAME_BYTES
from postdesk.mail.message import HEADER_FIELD_NAMES
from tests.mail import CORPUS

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CORPUS_FILES = sorted(path.read_bytes() for path in CORPUS.glob("*.eml"))
# Fragments that steer random bytes towards the parser's interesting corners.
MIME_FRAGMENTS = [
    b"\r\n", b"\n", b"\r\n\r\n", b"--", b"--b\r\n", b"--b--", b": ", b"=?", b"?=", b"=?utf-8?q?", b"=?x?b?",
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/html; charset=unknown-8bit\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n", b"Content-Disposition: attachment; filename*=",
    b"From: ", b"To: ", b"Date: ", b"Message-ID: <", b">", b"<", b'"', b"(", b")", b"\\", b";", b",", b"@",
    b"\x00", b"\xff", b"\xc3", b"\x1b$B", b"=\r\n", b"%", b"'", b"*0*=", b"<script>", b"begin 644 x\r\n",
]  # fmt: skip


@st.composite
def mutated_corpus_message(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(CORPUS_FILES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["insert", "delete", "flip", "truncate", "duplicate"]))
        if action == "insert":
            raw[position:position] = draw(st.sampled_from(MIME_FRAGMENTS) | st.binary(max_size=8))
        elif action == "delete":
            del raw[position : position + draw(st.integers(1, 64))]
        elif action == "flip" and position < len(raw):
            raw[position] = draw(st.integers(0, 255))
        elif action == "truncate":
            del raw[position:]
        else:
            raw[position:position] = raw[position : position + draw(st.integers(1, 200))]
    return bytes(raw)


mime_soup = st.lists(st.sampled_from(MIME_FRAGMENTS) | st.binary(max_size=12), max_size=40).map(b"".join)


def _parses_or_is_rejected(raw: bytes) -> None:
    try:
        mail = parse_message(raw)
    except MailParseError:
        return
    # Every string is storable as UTF-8 text in PostgreSQL: no surrogates, no NUL.
    for text in (mail.subject, mail.body_text, mail.body_html or "", *mail.defects):
        text.encode("utf-8")
        assert "\x00" not in text
    assert all(attachment.filename for attachment in mail.attachments)
    thread_message_ids(mail)
    classify(mail, own_addresses=frozenset({"support@contoso.com"}))


@FAST
@given(st.binary(max_size=3000))
def test_parse_message_raises_nothing_but_mail_parse_error_on_arbitrary_bytes(raw: bytes) -> None:
    _parses_or_is_rejected(raw)


@FAST
@given(mutated_corpus_message())
def test_parse_message_raises_nothing_but_mail_parse_error_on_mutated_corpus_files(raw: bytes) -> None:
    _parses_or_is_rejected(raw)


@FAST
@given(mime_soup)
def test_parse_message_raises_nothing_but_mail_parse_error_on_mime_fragments(raw: bytes) -> None:
    _parses_or_is_rejected(raw)


addresses = st.builds(Address, name=st.text(max_size=20), email=st.text(max_size=30))
attachments = st.builds(
    MailAttachment,
    filename=st.text(max_size=20),
    content_type=st.sampled_from(["message/rfc822", "text/rfc822-headers", "message/delivery-status", "x/y"]),
    content=st.binary(max_size=300) | mutated_corpus_message(),
    content_id=st.none() | st.text(max_size=10),
    inline=st.booleans(),
)
header_fields = st.dictionaries(
    st.sampled_from(HEADER_FIELD_NAMES), st.text(max_size=60) | st.sampled_from(["<>", "no", "bulk", "All"])
)
parsed_mails = st.builds(
    ParsedMail,
    message_id=st.none() | st.text(max_size=30),
    in_reply_to=st.lists(st.text(max_size=30), max_size=3).map(tuple),
    references=st.lists(st.text(max_size=30), max_size=5).map(tuple),
    subject=st.text(max_size=80),
    sender=st.none() | addresses,
    reply_to=st.lists(addresses, max_size=2).map(tuple),
    to=st.lists(addresses, max_size=2).map(tuple),
    cc=st.lists(addresses, max_size=2).map(tuple),
    date=st.none() | st.datetimes(),
    body_text=st.text(max_size=200),
    body_html=st.none() | st.text(max_size=200),
    attachments=st.lists(attachments, max_size=3).map(tuple),
    header_fields=header_fields.map(MappingProxyType),
    defects=st.just(()),
    size=st.integers(0, 10**9),
)


@FAST
@given(parsed_mails, st.frozensets(st.text(max_size=30), max_size=3))
def test_classify_and_thread_message_ids_never_raise(mail: ParsedMail, own: frozenset[str]) -> None:
    result = classify(mail, own_addresses=own)
    assert result.bounced_message_id is None or result.bounce
    ids = thread_message_ids(mail)
    assert len(ids) == len(set(ids))


TAGS = ["a", "img", "script", "svg", "style", "iframe", "p", "div", "b", "form", "object", "math", "td", "x"]
ATTRIBUTES = ["href", "src", "onclick", "onerror", "ONLOAD", "style", "srcset", "xlink:href", "formaction"]
VALUES = [
    "javascript:alert(1)", " JaVaScRiPt:x", "java\tscript:x", "jav&#x61;script:x", "&#106;avascript:x",
    "data:text/html,<script>x</script>", "data:image/png;base64,AAAA", "vbscript:x", "https://x.example/",
    "cid:a@b", "expression(alert(1))", "url(javascript:x)", "/relative",
]  # fmt: skip


SHORT_TEXT = st.text(max_size=10)


@st.composite
def html_soup(draw: st.DrawFn, text: st.SearchStrategy[str] = SHORT_TEXT, values: list[str] = VALUES) -> str:
    pieces = []
    for _ in range(draw(st.integers(0, 12))):
        tag = draw(st.sampled_from(TAGS))
        attributes = draw(
            st.lists(st.tuples(st.sampled_from(ATTRIBUTES), st.sampled_from(values)), max_size=3)
        )
        rendered = "".join(f' {name}="{value}"' for name, value in attributes)
        pieces.append(f"<{tag}{rendered}>" + draw(text) + draw(st.sampled_from(["", f"</{tag}>"])))
    return "".join(pieces)


class _Inspector(HTMLParser):
    """Reads sanitised output the way a browser would: tag names, attribute names, decoded values."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [(name, value or "") for name, value in attrs]


def _assert_safe(cleaned: str) -> None:
    assert "<script" not in cleaned.lower()
    inspector = _Inspector()
    inspector.feed(cleaned)
    inspector.close()
    assert not {"script", "svg", "iframe", "object", "style", "form", "math"} & set(inspector.tags)
    for name, value in inspector.attributes:
        assert not name.startswith("on")
        compact = "".join(value.split()).lower()
        assert not compact.startswith(("javascript:", "vbscript:", "data:text"))
        if name == "style":
            assert "expression(" not in compact
            assert "url(" not in compact


@FAST
@given(html_soup() | st.text(max_size=300))
def test_sanitise_html_never_lets_script_through(html: str) -> None:
    _assert_safe(sanitise_html(html))
    _assert_safe(sanitise_html(html, allow_remote_images=True))


@FAST
@given(
    html_soup(
        text=st.text(st.characters(blacklist_characters="<>&"), max_size=10),
        values=[value for value in VALUES if "<" not in value],
    )
)
def test_html_to_text_leaves_no_markup_behind(html: str) -> None:
    # Links are written as "text <address>"; anything else in angle brackets would be a leftover tag.
    text = html_to_text(html)
    for value in VALUES:
        text = text.replace(f" <{value.removeprefix('mailto:')}>", "")
    assert "<" not in text
    assert ">" not in text


@FAST
@given(st.text(max_size=300))
def test_html_to_text_never_raises(html: str) -> None:
    assert "\x00" not in html_to_text(html)


@FAST
@given(st.none() | st.text(max_size=400), st.text(max_size=30))
def test_safe_filename_is_never_empty_never_long_and_never_a_path(name: str | None, fallback: str) -> None:
    safe = safe_filename(name, fallback=fallback)
    assert safe
    assert len(safe.encode("utf-8")) <= MAX_FILENAME_BYTES
    assert not {"/", "\\", "\x00"} & set(safe)
    assert not safe.startswith(".")
    assert not safe.endswith((".", " "))


@FAST
@given(st.text(max_size=120), st.integers(0, 10**12))
def test_add_ticket_reference_is_idempotent_and_findable(subject: str, number: int) -> None:
    referenced = add_ticket_reference(subject, number)
    assert number in ticket_numbers_in_subject(referenced)
    assert add_ticket_reference(referenced, number) == referenced


@FAST
@given(st.text(max_size=120))
def test_strip_reply_prefixes_is_idempotent(subject: str) -> None:
    stripped = strip_reply_prefixes(subject)
    assert strip_reply_prefixes(stripped) == stripped
