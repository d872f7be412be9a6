"""Threading keys: ticket numbers in subjects, reply prefixes, and the message ids a reply points at.

Every function is linear in its input: subjects come from strangers and may be 64 KB of "Re: ".
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postdesk.mail.message import ParsedMail

DEFAULT_PREFIX = "Ticket#"
# Reply and forward markers of the mail clients our customers use, in their languages:
# Re/Fwd/Fw (English), AW/WG (German), SV/VS (Nordic), Antw/Doorst (Dutch), TR (French), RV (Spanish),
# Enc/Res (Portuguese), Odp/PD (Polish), RIF (Italian), YNT/ILT (Turkish), 回复/转发/回覆/轉寄/答复 (Chinese).
_REPLY_PREFIX = re.compile(
    r"(?:re|fwd?|aw|wg|sv|vs|antw|doorst|tr|rv|enc|res|odp|pd|rif|ynt|ilt|"
    r"回复|回覆|转发|轉寄|答复|答覆)"
    r"(?:\s*\[\d{1,9}\]|\s*\(\d{1,9}\)|\^\d{1,9})?[ \t]*[:：]",
    re.IGNORECASE,
)
_LEADING_SPACE = re.compile(r"\s*")
_WHITESPACE = re.compile(r"\s+")
_MAX_TICKET_DIGITS = 18  # fits a 64-bit integer column


def ticket_numbers_in_subject(subject: str, *, prefix: str = DEFAULT_PREFIX) -> tuple[int, ...]:
    """Ticket numbers written as ``[Ticket#10042]`` (any case, spaces allowed), in order, once each."""
    numbers = (int(match) for match in _ticket_pattern(prefix).findall(subject))
    return tuple(dict.fromkeys(numbers))


def add_ticket_reference(subject: str, number: int, *, prefix: str = DEFAULT_PREFIX) -> str:
    """``subject`` with ``[Ticket#N]`` after any reply prefixes, unless it already names ticket N."""
    if number in ticket_numbers_in_subject(subject, prefix=prefix):
        return subject
    reference = f"[{prefix}{number}]"
    split = _reply_prefixes_end(subject)
    rest = subject[split:].strip()
    head = subject[:split].strip()
    return " ".join(part for part in (head, reference, rest) if part)


def strip_reply_prefixes(subject: str) -> str:
    """``subject`` without leading reply/forward markers (``Re:``, ``AW:``, ``Re[2]:``, ``回复：``…)."""
    return _WHITESPACE.sub(" ", subject[_reply_prefixes_end(subject) :]).strip()


def thread_message_ids(mail: ParsedMail) -> tuple[str, ...]:
    """Message ids to look up the thread by: In-Reply-To first, then References newest first."""
    return tuple(dict.fromkeys((*mail.in_reply_to, *reversed(mail.references))))


def _reply_prefixes_end(subject: str) -> int:
    # A loop of anchored matches instead of one repeated group, which would backtrack quadratically
    # over the whitespace between prefixes.
    position = _skip_space(subject, 0)
    while match := _REPLY_PREFIX.match(subject, position):
        position = _skip_space(subject, match.end())
    return position


def _skip_space(subject: str, position: int) -> int:
    match = _LEADING_SPACE.match(subject, position)
    return match.end() if match else position


@functools.lru_cache(maxsize=16)
def _ticket_pattern(prefix: str) -> re.Pattern[str]:
    # "Ticket#" becomes "Ticket\s*#\s*": people and mail clients insert spaces around the punctuation.
    tokens = re.findall(r"\w+|[^\w\s]", prefix)
    body = r"\s*".join(re.escape(token) for token in tokens)
    return re.compile(rf"\[\s*{body}\s*(\d{{1,{_MAX_TICKET_DIGITS}}})\s*\]", re.IGNORECASE)
