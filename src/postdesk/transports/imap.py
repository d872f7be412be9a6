"""IMAP over implicit TLS with SASL XOAUTH2, as Exchange Online offers it (outlook.office365.com:993).

A thin layer over IMAPClient: open a folder, list UIDs, fetch raw bytes, flag or delete. Every IMAP or
socket failure becomes a ``TransportError`` that says whether retrying can help.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from postdesk.transports.errors import TransportError, connection_failure, refusal

CONNECT_TIMEOUT = 30.0
FETCH_BATCH = 50


@dataclass(frozen=True)
class FolderState:
    uidvalidity: int
    uidnext: int
    exists: int


@dataclass(frozen=True)
class FetchedMessage:
    uid: int
    raw: bytes
    seen: bool


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _failure(action: str, exc: Exception) -> TransportError:
    return connection_failure("IMAP", action, exc)


class ImapMailbox:
    """One authenticated IMAP session on one mailbox. Use as a context manager."""

    def __init__(
        self, endpoint: str, *, ssl_context: ssl.SSLContext, timeout: float = CONNECT_TIMEOUT
    ) -> None:
        self.endpoint = endpoint
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._client: IMAPClient | None = None

    def login(self, username: str, access_token: str) -> None:
        host, port = _host_port(self.endpoint)
        try:
            self._client = IMAPClient(
                host, port=port, ssl=True, ssl_context=self._ssl_context, timeout=self._timeout
            )
        except (OSError, IMAPClientError) as exc:
            raise _failure(f"connecting to {self.endpoint}", exc) from exc
        self._client.normalise_times = False  # keep INTERNALDATE's time zone instead of local time
        try:
            self._client.oauth2_login(username, access_token)
        except LoginError as exc:
            self.close()
            # Exchange also says NO to a valid token while the mailbox's backend is unavailable.
            raise refusal(
                "IMAP",
                str(exc),
                action="IMAP sign-in",
                refused=f"the IMAP server refused the sign-in for {username}",
                needs_reauth=True,
            ) from exc
        except (OSError, IMAPClientError) as exc:
            self.close()
            raise _failure("IMAP sign-in", exc) from exc

    @property
    def client(self) -> IMAPClient:
        if self._client is None:
            raise TransportError("not connected")
        return self._client

    def _call(self, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        # ValueError: imaplib reading from a connection that ``abort`` closed under it.
        except (OSError, ValueError, IMAPClientError, imaplib.IMAP4.abort) as exc:
            raise _failure(action, exc) from exc

    def folders(self) -> list[str]:
        listed = self._call("listing folders", self.client.list_folders)
        return sorted(str(name) for flags, _delimiter, name in listed if b"\\Noselect" not in flags)

    def sent_folder(self) -> str:
        """The folder the server files sent mail in: the one flagged \\Sent (RFC 6154), else the name
        Exchange Online uses."""
        found = self._call("finding the sent folder", self.client.find_special_folder, b"\\Sent")
        return str(found) if found else "Sent Items"

    def holds_message_id(self, folder: str, message_id: str) -> bool:
        """Whether ``folder`` holds a message with this Message-ID (read-only; flags are not touched)."""
        try:
            self.client.select_folder(folder, readonly=True)
        except IMAPClientError as exc:
            raise TransportError(f"cannot open the folder {folder!r}: {_text(exc)}") from exc
        except OSError as exc:
            raise _failure(f"opening {folder!r}", exc) from exc
        return bool(self._call("searching", self.client.search, ["HEADER", "Message-ID", message_id]))

    def open(self, folder: str) -> FolderState:
        try:
            state = self.client.select_folder(folder)
        except IMAPClientError as exc:
            raise refusal(
                "IMAP",
                str(exc),
                action=f"opening the folder {folder!r}",
                refused=f"cannot open the folder {folder!r}",
            ) from exc
        except OSError as exc:
            raise _failure(f"opening {folder!r}", exc) from exc
        return FolderState(
            uidvalidity=int(state[b"UIDVALIDITY"]),
            uidnext=int(state.get(b"UIDNEXT", 0)),
            exists=int(state.get(b"EXISTS", 0)),
        )

    def uids_after(self, last_uid: int) -> list[int]:
        # "N:*" always includes the highest UID even when it is below N, so filter.
        found = self._call("searching", self.client.search, ["UID", f"{last_uid + 1}:*"])
        return sorted(uid for uid in found if uid > last_uid)

    def uids_arrived_since(self, moment: datetime) -> list[int]:
        """UIDs of the messages that arrived (INTERNALDATE) at or after ``moment``."""
        # SEARCH SINCE compares dates in the server's time zone only: widen by a day, then filter exactly.
        candidates = self._call(
            "searching", self.client.search, ["SINCE", (moment - timedelta(days=1)).date()]
        )
        if not candidates:
            return []
        answer = self._call("reading arrival times", self.client.fetch, list(candidates), ["INTERNALDATE"])
        return sorted(uid for uid, data in answer.items() if _aware(data[b"INTERNALDATE"]) >= moment)

    def backlog_uids(self, below_uid: int, *, unseen_only: bool, since: date | None) -> list[int]:
        if below_uid <= 1:
            return []
        criteria: list[Any] = ["UID", f"1:{below_uid - 1}"]
        if unseen_only:
            criteria.append("UNSEEN")
        if since is not None:
            criteria.extend(["SINCE", since])
        return sorted(uid for uid in self._call("searching", self.client.search, criteria) if uid < below_uid)

    def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        answer = self._call("reading sizes", self.client.fetch, list(uids), ["RFC822.SIZE"])
        return {uid: int(data[b"RFC822.SIZE"]) for uid, data in answer.items()}

    def fetch(self, uids: Sequence[int]) -> Iterator[FetchedMessage]:
        """Raw bytes of each message, without setting \\Seen (BODY.PEEK)."""
        for start in range(0, len(uids), FETCH_BATCH):
            batch = list(uids[start : start + FETCH_BATCH])
            answer = self._call("fetching mail", self.client.fetch, batch, ["BODY.PEEK[]", "FLAGS"])
            for uid in batch:
                data = answer.get(uid)
                if data is None or b"BODY[]" not in data:
                    continue  # expunged meanwhile
                yield FetchedMessage(
                    uid=uid, raw=bytes(data[b"BODY[]"]), seen=b"\\Seen" in data.get(b"FLAGS", ())
                )

    def mark_seen(self, uids: Sequence[int]) -> None:
        if uids:
            self._call("flagging mail as read", self.client.add_flags, list(uids), [b"\\Seen"], silent=True)

    def delete(self, uids: Sequence[int]) -> None:
        if not uids:
            return
        self._call("deleting mail", self.client.delete_messages, list(uids), silent=True)
        if self.client.has_capability("UIDPLUS"):
            self._call("expunging", self.client.uid_expunge, list(uids))
        else:
            self._call("expunging", self.client.expunge)

    def move(self, uids: Sequence[int], folder: str) -> None:
        """Move messages of the open folder to ``folder``: UID MOVE (RFC 6851) where the server offers
        it, as Exchange Online does; else UID COPY, then \\Deleted and expunge. UIDs no longer in the
        open folder are skipped by the server, so moving again after an interruption is harmless
        (with COPY, an interruption before the expunge can leave a second copy in ``folder``)."""
        if not uids:
            return
        moved = self.client.has_capability("MOVE")
        try:
            (self.client.move if moved else self.client.copy)(list(uids), folder)
        except imaplib.IMAP4.abort as exc:  # before IMAPClientError: abort is a kind of it
            raise _failure("moving mail", exc) from exc
        except IMAPClientError as exc:
            raise _move_refused(folder, exc) from exc
        except (OSError, ValueError) as exc:
            raise _failure("moving mail", exc) from exc
        if not moved:
            self.delete(uids)

    def supports_idle(self) -> bool:
        return bool(self._call("reading capabilities", self.client.has_capability, "IDLE"))

    def start_idle(self) -> IdleNews:
        """Enter IDLE: from now on the server pushes news of the open folder until ``end_idle``.

        Returns news that came with the server's answer: an EXISTS sent just before the continuation
        is filed by imaplib among its untagged responses, and one sent in the same packet sits in the
        read buffer, where no selector will see it."""
        imap = self.client._imap  # IMAPClient keeps the imaplib connection there
        for kind in ("EXISTS", "RECENT"):  # SELECT's own counts, not news
            imap.untagged_responses.pop(kind, None)
        self._call("starting IDLE", self.client.idle)
        filed = any(imap.untagged_responses.pop(kind, None) for kind in ("EXISTS", "RECENT"))
        buffered = self.idle_news()
        return IdleNews(new_mail=filed or buffered.new_mail, goodbye=buffered.goodbye)

    def idle_socket(self) -> Any:
        """The socket to wait on (with a selector) while idling; readable means the server said something."""
        return self.client.socket()

    def idle_news(self) -> IdleNews:
        """Read what the server pushed while idling, without waiting: call when the socket is readable.
        Raises ``TransportError`` when the server has closed the connection."""
        imap = self.client._imap
        sock = self.client.socket()
        lines = []
        try:
            sock.setblocking(False)
            while True:
                try:
                    line = imap.readline()
                except OSError:  # nothing more for now (SSLWantReadError, EAGAIN)
                    break
                if not line:
                    raise TransportError("the IMAP server closed the connection")
                lines.append(line)
        except ValueError as exc:  # the connection was closed under us
            raise _failure("reading IDLE news", exc) from exc
        finally:
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(self._timeout)
        return _news(lines)

    def end_idle(self) -> IdleNews:
        """Leave IDLE (DONE). Mail that arrives while IDLE ends is announced in the answer to DONE, and
        only there: the next IDLE will not mention it again, so the news is returned."""
        _text, closing = self._call("ending IDLE", self.client.idle_done)
        return _parsed_news(closing)

    def wait_for_change(self, timeout: float) -> bool:
        """IDLE for up to ``timeout`` seconds on this thread; True when the server announced new mail."""
        started = self.start_idle()
        try:
            news = _parsed_news(self._call("waiting in IDLE", self.client.idle_check, timeout=timeout))
        finally:
            closing = self.end_idle()
        return started.new_mail or news.new_mail or closing.new_mail

    def abort(self) -> None:
        """Drop the connection from another thread, e.g. to end a sign-in or an IDLE wait at shutdown.

        Only shuts the socket down: the thread using the connection then fails, and its ``close`` frees
        it. Freeing a TLS socket while another thread is inside OpenSSL on it can crash the process."""
        client = self._client
        if client is not None:
            with contextlib.suppress(OSError, ValueError):
                socket.socket.shutdown(client.socket(), socket.SHUT_RDWR)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except (OSError, IMAPClientError, imaplib.IMAP4.abort):
            with contextlib.suppress(OSError):
                client.shutdown()

    def __enter__(self) -> ImapMailbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


@dataclass(frozen=True)
class IdleNews:
    new_mail: bool  # EXISTS or RECENT: something arrived
    goodbye: bool  # BYE: the server is closing the session


_NEW_MAIL = re.compile(rb"^\* \d+ (EXISTS|RECENT)\b", re.IGNORECASE)
_GOODBYE = re.compile(rb"^\* BYE\b", re.IGNORECASE)


def _news(lines: Sequence[bytes]) -> IdleNews:
    """News in raw untagged lines ("* 12 EXISTS", "* BYE …")."""
    return IdleNews(
        new_mail=any(_NEW_MAIL.match(line) for line in lines),
        goodbye=any(_GOODBYE.match(line) for line in lines),
    )


def _parsed_news(responses: Sequence[Any]) -> IdleNews:
    """News in responses as IMAPClient parses them: (12, b"EXISTS"), (b"BYE", …)."""
    kinds = {item[1] for item in responses if isinstance(item, tuple) and len(item) > 1}
    kinds |= {item[0] for item in responses if isinstance(item, tuple) and item}
    return IdleNews(new_mail=bool(kinds & {b"EXISTS", b"RECENT"}), goodbye=b"BYE" in kinds)


def _move_refused(folder: str, exc: Exception) -> TransportError:
    """The server said NO to a MOVE or COPY: TRYCREATE (RFC 3501) means the folder does not exist."""
    if "[TRYCREATE]" in str(exc).upper():
        return TransportError(
            f"the folder {folder!r} to move fetched mail to does not exist in the mailbox; "
            "create it in Outlook or choose another",
            permanent=True,
        )
    return refusal(
        "IMAP", str(exc), action=f"moving mail to {folder!r}", refused=f"cannot move mail to {folder!r}"
    )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _text(exc: Exception) -> str:
    text = str(exc)
    return text.removeprefix("b'").removesuffix("'") or exc.__class__.__name__
