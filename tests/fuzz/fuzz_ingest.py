"""Fuzz the ingest step: every input must end as an article or in quarantine, and nothing may escape.

    python -m tests.fuzz.fuzz_ingest [--seconds N] [--seed S] [--out DIR] [--database-url URL]

Each input is either a corpus message with bytes mutated, or a MIME tree built to be structurally valid
but nasty (random nesting, bogus charsets, broken base64 and quoted-printable, odd header folding, 8-bit
and NUL bytes in headers). It is parsed, then stored and processed by the real pipeline against a
throw-away SQLite database, exactly as fetched mail is. A finding is an exception that escapes
``parse_message`` (other than ``MailParseError``) or ``process_rows``, a message the pipeline could only
quarantine because it crashed, a quarantined message whose stored bytes differ from what came in, an
attachment stored with the wrong size, or an input that took too long. Each finding is saved as
``DIR/finding-<digest>.eml`` with a ``.txt`` report beside it; the exit status is 1 if there was any.

The generators take their decisions from a ``Choices``: ``RandomChoices`` here, and a hypothesis
adapter in ``tests/mail/test_fuzz_properties.py``, so the property tests shrink what they find.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import itertools
import logging
import os
import quopri
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy import insert, select

from postdesk.config import Settings
from postdesk.db.models import Attachment, Channel, InboundMessage, InboundStatus
from postdesk.db.session import transaction
from postdesk.ingest.process import StoredRow, process_rows
from postdesk.mail import MailParseError, parse_message
from postdesk.runtime import Runtime, bootstrap
from postdesk.storage import read_bytes, store_many

T = TypeVar("T")
CORPUS = Path(__file__).resolve().parent.parent / "mail" / "corpus"
OWN_ADDRESS = "support@contoso.example"
# How the pipeline words a quarantine it fell back to because processing raised (see process.py).
CRASH_REASONS = ("Postdesk could not process it", "Postdesk could not store it")
SLOW_SECONDS = 10.0


class Choices(Protocol):
    """Where a generator gets its decisions from."""

    def pick(self, options: Sequence[T]) -> T: ...

    def number(self, low: int, high: int) -> int: ...

    def blob(self, max_size: int) -> bytes: ...


class RandomChoices:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def number(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def blob(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


# --- what nasty mail is made of ---------------------------------------------------------------------

NEWLINES = (b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r")
SENDERS = (
    b"Jana Novak <jana.novak@example.org>", b"jana.novak@example.org",
    b"=?utf-8?b?SmFuYSBOb3bDoWs=?= <j@example.org>",
    b"<>", b"", b"undisclosed-recipients:;", b"Bj\xc3\xb6rn <bjorn@example.se>", b"\xff\xfe <x@example.org>",
    b"a\x00b@example.org", b'"' + b"N" * 300 + b'" <long.name@example.org>', b"x@" + b"d" * 300 + b".example",
    OWN_ADDRESS.encode(), b"MAILER-DAEMON@example.net", b'"(<' * 40, b"a@b, c@d, e@f",
)  # fmt: skip
SUBJECTS = (
    b"Printer on fire", b"Re: [Ticket#1] Printer", b"=?utf-8?q?Caf=C3=A9?=", b"=?x-bogus?b?////?=",
    b"=?utf-8?b?not base64!?=", b"=?utf-8?q?unterminated", b"Automatic reply: away", b"\xe4\xf6\xfc latin-1",
    b"A" * 3000, b"Re: " * 400, b"a\x00b\x07c", b"\xe2\x80\xaeexe.txt", b"=?utf-8?q?a?= =?utf-7?b?+AGE-?=",
    b"",
)  # fmt: skip
MESSAGE_IDS = (
    b"<m1@example.org>", b"<m2@example.org>", b"<" + b"x" * 997 + b">", b"x" * 998 + b"@example.org",
    b"no-brackets@example.org", b"<>", b"<a b@c>", b"<\x00@x>", b"<" * 60, b"<\xff\xfe@example.org>",
)  # fmt: skip
EXTRA_HEADERS = (
    b"X-Loop: support@contoso.example", b"X-Postdesk-Ticket: 1", b"Auto-Submitted: auto-replied",
    b"Precedence: bulk", b"Return-Path: <>", b"In-Reply-To: <m1@example.org>",
    b"References: " + b"<r@x> " * 300,
    b"Date: Mon, 32 Foo 99999 25:61:61 +9999", b"Date: \xff", b"Date: Thu, 26 Mar 2026 10:00:00 +0100",
    b"X-MS-Exchange-Message-Is-NDR: ", b"List-Id: <list.example.org>", b"MIME-Version: 1.0 (\xff)",
    b"X-\x00: nul in the name", b" leading: whitespace", b"NoColonHere", b": empty name",
    b"Reply-To: a@b, c@d",
    b"X-Long: " + b"v" * 70_000, b"To: " + b"a@example.org, " * 400, b"Content-Type: text/plain",
    b"Content-Transfer-Encoding: base64", b"Subject: second subject",
)  # fmt: skip
CHARSETS = (
    b"utf-8", b"UTF-8", b"us-ascii", b"iso-8859-1", b"windows-1252", b"gb2312", b"iso-2022-jp", b"shift_jis",
    b"utf-16", b"utf-16-le", b"utf-32", b"utf-7", b"unknown-8bit", b"x-bogus", b"punycode", b"idna",
    b"base64", b"zlib", b"rot13", b"undefined", b"", b'"', b"utf-8\x00", b"\xc3\xbc", b"a" * 300, b"cp65001",
)  # fmt: skip
LEAF_TYPES = (
    b"text/plain", b"text/plain", b"text/html", b"text/html", b"image/svg+xml", b"image/png",
    b"application/octet-stream", b"application/zip", b"application/ms-tnef", b"message/delivery-status",
    b"text/rfc822-headers", b"message/rfc822", b"multipart/mixed", b"text", b"/", b"text/",
    b"x/" + b"y" * 300,
    b"TEXT/HTML", b"text/plain\x00",
)  # fmt: skip
TRANSFER_ENCODINGS = (
    b"7bit", b"8bit", b"binary", b"base64", b"base64", b"quoted-printable", b"quoted-printable",
    b"x-uuencode", b"bogus", b"BASE64 ", b"",
)  # fmt: skip
BODIES = (
    b"Hello, my printer is on fire.", b"<p onclick=x()>Hi<script>alert(1)</script></p>",
    b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>',
    b'<div style="position:fixed;top:0;width:expression(alert(1));background:url(https://t.example/p)">x</div>',
    b'<a href="javascript:alert(1)">a</a><a href="data:text/html,x">b</a><img src="https://t.example/o.gif">',
    b"\x00" * 16, b"caf\xc3\xa9 \xe9 \x80", b"=?utf-8?q?x?=", b"--b0\r\n", b"begin 644 x\r\n", b"\x1b$B",
    b"A" * 5000, b"<" * 3000, b"<div>" * 1200, b"=\r\n", b"=ZZ", b"\xef\xbb\xbfBOM", b"\xed\xa0\x80",
)  # fmt: skip
DISPOSITION_PARAMETERS = (
    b'filename="../../etc/passwd"', b'filename="C:\\\\Windows\\\\evil.exe"', b"filename*=utf-8''a%00b.txt",
    b"filename*=utf-8''photo%E2%80%AEgpj.exe", b'filename="' + b"n" * 500 + b'.pdf"',
    b"filename*=bogus''%FF%FE",
    b"filename*0*=utf-8''part; filename*1=two.txt", b'filename="=?utf-8?b?w6TDtsO8LnR4dA==?="',
    b'filename="CON.txt"', b'filename="\xff\xfe.bin"', b"filename=", b'filename="a"; filename="b"',
    b"filename*=utf-8'en'%", b'filename="."', b'filename="/"', b'filename="x.svg"',
)  # fmt: skip
DISPOSITIONS = (b"", b"inline", b"attachment", b"attachment; ", b"inline; ", b"bogus;;;")
CONTENT_IDS = (b"", b"", b"<img1@example.org>", b"<>", b"<" + b"c" * 2000 + b">")
MULTIPART_SUBTYPES = (
    b"mixed", b"mixed", b"alternative", b"related", b"report; report-type=delivery-status", b"digest",
    b'signed; protocol="application/pgp-signature"', b"x-weird",
)  # fmt: skip
_unique = itertools.count()


def nasty_message(choose: Choices, *, depth: int = 4) -> bytes:
    """A message whose MIME tree is shaped like mail but made of hostile and broken pieces."""
    newline = choose.pick(NEWLINES)
    return _message(choose, depth, newline, parent=b"")


@dataclass(frozen=True)
class _Entity:
    header_lines: list[bytes]  # the Content-* fields
    body: bytes


def _message(choose: Choices, depth: int, newline: bytes, *, parent: bytes) -> bytes:
    entity = _entity(choose, depth, newline, parent=parent)
    return _join_lines([*_message_headers(choose), *entity.header_lines], newline) + entity.body


def _message_headers(choose: Choices) -> list[bytes]:
    unique_id = b"<%d@example.org>" % next(_unique)
    headers = [
        b"From: " + choose.pick(SENDERS),
        b"To: " + OWN_ADDRESS.encode(),
        b"Subject: " + choose.pick(SUBJECTS),
        b"Message-ID: " + choose.pick((*[unique_id] * 30, *MESSAGE_IDS)),
        b"MIME-Version: 1.0",
    ]
    headers += [choose.pick(EXTRA_HEADERS) for _ in range(choose.number(0, 3))]
    return [_fold(choose, header) for header in headers]


def _entity(choose: Choices, depth: int, newline: bytes, *, parent: bytes) -> _Entity:
    """One MIME entity: a leaf, a multipart or an embedded message."""
    kind = choose.pick(("leaf", "leaf", "multipart", "message")) if depth > 0 else "leaf"
    if kind == "multipart":
        return _multipart(choose, depth, newline, parent=parent)
    if kind == "message":
        embedded = _message(choose, depth - 1, newline, parent=parent)
        return _Entity([b"Content-Type: " + choose.pick((b"message/rfc822", b"message/global"))], embedded)
    return _leaf(choose, newline)


def _multipart(choose: Choices, depth: int, newline: bytes, *, parent: bytes) -> _Entity:
    boundary = choose.pick(
        (
            b"b%d" % next(_unique),
            b"b%d" % next(_unique),
            parent,  # the same boundary as the enclosing multipart
            parent + b"x",
            b"",
            b"with space",
            b"q" * 100,
        )
    )
    header = b"Content-Type: multipart/" + choose.pick(MULTIPART_SUBTYPES)
    if choose.number(0, 9):
        header += b"; boundary=" + choose.pick((b'"%s"', b"%s")) % boundary
    delimiter = b"--" + boundary
    pieces = [choose.pick((b"", *BODIES[:3])) + newline]  # the preamble
    for _ in range(choose.number(0, 4)):
        child = _entity(choose, depth - 1, newline, parent=boundary)
        pieces.append(delimiter + newline + _join_lines(child.header_lines, newline) + child.body + newline)
    if choose.number(0, 3):
        pieces.append(delimiter + b"--" + newline)
    pieces.append(choose.pick((b"", b"epilogue", *BODIES[:2])))
    return _Entity([_fold(choose, header)], b"".join(pieces))


def _leaf(choose: Choices, newline: bytes) -> _Entity:
    content_type = choose.pick(LEAF_TYPES)
    charset = choose.pick(CHARSETS)
    encoding = choose.pick(TRANSFER_ENCODINGS)
    headers = [b"Content-Type: " + content_type + (b"; charset=" + charset if choose.number(0, 2) else b"")]
    if encoding:
        headers.append(b"Content-Transfer-Encoding: " + encoding)
    disposition = choose.pick(DISPOSITIONS)
    if disposition:
        parameter = choose.pick(DISPOSITION_PARAMETERS) if disposition.endswith(b" ") else b""
        headers.append(b"Content-Disposition: " + disposition + parameter)
    content_id = choose.pick(CONTENT_IDS)
    if content_id:
        headers.append(b"Content-ID: " + content_id)
    payload = choose.pick(BODIES) + choose.blob(64)
    body = _transfer_encode(choose, encoding.strip().lower(), payload, newline)
    return _Entity([_fold(choose, header) for header in headers], body)


def _transfer_encode(choose: Choices, encoding: bytes, payload: bytes, newline: bytes) -> bytes:
    if encoding == b"base64":
        encoded = base64.encodebytes(payload).replace(b"\n", newline)
        damage: tuple[bytes, ...] = (b"", b"!@#", b"=", b"==\n==", b"\x00", b"A")
    elif encoding == b"quoted-printable":
        encoded = quopri.encodestring(payload).replace(b"\n", newline)
        damage = (b"", b"=Z9", b"=", b"=\r", b"=" + newline, b"\xff")
    elif encoding == b"x-uuencode":
        lines = [binascii.b2a_uu(payload[i : i + 45]) for i in range(0, len(payload), 45)]
        encoded = b"begin 644 file.bin\n" + b"".join(lines) + b"`\nend\n"
        damage = (b"", b"begin 644", b"\x7f\x7f", b"end")
    else:
        return payload
    if not encoded:
        return choose.pick(damage)
    position = choose.number(0, len(encoded))
    # Damage in the middle, or the encoded text cut short.
    return encoded[:position] + choose.pick(damage) + encoded[position:] * choose.number(0, 1)


_FOLDS = (b" ", b" ", b"\r\n ", b"\r\n\t", b"\n ", b"\r\n \r\n ")
# A line break without whitespace after it ends the header there: the rest becomes a malformed line.
_BROKEN_FOLDS = (*_FOLDS, b"\r\n", b"\n")


def _fold(choose: Choices, header: bytes) -> bytes:
    """Fold a header line at random spaces: correctly, with a tab, or now and then broken."""
    if len(header) > 4096 or not choose.number(0, 2):
        return header
    separators = _BROKEN_FOLDS if not choose.number(0, 15) else _FOLDS
    words = header.split(b" ")
    folded = words[0]
    for word in words[1:]:
        folded += choose.pick(separators) + word
    return folded


def _join_lines(lines: list[bytes], newline: bytes) -> bytes:
    return b"".join(line + newline for line in lines) + newline


# --- mutating corpus messages -----------------------------------------------------------------------

FRAGMENTS = (
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"--", b": ", b"=?", b"?=", b"=?utf-8?q?", b"=?x?b?", b"\x00",
    b"\xff", b"\xc3", b"\x1b$B", b"=\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Type: text/html; charset=utf-16\r\n",
    b"Content-Disposition: attachment; filename*=", b"<script>", b"\xe2\x80\xae", b"\t", b" ",
)  # fmt: skip


def corpus_messages() -> list[bytes]:
    """Every committed corpus message, the hostile ones in ``corpus/hostile/`` included."""
    return [path.read_bytes() for path in sorted(CORPUS.glob("**/*.eml"))]


def mutate(raw: bytes, choose: Choices) -> bytes:
    """``raw`` with a few bytes inserted, deleted, changed, cut off or repeated."""
    data = bytearray(raw)
    for _ in range(choose.number(1, 8)):
        position = choose.number(0, len(data))
        action = choose.pick(("insert", "delete", "flip", "truncate", "repeat"))
        if action == "insert":
            data[position:position] = choose.pick((*FRAGMENTS, choose.blob(8)))
        elif action == "delete":
            del data[position : position + choose.number(1, 64)]
        elif action == "flip" and position < len(data):
            data[position] = choose.number(0, 255)
        elif action == "truncate":
            del data[position:]
        else:
            data[position:position] = data[position : position + choose.number(1, 200)] * choose.number(1, 20)
    return bytes(data)


# --- the ingest step under test ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """Where one input ended up after ``process_rows``."""

    raw: bytes
    status: InboundStatus
    reason: str
    article_id: int | None
    spooled: bytes  # what the spool holds for the row
    attachment_sizes: tuple[tuple[int, int], ...]  # (recorded size, stored file size) per attachment


def problems(ending: Ending) -> list[str]:
    """Each way the ending breaks the promise that mail becomes an article or waits in quarantine."""
    found = []
    if ending.status is InboundStatus.STORED:
        found.append("still stored: processing neither wrote an article nor quarantined it")
    if ending.status in {InboundStatus.PROCESSED, InboundStatus.DUPLICATE} and ending.article_id is None:
        found.append(f"{ending.status.value} without an article")
    if ending.status is InboundStatus.QUARANTINED:
        if not ending.reason:
            found.append("quarantined without a reason")
        if ending.reason.startswith(CRASH_REASONS):
            found.append(f"quarantined because processing crashed: {ending.reason}")
    if ending.spooled != ending.raw:
        found.append("the spool does not hold the exact bytes that came in")
    found += [
        f"attachment recorded as {recorded} bytes but stored as {stored}"
        for recorded, stored in ending.attachment_sizes
        if recorded != stored
    ]
    return found


class IngestBench:
    """One channel in a migrated database; ``ingest`` stores messages as a fetch does, then processes them."""

    def __init__(self, runtime: Runtime, *, email: str = OWN_ADDRESS) -> None:
        self.runtime = runtime
        self._uids = itertools.count(1)
        with transaction(runtime.sessions) as session:
            channel = session.scalar(select(Channel).where(Channel.email == email))
            if channel is None:
                channel = Channel(email=email)
                session.add(channel)
                session.flush()
            self.channel_id = channel.id

    def store(self, raws: Sequence[bytes]) -> list[StoredRow]:
        digests = store_many(self.runtime.settings.spool_dir, list(raws))
        rows = [
            {
                "channel_id": self.channel_id,
                "folder": "INBOX",
                "uidvalidity": 1,
                "uid": next(self._uids),
                "sha256": digest,
                "size": len(raw),
                "status": InboundStatus.STORED,
            }
            for raw, digest in zip(raws, digests, strict=True)
        ]
        with transaction(self.runtime.sessions) as session:
            returning = insert(InboundMessage).returning(InboundMessage.id, sort_by_parameter_order=True)
            ids = session.scalars(returning, rows)
            return [StoredRow(row_id, len(raw)) for row_id, raw in zip(ids, raws, strict=True)]

    def ingest(self, raws: Sequence[bytes]) -> list[Ending]:
        rows = self.store(raws)
        process_rows(self.runtime, rows)
        return [self._ending(row.id, raw) for row, raw in zip(rows, raws, strict=True)]

    def _ending(self, row_id: int, raw: bytes) -> Ending:
        settings = self.runtime.settings
        with self.runtime.sessions() as session:
            row = session.get_one(InboundMessage, row_id)
            attachments = session.execute(
                select(Attachment.size, Attachment.sha256).where(Attachment.article_id == row.article_id)
            ).all()
            return Ending(
                raw=raw,
                status=row.status,
                reason=row.reason or "",
                article_id=row.article_id,
                spooled=read_bytes(settings.spool_dir, row.sha256),
                attachment_sizes=tuple(
                    (size, len(read_bytes(settings.attachments_dir, digest))) for size, digest in attachments
                ),
            )


def throwaway_runtime(data_dir: Path, *, database_url: str | None = None) -> Runtime:
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        secret_key="fuzz-secret-key-0123456789-abcdefghijklmnop",
    )
    return bootstrap(settings, apply_migrations=True)


# --- the fuzzing loop --------------------------------------------------------------------------------


class _CrashLog(logging.Handler):
    """Keeps the traceback the pipeline logs when it quarantines a message it could not process."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()
        if record.exc_info:
            self.last += "\n" + "".join(traceback.format_exception(*record.exc_info))


def next_input(choose: Choices, corpus: Sequence[bytes]) -> bytes:
    if choose.number(0, 1):
        return nasty_message(choose)
    return mutate(choose.pick(corpus), choose)


def try_one(bench: IngestBench, raw: bytes, crash_log: _CrashLog) -> str | None:
    """The report of a finding for ``raw``, or None if it ended as it should."""
    started = time.monotonic()
    try:
        parse_message(raw)
    except MailParseError:
        pass
    except Exception:
        return "parse_message raised\n" + traceback.format_exc()
    crash_log.last = ""
    try:
        [ending] = bench.ingest([raw])
    except Exception:
        return "process_rows raised\n" + traceback.format_exc()
    found = problems(ending)
    elapsed = time.monotonic() - started
    if elapsed > SLOW_SECONDS:
        found.append(f"took {elapsed:.1f} s (limit {SLOW_SECONDS:.0f} s)")
    return "\n".join([*found, crash_log.last]) if found else None


def save_finding(out: Path, raw: bytes, report: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"finding-{hashlib.sha256(raw).hexdigest()[:16]}.eml"
    path.write_bytes(raw)
    path.with_suffix(".txt").write_text(report + "\n", encoding="utf-8")
    return path


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz.fuzz_ingest", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed for a reproducible run")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"), help="where findings are saved")
    parser.add_argument(
        "--database-url",
        default=None,
        help="an empty database to use instead of a throw-away SQLite file (PostgreSQL refuses more)",
    )
    return parser.parse_args(argv)


def _scratch_directory() -> str | None:
    # The spool fsyncs every message; on a RAM disk that costs nothing and the fuzzer tries far more inputs.
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _arguments(argv)
    seed = arguments.seed if arguments.seed is not None else random.SystemRandom().randrange(2**32)
    choose = RandomChoices(random.Random(seed))
    crash_log = _CrashLog()
    logging.getLogger("postdesk").addHandler(crash_log)
    logging.getLogger("postdesk").propagate = False  # the pipeline's own error log would flood the terminal
    corpus = corpus_messages()
    # Said first: an input that hangs is found again by running with the same seed.
    print(f"fuzzing ingest for {arguments.seconds:.0f} s with --seed {seed}", file=sys.stderr)
    tried = found = 0
    with tempfile.TemporaryDirectory(prefix="postdesk-fuzz-", dir=_scratch_directory()) as scratch:
        runtime = throwaway_runtime(Path(scratch), database_url=arguments.database_url)
        bench = IngestBench(runtime)
        deadline = time.monotonic() + arguments.seconds
        while time.monotonic() < deadline:
            raw = next_input(choose, corpus)
            tried += 1
            report = try_one(bench, raw, crash_log)
            if report is not None:
                found += 1
                path = save_finding(arguments.out, raw, report)
                print(f"finding {found}: {report.splitlines()[0]} (input saved to {path})", file=sys.stderr)
        runtime.engine.dispose()
    print(f"{tried} inputs in {arguments.seconds:.0f} s, {found} findings (seed {seed})", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
