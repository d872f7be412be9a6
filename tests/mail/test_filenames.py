"""safe_filename: hostile attachment names become harmless ones."""

from __future__ import annotations

import pytest

from postdesk.mail import safe_filename
from postdesk.mail.filenames import MAX_FILENAME_BYTES


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Windows\\System32\\evil.exe", "evil.exe"),
        ("..\\..//mixed/../x.txt", "x.txt"),
        ("report\x00.pdf", "report.pdf"),
        ("line\r\nbreak.txt", "line break.txt"),
        (".htaccess", "htaccess"),
        ("...hidden", "hidden"),
        ("trailing. . .", "trailing"),
        ("invoice\u202etxt.exe", "invoicetxt.exe"),
        ('what?<is>"this"|*.txt', "what__is__this___.txt"),
        ("Angebot Müller.pdf", "Angebot Müller.pdf"),
    ],
)
def test_it_makes_hostile_names_safe(name: str, safe: str) -> None:
    assert safe_filename(name, fallback="attachment-1.bin") == safe


@pytest.mark.parametrize("name", ["CON", "con.txt", "PRN.pdf", "aux", "NUL.tar.gz", "COM1.log", "lpt9"])
def test_it_defuses_windows_reserved_names(name: str) -> None:
    assert safe_filename(name, fallback="x") == f"_{name}"


def test_it_keeps_names_that_only_start_like_a_reserved_one() -> None:
    assert safe_filename("CONTRACT.pdf", fallback="x") == "CONTRACT.pdf"


@pytest.mark.parametrize("name", [None, "", "   ", "..", "/", "\\\\", "\x00\x01"])
def test_it_uses_the_fallback_when_nothing_is_left(name: str | None) -> None:
    assert safe_filename(name, fallback="attachment-3.pdf") == "attachment-3.pdf"


def test_it_is_never_empty_even_with_an_empty_fallback() -> None:
    assert safe_filename("..", fallback="..") == "attachment"


def test_it_shortens_long_names_to_200_bytes_keeping_the_extension() -> None:
    safe = safe_filename("ä" * 300 + ".pdf", fallback="x")
    assert len(safe.encode()) <= MAX_FILENAME_BYTES
    assert safe.endswith("ä.pdf")


def test_it_does_not_take_a_long_suffix_for_an_extension() -> None:
    safe = safe_filename("a" * 150 + "." + "b" * 100, fallback="x")
    assert safe == ("a" * 150 + "." + "b" * 100)[:MAX_FILENAME_BYTES]
