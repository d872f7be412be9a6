"""Tests of ``postdesk.mail``; ``corpus/`` holds real-looking messages named for their case."""

from __future__ import annotations

from pathlib import Path

from postdesk.mail import ParsedMail, parse_message

CORPUS = Path(__file__).parent / "corpus"


def corpus_bytes(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def parse_corpus(name: str) -> ParsedMail:
    return parse_message(corpus_bytes(name))
