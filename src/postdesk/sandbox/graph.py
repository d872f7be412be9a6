"""The sandbox's Microsoft Graph mail API: a stand-in for ``https://graph.microsoft.com/v1.0`` mail.

Postdesk reads and sends a mailbox's mail through Graph when a channel uses the Graph transport. This
module imitates the part of Graph that a help desk meets, following Microsoft's public documentation
of request and response shapes, never a particular client:

- Bearer access tokens issued by the sandbox identity platform are checked as Graph checks them:
  signature, lifetime, an audience of Graph (``https://graph.microsoft.com`` or its app ID), and the
  permission in ``scp`` (delegated) or ``roles`` (app-only). Failures answer 401
  ``InvalidAuthenticationToken`` or 403 ``ErrorAccessDenied``.
- Mailboxes live in ``GraphMailStore`` (in memory, one lock): users' mailboxes, which appear for every
  sandbox directory user on first use, and shared mailboxes. A delegate table grants FullAccess (read
  and change another mailbox through ``/users/{id}/...``) and SendAs / SendOnBehalf (send from it).
  Delegated tokens need the ``.Shared`` permissions to reach any mailbox but the user's own.
- Endpoints under ``/v1.0/me`` and ``/v1.0/users/{id | userPrincipalName}``: mailFolders (and
  childFolders, well-known names, ``$top``/``$skip`` paging), messages (list, get, ``$value``, PATCH,
  move, DELETE, create a draft from MIME or JSON, send a draft), ``mailFolders/{id}/messages/delta``
  (``$select``, ``changeType``, ``Prefer: odata.maxpagesize``, ``@odata.nextLink`` rounds ending in an
  ``@odata.deltaLink``, ``@removed`` entries), ``sendMail`` (MIME as base64 ``text/plain``, or JSON),
  file attachments under 3 MB by POST to ``attachments``, and large ones through
  ``attachments/createUploadSession`` and PUTs of byte ranges to a pre-authenticated upload URL.
- Message ids change when a message moves, as Graph's default ids do; ``Prefer:
  IdType="ImmutableId"`` asks for ids that do not. Old ids answer 404 ``ErrorItemNotFound``.
- Request bodies over 4 MB answer 413. Every response carries ``request-id`` and ``client-request-id``;
  errors are ``{"error": {"code", "message", "innerError": {"date", "request-id",
  "client-request-id"}}}``.
- For tests: ``deliver()`` files raw mail into a folder; ``fail_next()`` / ``throttle_next()`` /
  ``unavailable_next()`` queue error answers (optionally only for paths matching a pattern); at most
  ``concurrency_limit`` requests per app and mailbox run at once (Graph documents four), more answer 429
  ``ApplicationThrottled``; ``hold_requests()`` keeps admitted requests waiting so tests can fill the
  slots; ``expire_delta_tokens()`` makes earlier delta and skip tokens answer 410; ``restrict_app()``
  limits an app's app-only access to some mailboxes, as Exchange RBAC for Applications does.

Clients must branch on the HTTP status and ``error.code`` only: Graph's messages change over time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import itertools
import json
import re
import secrets
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime, formataddr, getaddresses, make_msgid, parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlencode

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from postdesk.sandbox.identity import GRAPH, SandboxDirectory

Operation = Literal["read", "write", "send"]
IdType = Literal["rest", "immutable"]

GRAPH_AUDIENCES = frozenset(value.lower() for value in (GRAPH.identifier, *GRAPH.aliases))
# Graph refuses request bodies over 4 MB; larger attachments go through upload sessions.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
UPLOAD_MIN_BYTES = 3 * 1024 * 1024
UPLOAD_MAX_BYTES = 150 * 1024 * 1024
UPLOAD_SESSION_LIFETIME = timedelta(hours=2)
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
# Graph's documented limit for Outlook resources: four concurrent requests per app and mailbox.
DEFAULT_CONCURRENCY_LIMIT = 4
ODATA_JSON = (
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
)

ACCESS_DENIED = "Access is denied. Check credentials and try again."
ITEM_NOT_FOUND = "The specified object was not found in the store."
SEND_AS_DENIED = (
    "The user account which was used to submit this request does not have the right to send mail on "
    "behalf of the specified sending account., Cannot submit message."
)
INVALID_JSON = (
    "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of "
    "valid JSON format."
)

ROOT_FOLDER = "msgfolderroot"
# Well-known folder names Graph accepts in place of folder ids, with the English display names.
WELL_KNOWN_FOLDERS: Mapping[str, str] = {
    "archive": "Archive",
    "deleteditems": "Deleted Items",
    "drafts": "Drafts",
    "inbox": "Inbox",
    "junkemail": "Junk Email",
    "outbox": "Outbox",
    "sentitems": "Sent Items",
}

# Which permissions allow what: the user's own mailbox, another mailbox (delegated), app-only.
DELEGATED_OWN: Mapping[Operation, frozenset[str]] = {
    "read": frozenset({"mail.read", "mail.readwrite", "mail.read.shared", "mail.readwrite.shared"}),
    "write": frozenset({"mail.readwrite", "mail.readwrite.shared"}),
    "send": frozenset({"mail.send", "mail.send.shared"}),
}
DELEGATED_OTHER: Mapping[Operation, frozenset[str]] = {
    "read": frozenset({"mail.read.shared", "mail.readwrite.shared"}),
    "write": frozenset({"mail.readwrite.shared"}),
    "send": frozenset({"mail.send.shared"}),
}
APPLICATION: Mapping[Operation, frozenset[str]] = {
    "read": frozenset({"mail.read", "mail.readwrite"}),
    "write": frozenset({"mail.readwrite"}),
    "send": frozenset({"mail.send"}),
}
PATCHABLE = frozenset({"isread", "categories", "flag", "importance", "inferenceclassification"})
# Writable message properties that the sandbox accepts on PATCH without acting on them.
PATCH_IGNORED = frozenset(
    {
        "subject",
        "body",
        "torecipients",
        "ccrecipients",
        "bccrecipients",
        "replyto",
        "from",
        "sender",
        "isdeliveryreceiptrequested",
        "isreadreceiptrequested",
        "internetmessageid",
    }
)


class MailboxRight(StrEnum):
    """Exchange mailbox permissions a delegate can hold on another mailbox."""

    FULL_ACCESS = "FullAccess"
    SEND_AS = "SendAs"
    SEND_ON_BEHALF = "SendOnBehalf"


class GraphError(Exception):
    """An answer in Graph's error shape; raised anywhere while serving a request."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def access_denied() -> GraphError:
    return GraphError(403, "ErrorAccessDenied", ACCESS_DENIED)


def item_not_found() -> GraphError:
    return GraphError(404, "ErrorItemNotFound", ITEM_NOT_FOUND)


def invalid_token(message: str) -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", message)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id(prefix: str) -> str:
    # Shaped like Exchange's base64 entry ids, but URL-safe so they sit in a path segment as they are.
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(33)).decode("ascii")


def _token(payload: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode().rstrip("=")


def _untoken(value: str) -> dict[str, Any] | None:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (ValueError, binascii.Error):
        return None
    return decoded if isinstance(decoded, dict) else None


# ---------------------------------------------------------------------------------------------
# What a stored message says about itself, read from its MIME
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttachmentView:
    name: str
    content_type: str
    content: bytes
    is_inline: bool


@dataclass(frozen=True)
class MimeView:
    """The properties Graph derives from a message's MIME content."""

    subject: str
    sender: tuple[str, str] | None
    to: tuple[tuple[str, str], ...]
    cc: tuple[tuple[str, str], ...]
    bcc: tuple[tuple[str, str], ...]
    reply_to: tuple[tuple[str, str], ...]
    message_id: str | None
    sent: datetime | None
    thread_root: str | None
    importance: str
    html: str | None
    text: str | None
    attachments: tuple[AttachmentView, ...]

    @classmethod
    def parse(cls, raw: bytes) -> MimeView:
        message = BytesParser(policy=policy.default).parsebytes(raw)
        assert isinstance(message, EmailMessage)
        senders = _addresses(message, "From")
        references = (str(message.get("References", "")) + " " + str(message.get("In-Reply-To", ""))).split()
        return cls(
            subject=str(message.get("Subject", "")),
            sender=senders[0] if senders else None,
            to=_addresses(message, "To"),
            cc=_addresses(message, "Cc"),
            bcc=_addresses(message, "Bcc"),
            reply_to=_addresses(message, "Reply-To"),
            message_id=str(message["Message-ID"]).strip() if message["Message-ID"] else None,
            sent=_header_date(message),
            thread_root=references[0] if references else None,
            importance=_importance(message),
            html=_body_text(message, "html"),
            text=_body_text(message, "plain"),
            attachments=tuple(_attachments(message)),
        )

    def preview(self) -> str:
        source = self.text if self.text is not None else re.sub(r"<[^>]*>", " ", self.html or "")
        return " ".join(source.split())[:255]


def _addresses(message: EmailMessage, name: str) -> tuple[tuple[str, str], ...]:
    values = [str(value) for value in message.get_all(name, [])]
    return tuple((display, address.lower()) for display, address in getaddresses(values) if address)


def _header_date(message: EmailMessage) -> datetime | None:
    if not message["Date"]:
        return None
    try:
        moment = parsedate_to_datetime(str(message["Date"]))
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _importance(message: EmailMessage) -> str:
    value = str(message.get("Importance", "") or message.get("X-Priority", "")).lower()
    if value.startswith(("high", "1", "2")):
        return "high"
    if value.startswith(("low", "4", "5")):
        return "low"
    return "normal"


def _body_text(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):
        return None
    return content if isinstance(content, str) else None


def _attachments(message: EmailMessage) -> Iterator[AttachmentView]:
    if not message.is_multipart():
        return
    for part in message.iter_attachments():
        assert isinstance(part, EmailMessage)
        payload = part.get_payload(decode=True)
        yield AttachmentView(
            name=part.get_filename() or "attachment",
            content_type=part.get_content_type(),
            content=payload if isinstance(payload, bytes) else b"",
            is_inline=part.get_content_disposition() == "inline",
        )


# ---------------------------------------------------------------------------------------------
# The mailbox store
# ---------------------------------------------------------------------------------------------


@dataclass
class MailFolder:
    folder_id: str
    display_name: str
    parent_id: str | None
    well_known: str | None = None
    is_hidden: bool = False


@dataclass
class StoredMessage:
    immutable_id: str
    rest_id: str
    folder_id: str
    raw: bytes
    view: MimeView
    received: datetime
    created: datetime
    modified: datetime
    arrival: int  # order of arrival in the mailbox, to break ties between equal receive times
    entered_seq: int  # the mailbox change number at which the message entered its folder
    changed_seq: int  # ... and at which it last changed in any way
    is_read: bool = False
    is_draft: bool = False
    categories: list[str] = field(default_factory=list)
    flag_status: str = "notFlagged"
    inference: str = "focused"
    change_key: str = field(default_factory=lambda: _new_id("CQAAAB"))

    def shown_id(self, id_type: IdType) -> str:
        return self.immutable_id if id_type == "immutable" else self.rest_id

    def replace_raw(self, raw: bytes) -> None:
        self.raw = raw
        self.view = MimeView.parse(raw)


@dataclass(frozen=True)
class Removal:
    """A message that left a folder (moved or deleted), for delta queries on that folder."""

    seq: int
    folder_id: str
    rest_id: str
    immutable_id: str


@dataclass
class Mailbox:
    address: str
    display_name: str
    object_id: str
    tenant_id: str | None
    shared: bool
    folders: dict[str, MailFolder] = field(default_factory=dict)
    messages: dict[str, StoredMessage] = field(default_factory=dict)  # by immutable id
    ids: dict[str, str] = field(default_factory=dict)  # every live id (rest or immutable) -> immutable id
    removals: list[Removal] = field(default_factory=list)
    seq: int = 0
    sync_epoch: int = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def well_known(self, name: str) -> MailFolder:
        return next(f for f in self.folders.values() if f.well_known == name)

    def find_folder(self, reference: str) -> MailFolder | None:
        """A folder by id, well-known name (any case) or, for the store's own callers, display name."""
        if reference in self.folders:
            return self.folders[reference]
        lowered = reference.lower()
        return next((f for f in self.folders.values() if f.well_known == lowered), None)

    def in_folder(self, folder_id: str) -> list[StoredMessage]:
        found = [m for m in self.messages.values() if m.folder_id == folder_id]
        return sorted(found, key=lambda m: (m.received, m.arrival), reverse=True)


@dataclass(frozen=True)
class MessageSnapshot:
    """A copy of a stored message's state, for test assertions."""

    id: str
    immutable_id: str
    folder: str
    raw: bytes
    is_read: bool
    is_draft: bool


@dataclass(frozen=True)
class SentMail:
    """One message accepted by sendMail or a draft's send."""

    mailbox: str  # the mailbox the request was made for
    sender: str  # the From address
    recipients: tuple[str, ...]
    raw: bytes
    delivered_to: tuple[str, ...]  # recipients whose sandbox mailbox received it
    saved_copy: bool


@dataclass
class InjectedFault:
    status: int
    code: str
    message: str
    retry_after: int | None
    path: re.Pattern[str] | None
    method: str | None
    # Serve the request first (its effects stay), then answer with the error: a gateway that gave up
    # waiting while the mailbox server did the work.
    after_serving: bool = False

    def matches(self, method: str, path: str, *, after_serving: bool) -> bool:
        if self.after_serving != after_serving:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or self.path.search(path) is not None


@dataclass
class UploadSession:
    session_id: str
    secret: str
    address: str
    immutable_id: str
    name: str
    size: int
    content_type: str
    is_inline: bool
    expires: datetime
    received: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class DeltaRound:
    """A delta round's fixed list of entries, so that replaying a nextLink gives the same page."""

    address: str
    folder_id: str
    entries: tuple[tuple[str, str, str], ...]  # (kind, immutable id, id as shown when the round began)
    final_seq: int
    epoch: int
    select: tuple[str, ...]
    change_type: str | None
    page_size: int
    id_type: IdType


@dataclass(frozen=True)
class Principal:
    """Who a validated access token speaks for."""

    app_id: str
    tenant_id: str
    oid: str
    upn: str | None  # None for app-only tokens
    scopes: frozenset[str]  # delegated permissions, lower case
    roles: frozenset[str]  # application permissions, lower case

    @property
    def is_app(self) -> bool:
        return self.upn is None

    def owns(self, mailbox: Mailbox) -> bool:
        return not self.is_app and (mailbox.address == self.upn or mailbox.object_id == self.oid)


class GraphMailStore:
    """All mailboxes the sandbox Graph serves, their delegates, and the test switches.

    The web app runs on the server thread while tests call in from theirs: everything that reads or
    changes state holds ``lock``.
    """

    def __init__(self, directory: SandboxDirectory) -> None:
        self.directory = directory
        self.lock = threading.RLock()
        self.mailboxes: dict[str, Mailbox] = {}
        self.sent: list[SentMail] = []
        self.concurrency_limit = DEFAULT_CONCURRENCY_LIMIT
        self._without_mailbox: set[str] = set()
        self._faults: deque[InjectedFault] = deque()
        self._in_flight: Counter[tuple[str, str]] = Counter()
        self._released = threading.Event()
        self._released.set()
        self._uploads: dict[str, UploadSession] = {}
        self._rounds: dict[str, DeltaRound] = {}
        self._arrivals = itertools.count(1)
        # Per app (client id): the only mailboxes it may open, when Exchange limits it to some.
        self._app_scopes: dict[str, frozenset[str]] = {}

    # -- mailboxes and delegates ---------------------------------------------------------------

    def add_mailbox(self, address: str, *, display_name: str | None = None, shared: bool = False) -> Mailbox:
        """Create a mailbox (idempotent). Directory users get theirs on first use without this."""
        address = address.lower()
        with self.lock:
            if address in self.mailboxes:
                return self.mailboxes[address]
            user = self.directory.find_user(address)
            mailbox = Mailbox(
                address=address,
                display_name=display_name or (user.display_name if user else address.split("@")[0]),
                object_id=user.oid if user else str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailbox:{address}")),
                tenant_id=user.tenant_id if user else self._tenant_for_domain(address),
                shared=shared,
            )
            self._create_default_folders(mailbox)
            self.mailboxes[address] = mailbox
            self._without_mailbox.discard(address)
            return mailbox

    def disable_mailbox(self, address: str) -> None:
        """Make a directory user's mailbox unavailable (no Exchange licence, or hosted on-premises)."""
        with self.lock:
            self.mailboxes.pop(address.lower(), None)
            self._without_mailbox.add(address.lower())

    def grant(self, mailbox: str, delegate: str, *rights: MailboxRight | str) -> None:
        """Give ``delegate`` (a user's address) rights on ``mailbox``, as Add-MailboxPermission does.

        The rights live in the sandbox directory, so IMAP and SMTP see the same grants."""
        self.directory.grant_mailbox_right(mailbox, delegate, *(MailboxRight(right) for right in rights))

    def revoke(self, mailbox: str, delegate: str, *rights: MailboxRight | str) -> None:
        self.directory.revoke_mailbox_right(mailbox, delegate, *(MailboxRight(right) for right in rights))

    def rights(self, mailbox: str, delegate: str) -> set[MailboxRight]:
        return {MailboxRight(right) for right in self.directory.rights_on(mailbox, delegate)}

    def restrict_app(self, client_id: str, mailboxes: Iterable[str]) -> None:
        """Let the app open only these mailboxes, as Exchange RBAC for Applications (a role assignment
        with a management scope) or an application access policy does: its app-only requests to any
        other mailbox answer 403 ``ErrorAccessDenied``, whatever application permissions it holds."""
        with self.lock:
            self._app_scopes[client_id.lower()] = frozenset(address.lower() for address in mailboxes)

    def unrestrict_app(self, client_id: str) -> None:
        with self.lock:
            self._app_scopes.pop(client_id.lower(), None)

    def create_folder(self, address: str, display_name: str, *, parent: str = ROOT_FOLDER) -> str:
        """Add a custom folder (under the top of the mailbox unless ``parent`` names another)."""
        with self.lock:
            mailbox = self.add_mailbox(address)
            parent_folder = self._folder(mailbox, parent)
            folder = MailFolder(_new_id("AAMkAGF"), display_name, parent_folder.folder_id)
            mailbox.folders[folder.folder_id] = folder
            return folder.folder_id

    def folder_id(self, address: str, folder: str) -> str:
        with self.lock:
            return self._folder(self.add_mailbox(address), folder).folder_id

    # -- mail in and out, for tests ------------------------------------------------------------

    def deliver(
        self,
        address: str,
        raw: bytes,
        folder: str = "Inbox",
        *,
        is_read: bool = False,
        received: datetime | None = None,
    ) -> str:
        """File ``raw`` into a folder of the mailbox (created if needed) as mail transport does, adding
        a Message-ID when the message has none; returns the message's (REST) id."""
        with self.lock:
            mailbox = self.add_mailbox(address)
            message = self._file(
                mailbox, _stamped(raw, mailbox, self.directory.now()), self._folder(mailbox, folder)
            )
            message.is_read = is_read
            if received is not None:
                message.received = received
            return message.rest_id

    def messages(self, address: str, folder: str = "Inbox") -> list[MessageSnapshot]:
        """What a folder holds now, newest first."""
        with self.lock:
            mailbox = self.add_mailbox(address)
            target = self._folder(mailbox, folder)
            return [
                MessageSnapshot(m.rest_id, m.immutable_id, target.display_name, m.raw, m.is_read, m.is_draft)
                for m in mailbox.in_folder(target.folder_id)
            ]

    # -- test switches ----------------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int,
        code: str,
        message: str,
        retry_after: int | None = None,
        path: str | None = None,
        method: str | None = None,
        after_serving: bool = False,
    ) -> None:
        """Answer the next ``count`` requests (whose path matches the regular expression ``path``, and
        method ``method``, when given) with this error instead of serving them, or, ``after_serving``,
        once they have been served; faults queue up."""
        pattern = re.compile(path) if path is not None else None
        with self.lock:
            for _ in range(count):
                self._faults.append(
                    InjectedFault(status, code, message, retry_after, pattern, method, after_serving)
                )

    def throttle_next(
        self, count: int = 1, *, retry_after: int = 2, path: str | None = None, method: str | None = None
    ) -> None:
        """429 Too Many Requests with ``Retry-After``, in the shape of Graph's throttling answers."""
        self.fail_next(
            count,
            status=429,
            code="TooManyRequests",
            message="Please retry again later.",
            retry_after=retry_after,
            path=path,
            method=method,
        )

    def unavailable_next(
        self,
        count: int = 1,
        *,
        retry_after: int | None = None,
        path: str | None = None,
        method: str | None = None,
    ) -> None:
        """503 Service Unavailable, with ``Retry-After`` when given."""
        self.fail_next(
            count,
            status=503,
            code="serviceNotAvailable",
            message="The service is temporarily unavailable. Please try again later.",
            retry_after=retry_after,
            path=path,
            method=method,
        )

    def hold_requests(self) -> None:
        """Keep admitted requests waiting (holding their concurrency slot) until ``release_requests``."""
        self._released.clear()

    def release_requests(self) -> None:
        self._released.set()

    def in_flight(self, address: str) -> int:
        """How many requests for this mailbox hold a concurrency slot now (all apps together)."""
        with self.lock:
            return sum(n for (_, mailbox), n in self._in_flight.items() if mailbox == address.lower())

    def expire_delta_tokens(self, address: str) -> None:
        """Invalidate every delta and skip token issued so far for this mailbox (answers 410)."""
        with self.lock:
            self.add_mailbox(address).sync_epoch += 1

    def reset(self) -> None:
        """Put the test switches back: no queued faults, no held requests, the default concurrency."""
        with self.lock:
            self._faults.clear()
            self._app_scopes.clear()
            self.concurrency_limit = DEFAULT_CONCURRENCY_LIMIT
        self.release_requests()

    # -- used while serving requests (callers hold the lock where noted) -------------------------

    def take_fault(self, method: str, path: str, *, after_serving: bool = False) -> None:
        with self.lock:
            fault = next(
                (f for f in self._faults if f.matches(method, path, after_serving=after_serving)), None
            )
            if fault is not None:
                self._faults.remove(fault)
        if fault is not None:
            raise GraphError(fault.status, fault.code, fault.message, retry_after=fault.retry_after)

    @contextmanager
    def request_slot(self, app_id: str, address: str) -> Iterator[None]:
        key = (app_id, address)
        with self.lock:
            if self._in_flight[key] >= self.concurrency_limit:
                raise GraphError(
                    429,
                    "ApplicationThrottled",
                    "Application is over its MailboxConcurrency limit.",
                    retry_after=1,
                )
            self._in_flight[key] += 1
        try:
            yield
        finally:
            with self.lock:
                self._in_flight[key] -= 1

    async def wait_while_held(self) -> None:
        while not self._released.is_set():
            await asyncio.sleep(0.005)

    def resolve(self, identifier: str | None, principal: Principal) -> Mailbox:
        """The mailbox a request names (``None`` for /me). Caller holds the lock."""
        if identifier is None:
            if principal.upn is None:
                raise GraphError(
                    400, "BadRequest", "/me request is only valid with delegated authentication flow."
                )
            identifier = principal.upn
        mailbox = self._lookup(identifier)
        if mailbox.tenant_id is not None and mailbox.tenant_id != principal.tenant_id:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{identifier}' is invalid.")
        return mailbox

    def authorize(self, principal: Principal, mailbox: Mailbox, operation: Operation) -> None:
        if principal.is_app:
            if not principal.roles & APPLICATION[operation]:
                raise access_denied()
            in_scope = self._app_scopes.get(principal.app_id.lower())
            if in_scope is not None and mailbox.address not in in_scope:
                raise access_denied()
            return
        own = principal.owns(mailbox)
        if not principal.scopes & (DELEGATED_OWN if own else DELEGATED_OTHER)[operation]:
            raise access_denied()
        if own:
            return
        held = self.rights(mailbox.address, principal.upn or "")
        if operation == "send":
            if not held & {MailboxRight.SEND_AS, MailboxRight.SEND_ON_BEHALF}:
                raise GraphError(403, "ErrorSendAsDenied", SEND_AS_DENIED)
        elif MailboxRight.FULL_ACCESS not in held:
            raise access_denied()

    def find_message(self, mailbox: Mailbox, message_id: str) -> StoredMessage:
        immutable_id = mailbox.ids.get(message_id)
        if immutable_id is None:
            raise item_not_found()
        return mailbox.messages[immutable_id]

    def find_folder(self, mailbox: Mailbox, reference: str) -> MailFolder:
        folder = mailbox.find_folder(reference)
        if folder is None:
            raise item_not_found()
        return folder

    def touch(self, mailbox: Mailbox, message: StoredMessage) -> None:
        message.changed_seq = mailbox.next_seq()
        message.modified = self.directory.now()
        message.change_key = _new_id("CQAAAB")

    def move(self, mailbox: Mailbox, message: StoredMessage, destination: MailFolder) -> StoredMessage:
        """Move a message; like Exchange's default ids, its REST id changes, its immutable id does not."""
        if destination.folder_id == message.folder_id:
            return message
        self._forget(mailbox, message)
        message.rest_id = _new_id("AAMkAGI")
        message.folder_id = destination.folder_id
        mailbox.ids[message.rest_id] = message.immutable_id
        message.entered_seq = mailbox.next_seq()
        message.changed_seq = message.entered_seq
        message.modified = self.directory.now()
        return message

    def delete(self, mailbox: Mailbox, message: StoredMessage) -> None:
        """Graph's DELETE moves a message to Deleted Items; deleting it there removes it for good."""
        deleted_items = mailbox.well_known("deleteditems")
        if message.folder_id != deleted_items.folder_id:
            self.move(mailbox, message, deleted_items)
        else:
            self.purge(mailbox, message)

    def purge(self, mailbox: Mailbox, message: StoredMessage) -> None:
        self._forget(mailbox, message)
        mailbox.ids.pop(message.immutable_id, None)
        del mailbox.messages[message.immutable_id]

    def create_draft(self, mailbox: Mailbox, raw: bytes) -> StoredMessage:
        message = self._file(mailbox, raw, mailbox.well_known("drafts"))
        message.is_draft = True
        message.is_read = True
        return message

    def submit(self, mailbox: Mailbox, principal: Principal, raw: bytes, *, save_copy: bool) -> SentMail:
        """Send ``raw`` from ``mailbox``: check the From address, deliver to sandbox mailboxes among the
        recipients, and keep a copy in the mailbox's Sent Items."""
        now = self.directory.now()
        raw = _stamped(raw, mailbox, now)
        view = MimeView.parse(raw)
        sender = view.sender[1] if view.sender else mailbox.address
        self._check_send_as(mailbox, principal, sender)
        recipients = tuple(dict.fromkeys(address for _, address in (*view.to, *view.cc, *view.bcc)))
        if not recipients:
            raise GraphError(
                400,
                "ErrorInvalidRecipients",
                "At least one recipient isn't valid., "
                "A message can't be sent because it contains no recipients.",
            )
        delivered = tuple(address for address in recipients if self._deliver_locally(address, raw))
        if save_copy:
            copy = self._file(mailbox, raw, mailbox.well_known("sentitems"))
            copy.is_read = True
        sent = SentMail(mailbox.address, sender, recipients, raw, delivered, save_copy)
        self.sent.append(sent)
        return sent

    def add_upload(self, session: UploadSession) -> None:
        self._uploads[session.session_id] = session

    def find_upload(self, session_id: str, secret: str) -> UploadSession:
        session = self._uploads.get(session_id)
        if session is None or not hmac.compare_digest(session.secret, secret):
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        if session.expires <= self.directory.now():
            del self._uploads[session_id]
            raise GraphError(404, "ErrorItemNotFound", "The upload session was not found or has expired.")
        return session

    def drop_upload(self, session_id: str) -> None:
        self._uploads.pop(session_id, None)

    def start_round(self, round_: DeltaRound) -> str:
        round_id = secrets.token_urlsafe(12)
        self._rounds[round_id] = round_
        return round_id

    def find_round(self, round_id: str) -> DeltaRound | None:
        return self._rounds.get(round_id)

    # -- internals -----------------------------------------------------------------------------

    def _lookup(self, identifier: str) -> Mailbox:
        wanted = identifier.lower()
        found = self.mailboxes.get(wanted) or next(
            (m for m in self.mailboxes.values() if m.object_id == wanted), None
        )
        if found is not None:
            return found
        user = self.directory.find_user(wanted)
        if user is None and wanted in self.directory.shared_mailboxes:
            return self.add_mailbox(wanted, display_name=self.directory.shared_mailboxes[wanted], shared=True)
        if user is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{identifier}' is invalid.")
        if user.upn in self._without_mailbox:
            raise GraphError(
                404,
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            )
        return self.add_mailbox(user.upn)

    def _tenant_for_domain(self, address: str) -> str | None:
        domain = address.rpartition("@")[2]
        return next((t.tenant_id for t in self.directory.tenants.values() if t.domain == domain), None)

    @staticmethod
    def _create_default_folders(mailbox: Mailbox) -> None:
        root = MailFolder(_new_id("AAMkAGR"), "Top of Information Store", None, ROOT_FOLDER, is_hidden=True)
        mailbox.folders[root.folder_id] = root
        for well_known, display_name in WELL_KNOWN_FOLDERS.items():
            folder = MailFolder(_new_id("AAMkAGF"), display_name, root.folder_id, well_known)
            mailbox.folders[folder.folder_id] = folder

    def _folder(self, mailbox: Mailbox, reference: str) -> MailFolder:
        folder = mailbox.find_folder(reference) or next(
            (f for f in mailbox.folders.values() if f.display_name.lower() == reference.lower()), None
        )
        if folder is None:
            raise KeyError(f"no folder {reference!r} in {mailbox.address}")
        return folder

    def _file(self, mailbox: Mailbox, raw: bytes, folder: MailFolder) -> StoredMessage:
        now = self.directory.now()
        seq = mailbox.next_seq()
        message = StoredMessage(
            immutable_id=_new_id("AAkALgAAAAAAHYQDEapmEc2byACqAC"),
            rest_id=_new_id("AAMkAGI"),
            folder_id=folder.folder_id,
            raw=raw,
            view=MimeView.parse(raw),
            received=now,
            created=now,
            modified=now,
            arrival=next(self._arrivals),
            entered_seq=seq,
            changed_seq=seq,
        )
        mailbox.messages[message.immutable_id] = message
        mailbox.ids[message.rest_id] = message.immutable_id
        mailbox.ids[message.immutable_id] = message.immutable_id
        return message

    def _forget(self, mailbox: Mailbox, message: StoredMessage) -> None:
        """Record that the message left its folder and retire its REST id."""
        removal = Removal(mailbox.next_seq(), message.folder_id, message.rest_id, message.immutable_id)
        mailbox.removals.append(removal)
        mailbox.ids.pop(message.rest_id, None)

    def _check_send_as(self, mailbox: Mailbox, principal: Principal, sender: str) -> None:
        if sender == mailbox.address or (principal.upn is not None and sender == principal.upn):
            return
        delegate = principal.upn if principal.upn is not None else mailbox.address
        if not self.rights(sender, delegate) & {MailboxRight.SEND_AS, MailboxRight.SEND_ON_BEHALF}:
            raise GraphError(403, "ErrorSendAsDenied", SEND_AS_DENIED)

    def _deliver_locally(self, address: str, raw: bytes) -> bool:
        if address not in self.mailboxes and (
            self.directory.find_user(address) is None or address in self._without_mailbox
        ):
            return False
        mailbox = self.add_mailbox(address)
        self._file(mailbox, _without_bcc(raw), mailbox.well_known("inbox"))
        return True


def _stamped(raw: bytes, mailbox: Mailbox, now: datetime) -> bytes:
    """Add the headers Exchange supplies when a message lacks them: Message-ID, Date and From."""
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    added: list[str] = []
    if headers["Message-ID"] is None:
        domain = mailbox.address.rpartition("@")[2] or "sandbox.invalid"
        added.append(f"Message-ID: {make_msgid(domain=domain)}")
    if headers["Date"] is None:
        added.append(f"Date: {format_datetime(now)}")
    if headers["From"] is None:
        added.append(f"From: {formataddr((mailbox.display_name, mailbox.address))}")
    return "".join(f"{line}\r\n" for line in added).encode("utf-8") + raw


def _without_bcc(raw: bytes) -> bytes:
    if BytesHeaderParser(policy=policy.compat32).parsebytes(raw)["Bcc"] is None:
        return raw
    message = BytesParser(policy=policy.SMTP).parsebytes(raw)
    del message["Bcc"]
    return message.as_bytes()


# ---------------------------------------------------------------------------------------------
# Access tokens
# ---------------------------------------------------------------------------------------------


def authenticate(directory: SandboxDirectory, header: str | None) -> Principal:
    """Validate a Bearer access token as Graph does; raises 401 ``InvalidAuthenticationToken``."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise invalid_token("Access token is empty.")
    if token.count(".") != 2:
        raise invalid_token("IDX14100: JWT is not well formed, there are no dots (.).")
    try:
        claims = jwt.decode(
            token.strip(),
            directory.signing_key.private_key.public_key(),
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise invalid_token("Access token validation failure.") from exc
    _check_token_claims(directory, claims)
    return Principal(
        app_id=str(claims.get("appid", "")),
        tenant_id=str(claims.get("tid", "")),
        oid=str(claims.get("oid", "")),
        upn=str(claims["upn"]).lower() if claims.get("idtyp") != "app" and claims.get("upn") else None,
        scopes=frozenset(str(claims.get("scp", "")).lower().split()),
        roles=frozenset(str(role).lower() for role in claims.get("roles", [])),
    )


def _check_token_claims(directory: SandboxDirectory, claims: Mapping[str, Any]) -> None:
    if str(claims.get("aud", "")).rstrip("/").lower() not in GRAPH_AUDIENCES:
        raise invalid_token("Access token validation failure. Invalid audience.")
    now = directory.now().timestamp()
    if float(claims.get("exp", 0)) <= now:
        raise invalid_token("Lifetime validation failed, the token is expired.")
    if float(claims.get("nbf", 0)) > now + 300:
        raise invalid_token("Lifetime validation failed, the token is not yet valid.")
    if not claims.get("scp") and not claims.get("roles"):
        raise invalid_token("The token contains no permissions, or permissions can not be understood.")


# ---------------------------------------------------------------------------------------------
# Resources as Graph renders them
# ---------------------------------------------------------------------------------------------


def _recipient(pair: tuple[str, str]) -> dict[str, Any]:
    name, address = pair
    return {"emailAddress": {"name": name or address, "address": address}}


def _conversation_id(view: MimeView, fallback: str) -> str:
    root = view.thread_root or view.message_id or fallback
    return "AAQkAGI" + base64.urlsafe_b64encode(hashlib.sha256(root.encode()).digest()[:24]).decode()


def message_resource(
    message: StoredMessage, *, id_type: IdType, select: Iterable[str] = (), prefer_text: bool = False
) -> dict[str, Any]:
    view = message.view
    sender = _recipient(view.sender) if view.sender else None
    html = view.html is not None and not (prefer_text and view.text is not None)
    resource: dict[str, Any] = {
        "@odata.etag": f'W/"{message.change_key}"',
        "id": message.shown_id(id_type),
        "createdDateTime": _iso(message.created),
        "lastModifiedDateTime": _iso(message.modified),
        "changeKey": message.change_key,
        "categories": list(message.categories),
        "receivedDateTime": _iso(message.received),
        "sentDateTime": _iso(view.sent or message.received),
        "hasAttachments": any(not a.is_inline for a in view.attachments),
        "internetMessageId": view.message_id,
        "subject": view.subject,
        "bodyPreview": view.preview(),
        "importance": view.importance,
        "parentFolderId": message.folder_id,
        "conversationId": _conversation_id(view, message.immutable_id),
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": False,
        "isRead": message.is_read,
        "isDraft": message.is_draft,
        "webLink": f"https://outlook.office365.com/owa/?ItemID={message.rest_id}&exvsurl=1&viewmodel=ReadMessageItem",
        "inferenceClassification": message.inference,
        "body": {
            "contentType": "html" if html else "text",
            "content": (view.html if html else view.text) or "",
        },
        "sender": sender,
        "from": sender,
        "toRecipients": [_recipient(r) for r in view.to],
        "ccRecipients": [_recipient(r) for r in view.cc],
        "bccRecipients": [_recipient(r) for r in view.bcc],
        "replyTo": [_recipient(r) for r in view.reply_to],
        "flag": {"flagStatus": message.flag_status},
    }
    return _selected(resource, select, message)


def _selected(resource: dict[str, Any], select: Iterable[str], message: StoredMessage) -> dict[str, Any]:
    wanted = {name.strip().lower() for name in select if name.strip()}
    if not wanted:
        return resource
    chosen = {k: v for k, v in resource.items() if k in ("@odata.etag", "id") or k.lower() in wanted}
    if "internetmessageheaders" in wanted:
        headers = BytesHeaderParser(policy=policy.compat32).parsebytes(message.raw)
        chosen["internetMessageHeaders"] = [{"name": k, "value": str(v)} for k, v in headers.items()]
    return chosen


def folder_resource(mailbox: Mailbox, folder: MailFolder) -> dict[str, Any]:
    contained = [m for m in mailbox.messages.values() if m.folder_id == folder.folder_id]
    return {
        "id": folder.folder_id,
        "displayName": folder.display_name,
        "parentFolderId": folder.parent_id,
        "childFolderCount": sum(1 for f in mailbox.folders.values() if f.parent_id == folder.folder_id),
        "unreadItemCount": sum(1 for m in contained if not m.is_read),
        "totalItemCount": len(contained),
        "sizeInBytes": sum(len(m.raw) for m in contained),
        "isHidden": folder.is_hidden,
    }


def attachment_id(message: StoredMessage, index: int) -> str:
    digest = hashlib.sha256(f"{message.immutable_id}/{index}".encode()).digest()
    return "AAMkAGIAAAoBEgAQ" + base64.urlsafe_b64encode(digest).decode()


def attachment_resource(message: StoredMessage, index: int, attachment: AttachmentView) -> dict[str, Any]:
    return {
        "@odata.type": "#microsoft.graph.fileAttachment",
        "@odata.mediaContentType": attachment.content_type,
        "id": attachment_id(message, index),
        "lastModifiedDateTime": _iso(message.modified),
        "name": attachment.name,
        "contentType": attachment.content_type,
        "size": len(attachment.content),
        "isInline": attachment.is_inline,
        "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
    }


def compose_mime(message: Mapping[str, Any], mailbox: Mailbox) -> bytes:
    """The MIME Exchange would build from a JSON message resource (the parts the sandbox supports)."""
    mail = EmailMessage(policy=policy.SMTP)
    sender = _json_address(message.get("from")) or (mailbox.display_name, mailbox.address)
    mail["From"] = formataddr(sender)
    for field_name, header in (
        ("toRecipients", "To"),
        ("ccRecipients", "Cc"),
        ("bccRecipients", "Bcc"),
        ("replyTo", "Reply-To"),
    ):
        addresses = [_json_address(item) for item in message.get(field_name) or []]
        if any(addresses):
            mail[header] = ", ".join(formataddr(a) for a in addresses if a)
    mail["Subject"] = str(message.get("subject") or "")
    for item in message.get("internetMessageHeaders") or []:
        name = str(item.get("name", ""))
        if not name.lower().startswith("x-"):
            raise GraphError(
                400,
                "InvalidInternetMessageHeader",
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            )
        mail[name] = str(item.get("value", ""))
    body = message.get("body") or {}
    html = str(body.get("contentType", "text")).lower() == "html"
    mail.set_content(str(body.get("content", "")), subtype="html" if html else "plain")
    for attachment in message.get("attachments") or []:
        _add_json_attachment(mail, attachment)
    return mail.as_bytes()


def _json_address(value: Any) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("emailAddress"), dict):
        return None
    address = str(value["emailAddress"].get("address", "")).strip()
    return (str(value["emailAddress"].get("name", "") or ""), address) if address else None


def _add_json_attachment(mail: EmailMessage, attachment: Mapping[str, Any]) -> None:
    try:
        content = base64.b64decode(str(attachment.get("contentBytes", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GraphError(
            400, "ErrorInvalidRequest", "The attachment's contentBytes is not valid base64."
        ) from exc
    maintype, _, subtype = str(attachment.get("contentType") or "application/octet-stream").partition("/")
    mail.add_attachment(
        content,
        maintype=maintype,
        subtype=subtype or "octet-stream",
        filename=str(attachment.get("name", "attachment")),
    )


def with_attachment(raw: bytes, session: UploadSession) -> bytes:
    message = BytesParser(policy=policy.SMTP).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    maintype, _, subtype = session.content_type.partition("/")
    message.add_attachment(
        bytes(session.received),
        maintype=maintype,
        subtype=subtype or "octet-stream",
        filename=session.name,
        disposition="inline" if session.is_inline else "attachment",
    )
    return message.as_bytes()


def decode_mime(body: bytes) -> bytes:
    """MIME content as sendMail and create-message take it: base64 in a text/plain body."""
    try:
        raw = base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GraphError(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ) from exc
    if not raw.strip() or not BytesHeaderParser(policy=policy.compat32).parsebytes(raw).keys():
        raise GraphError(
            400,
            "ErrorMimeContentInvalid",
            "MIME content does not contain all required information, malformed formatting, or empty.",
        )
    return raw


# ---------------------------------------------------------------------------------------------
# The HTTP layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestIds:
    request_id: str
    client_request_id: str

    @classmethod
    def of(cls, request: Request) -> RequestIds:
        request_id = str(uuid.uuid4())
        return cls(request_id, request.headers.get("client-request-id") or request_id)


@dataclass(frozen=True)
class GraphCall:
    """One authorised request, handed to an endpoint."""

    request: Request
    principal: Principal
    mailbox: Mailbox
    body: bytes

    @property
    def base_url(self) -> str:
        return f"{self.request.url.scheme}://{self.request.url.netloc}"

    @property
    def id_type(self) -> IdType:
        prefer = ",".join(self.request.headers.getlist("prefer")).lower().replace(" ", "")
        return "immutable" if 'idtype="immutableid"' in prefer else "rest"

    def param(self, name: str) -> str:
        return str(self.request.path_params[name])

    def query(self, name: str) -> str | None:
        return self.request.query_params.get(f"${name}") or self.request.query_params.get(name)

    def select(self) -> tuple[str, ...]:
        return tuple(s for s in (self.query("select") or "").split(",") if s.strip())

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise GraphError(400, "BadRequest", INVALID_JSON) from exc
        if not isinstance(value, dict):
            raise GraphError(400, "BadRequest", INVALID_JSON)
        return value

    def is_mime(self) -> bool:
        content_type = self.request.headers.get("content-type", "").lower()
        if content_type.startswith("text/plain"):
            return True
        if content_type.startswith("application/json") or not content_type:
            return False
        raise GraphError(415, "UnsupportedMediaType", f"The content type '{content_type}' is not supported.")

    def json_response(self, body: Mapping[str, Any], status: int = 200) -> Response:
        headers = {"Preference-Applied": 'IdType="ImmutableId"'} if self.id_type == "immutable" else None
        return graph_json(body, status, headers)


def graph_json(
    body: Mapping[str, Any], status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONResponse(dict(body), status_code=status, headers=dict(headers or {}), media_type=ODATA_JSON)


Handler = Callable[[GraphCall], Response]


class GraphApi:
    """The routes of the sandbox Graph, serving one ``GraphMailStore``."""

    def __init__(self, store: GraphMailStore) -> None:
        self.store = store

    def routes(self) -> list[BaseRoute]:
        table: list[tuple[str, str, Operation, Handler]] = [
            ("GET", "/mailFolders", "read", self.list_folders),
            ("GET", "/mailFolders/{folder}", "read", self.get_folder),
            ("GET", "/mailFolders/{folder}/childFolders", "read", self.list_folders),
            ("GET", "/mailFolders/{folder}/messages", "read", self.list_messages),
            ("GET", "/mailFolders/{folder}/messages/delta", "read", self.delta),
            ("GET", "/messages", "read", self.list_messages),
            ("POST", "/messages", "write", self.create_message),
            ("GET", "/messages/{message}", "read", self.get_message),
            ("PATCH", "/messages/{message}", "write", self.update_message),
            ("DELETE", "/messages/{message}", "write", self.delete_message),
            ("GET", "/messages/{message}/$value", "read", self.get_mime),
            ("POST", "/messages/{message}/move", "write", self.move_message),
            ("POST", "/messages/{message}/send", "send", self.send_draft),
            ("GET", "/messages/{message}/attachments", "read", self.list_attachments),
            ("POST", "/messages/{message}/attachments", "write", self.add_attachment),
            (
                "POST",
                "/messages/{message}/attachments/createUploadSession",
                "write",
                self.create_upload_session,
            ),
            ("POST", "/sendMail", "send", self.send_mail),
        ]
        routes: list[BaseRoute] = [
            Route(prefix + path, self._endpoint(operation, handler), methods=[method])
            for prefix in ("/v1.0/me", "/v1.0/users/{user}")
            for method, path, operation, handler in table
        ]
        routes.append(Route(UPLOAD_ROUTE, self.upload, methods=["PUT", "DELETE"]))
        routes.append(
            Route(
                "/v1.0/{rest:path}", self.unknown_segment, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]
            )
        )
        return routes

    # -- the pipeline every request goes through ------------------------------------------------

    def _endpoint(self, operation: Operation, handler: Handler) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            ids = RequestIds.of(request)
            try:
                response = await self._serve(request, operation, handler)
            except GraphError as error:
                response = self.error(error, ids)
            return _stamp(response, ids)

        return endpoint

    async def _serve(self, request: Request, operation: Operation, handler: Handler) -> Response:
        self.store.take_fault(request.method, request.url.path)
        body = await _bounded_body(request)
        principal = authenticate(self.store.directory, request.headers.get("authorization"))
        with self.store.lock:
            mailbox = self.store.resolve(request.path_params.get("user"), principal)
            self.store.authorize(principal, mailbox, operation)
        with self.store.request_slot(principal.app_id, mailbox.address):
            await self.store.wait_while_held()
            with self.store.lock:
                response = handler(GraphCall(request, principal, mailbox, body))
        self.store.take_fault(request.method, request.url.path, after_serving=True)
        return response

    def error(self, error: GraphError, ids: RequestIds) -> Response:
        headers: dict[str, str] = {}
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        if error.status == 401:
            headers["WWW-Authenticate"] = (
                'Bearer realm="", '
                'authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                'client_id="00000003-0000-0000-c000-000000000000"'
            )
        inner = {
            "date": self.store.directory.now().strftime("%Y-%m-%dT%H:%M:%S"),
            "request-id": ids.request_id,
            "client-request-id": ids.client_request_id,
        }
        body = {"error": {"code": error.code, "message": error.message, "innerError": inner}}
        return graph_json(body, error.status, headers)

    async def unknown_segment(self, request: Request) -> Response:
        ids = RequestIds.of(request)
        segment = request.path_params["rest"].rstrip("/").rpartition("/")[2]
        error = GraphError(400, "BadRequest", f"Resource not found for the segment '{segment}'.")
        return _stamp(self.error(error, ids), ids)

    # -- folders ---------------------------------------------------------------------------------

    def list_folders(self, call: GraphCall) -> Response:
        mailbox = call.mailbox
        parent = self.store.find_folder(
            mailbox, call.param("folder") if "folder" in call.request.path_params else ROOT_FOLDER
        )
        include_hidden = (call.query("includeHiddenFolders") or "").lower() == "true"
        children = sorted(
            (
                f
                for f in mailbox.folders.values()
                if f.parent_id == parent.folder_id and (include_hidden or not f.is_hidden)
            ),
            key=lambda f: f.display_name.lower(),
        )
        resources = [folder_resource(mailbox, f) for f in children]
        return call.json_response(_page(call, resources, context=f"{_context(call)}/mailFolders"))

    def get_folder(self, call: GraphCall) -> Response:
        folder = self.store.find_folder(call.mailbox, call.param("folder"))
        body = {
            "@odata.context": f"{_context(call)}/mailFolders/$entity",
            **folder_resource(call.mailbox, folder),
        }
        return call.json_response(body)

    # -- messages --------------------------------------------------------------------------------

    def list_messages(self, call: GraphCall) -> Response:
        mailbox = call.mailbox
        if "folder" in call.request.path_params:
            found = mailbox.in_folder(self.store.find_folder(mailbox, call.param("folder")).folder_id)
        else:
            found = sorted(mailbox.messages.values(), key=lambda m: (m.received, m.arrival), reverse=True)
        prefer_text = _prefers_text(call)
        resources = [
            message_resource(m, id_type=call.id_type, select=call.select(), prefer_text=prefer_text)
            for m in found
        ]
        return call.json_response(_page(call, resources, context=f"{_context(call)}/messages"))

    def get_message(self, call: GraphCall) -> Response:
        message = self.store.find_message(call.mailbox, call.param("message"))
        resource = message_resource(
            message, id_type=call.id_type, select=call.select(), prefer_text=_prefers_text(call)
        )
        return call.json_response({"@odata.context": f"{_context(call)}/messages/$entity", **resource})

    def get_mime(self, call: GraphCall) -> Response:
        message = self.store.find_message(call.mailbox, call.param("message"))
        # Graph serves MIME content as text/plain: there is no registered type for a whole message.
        return Response(message.raw, media_type="text/plain")

    def update_message(self, call: GraphCall) -> Response:
        message = self.store.find_message(call.mailbox, call.param("message"))
        changes = call.json()
        for name, value in changes.items():
            _apply_patch(message, name, value)
        self.store.touch(call.mailbox, message)
        resource = message_resource(message, id_type=call.id_type)
        return call.json_response({"@odata.context": f"{_context(call)}/messages/$entity", **resource})

    def delete_message(self, call: GraphCall) -> Response:
        self.store.delete(call.mailbox, self.store.find_message(call.mailbox, call.param("message")))
        return Response(status_code=204)

    def move_message(self, call: GraphCall) -> Response:
        message = self.store.find_message(call.mailbox, call.param("message"))
        payload = call.json()
        destination = payload.get("destinationId") or payload.get("DestinationId")
        if not isinstance(destination, str) or not destination:
            raise GraphError(
                400, "ErrorInvalidParameter", "The value of the parameter 'DestinationId' is empty."
            )
        moved = self.store.move(call.mailbox, message, self.store.find_folder(call.mailbox, destination))
        resource = message_resource(moved, id_type=call.id_type)
        return call.json_response({"@odata.context": f"{_context(call)}/messages/$entity", **resource}, 201)

    def create_message(self, call: GraphCall) -> Response:
        raw = decode_mime(call.body) if call.is_mime() else compose_mime(call.json(), call.mailbox)
        draft = self.store.create_draft(call.mailbox, raw)
        resource = message_resource(draft, id_type=call.id_type)
        return call.json_response({"@odata.context": f"{_context(call)}/messages/$entity", **resource}, 201)

    def send_draft(self, call: GraphCall) -> Response:
        draft = self.store.find_message(call.mailbox, call.param("message"))
        if not draft.is_draft:
            raise GraphError(400, "ErrorInvalidOperation", "Only draft messages can be sent.")
        self.store.submit(call.mailbox, call.principal, draft.raw, save_copy=True)
        self.store.purge(call.mailbox, draft)
        return Response(status_code=202)

    def send_mail(self, call: GraphCall) -> Response:
        if call.is_mime():
            raw, save_copy = decode_mime(call.body), True
        else:
            payload = call.json()
            message = payload.get("message") or payload.get("Message")
            if not isinstance(message, dict) or not message:
                raise GraphError(
                    400, "ErrorInvalidParameter", "The value of the parameter 'Message' is empty."
                )
            raw = compose_mime(message, call.mailbox)
            save_copy = str(payload.get("saveToSentItems", True)).lower() != "false"
        self.store.submit(call.mailbox, call.principal, raw, save_copy=save_copy)
        return Response(status_code=202)

    # -- attachments -----------------------------------------------------------------------------

    def list_attachments(self, call: GraphCall) -> Response:
        message = self.store.find_message(call.mailbox, call.param("message"))
        resources = [attachment_resource(message, i, a) for i, a in enumerate(message.view.attachments)]
        context = f"{_context(call)}/messages('{call.param('message')}')/attachments"
        return call.json_response({"@odata.context": context, "value": resources})

    def add_attachment(self, call: GraphCall) -> Response:
        """Attach a file (under 3 MB, as Graph documents) given as a fileAttachment with contentBytes."""
        message = self.store.find_message(call.mailbox, call.param("message"))
        item = call.json()
        if str(item.get("@odata.type", "")).lower() != "#microsoft.graph.fileattachment":
            raise GraphError(400, "ErrorInvalidParameter", "Only file attachments are supported here.")
        mail = BytesParser(policy=policy.SMTP).parsebytes(message.raw)
        assert isinstance(mail, EmailMessage)
        _add_json_attachment(mail, item)
        message.replace_raw(mail.as_bytes())
        self.store.touch(call.mailbox, message)
        index = len(message.view.attachments) - 1
        resource = attachment_resource(message, index, message.view.attachments[index])
        return call.json_response(resource, 201)

    def create_upload_session(self, call: GraphCall) -> Response:
        message = self.store.find_message(call.mailbox, call.param("message"))
        payload = call.json()
        item = payload.get("AttachmentItem") or payload.get("attachmentItem")
        if not isinstance(item, dict):
            raise GraphError(
                400, "ErrorInvalidParameter", "The value of the parameter 'AttachmentItem' is empty."
            )
        session = _new_upload(call, message, item, now=self.store.directory.now())
        self.store.add_upload(session)
        user = f"{call.mailbox.object_id}@{call.mailbox.tenant_id or call.principal.tenant_id}"
        upload_url = (
            f"{call.base_url}/api/v2.0/Users('{user}')/Messages('{message.rest_id}')"
            f"/AttachmentSessions('{session.session_id}')?authtoken={session.secret}"
        )
        body = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
            "uploadUrl": upload_url,
            "expirationDateTime": _iso(session.expires),
            "nextExpectedRanges": ["0-"],
        }
        return call.json_response(body, 201)

    async def upload(self, request: Request) -> Response:
        """PUT a byte range to an upload URL (pre-authenticated: no Authorization header), or DELETE
        it to cancel the session."""
        ids = RequestIds.of(request)
        try:
            self.store.take_fault(request.method, request.url.path)
            body = await _bounded_body(request)
            with self.store.lock:
                session = self.store.find_upload(
                    request.path_params["session"], request.query_params.get("authtoken", "")
                )
                response = (
                    self._take_range(request, session, body)
                    if request.method == "PUT"
                    else self._cancel(session)
                )
        except GraphError as error:
            response = self.error(error, ids)
        return _stamp(response, ids)

    def _cancel(self, session: UploadSession) -> Response:
        self.store.drop_upload(session.session_id)
        return Response(status_code=204)

    def _take_range(self, request: Request, session: UploadSession, body: bytes) -> Response:
        start, end = _content_range(request.headers.get("content-range"), session)
        if end - start + 1 != len(body):
            raise GraphError(
                400, "invalidRequest", "The number of bytes sent does not match the Content-Range header."
            )
        session.received.extend(body)
        if len(session.received) < session.size:
            return graph_json(
                {
                    "@odata.context": "https://outlook.office.com/api/v2.0/$metadata#AttachmentSessions/$entity",
                    "expirationDateTime": _iso(session.expires),
                    "nextExpectedRanges": [str(len(session.received))],
                }
            )
        return self._finish_upload(request, session)

    def _finish_upload(self, request: Request, session: UploadSession) -> Response:
        self.store.drop_upload(session.session_id)
        mailbox = self.store.mailboxes.get(session.address)
        message = mailbox.messages.get(session.immutable_id) if mailbox else None
        if mailbox is None or message is None:
            raise item_not_found()
        message.replace_raw(with_attachment(message.raw, session))
        self.store.touch(mailbox, message)
        index = len(message.view.attachments) - 1
        user_segment = request.url.path.split("/Messages(")[0]
        location = (
            f"{request.url.scheme}://{request.url.netloc}{user_segment}"
            f"/Messages('{message.rest_id}')/Attachments('{attachment_id(message, index)}')"
        )
        return Response(status_code=201, headers={"Location": location})

    # -- delta -----------------------------------------------------------------------------------

    def delta(self, call: GraphCall) -> Response:
        folder = self.store.find_folder(call.mailbox, call.param("folder"))
        skip, delta_token = call.query("skiptoken"), call.query("deltatoken")
        if skip is not None:
            round_id, offset = self._resume_round(call, skip)
        else:
            round_id, offset = self._begin_round(call, folder, delta_token), 0
        return self._delta_page(call, round_id, offset)

    def _begin_round(self, call: GraphCall, folder: MailFolder, delta_token: str | None) -> str:
        mailbox = call.mailbox
        select, change_type, since = call.select(), call.query("changeType"), None
        if delta_token is not None:
            state = _untoken(delta_token)
            if state is None or state.get("m") != mailbox.address or state.get("f") != folder.folder_id:
                raise GraphError(400, "ErrorInvalidSyncStateData", "The SyncStateData is not valid.")
            if state.get("e") != mailbox.sync_epoch:
                raise _sync_state_not_found()
            since, select, change_type = int(state["s"]), tuple(state.get("sel", ())), state.get("ct")
        entries = _delta_entries(mailbox, folder, since, change_type, call.id_type)
        return self.store.start_round(
            DeltaRound(
                address=mailbox.address,
                folder_id=folder.folder_id,
                entries=tuple(entries),
                final_seq=mailbox.seq,
                epoch=mailbox.sync_epoch,
                select=select,
                change_type=change_type,
                page_size=_max_page_size(call.request) or DEFAULT_PAGE_SIZE,
                id_type=call.id_type,
            )
        )

    def _resume_round(self, call: GraphCall, skip: str) -> tuple[str, int]:
        state = _untoken(skip)
        round_ = self.store.find_round(str(state.get("r"))) if state else None
        if state is None or round_ is None or round_.address != call.mailbox.address:
            raise GraphError(400, "ErrorInvalidSyncStateData", "The SyncStateData is not valid.")
        if round_.epoch != call.mailbox.sync_epoch:
            raise _sync_state_not_found()
        return str(state["r"]), int(state.get("o", 0))

    def _delta_page(self, call: GraphCall, round_id: str, offset: int) -> Response:
        round_ = self.store.find_round(round_id)
        assert round_ is not None
        mailbox = call.mailbox
        page = round_.entries[offset : offset + round_.page_size]
        value = [_delta_item(mailbox, round_, entry) for entry in page]
        link = f"{call.base_url}{call.request.url.path}"
        body: dict[str, Any] = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(message)",
            "value": value,
        }
        if offset + round_.page_size < len(round_.entries):
            token = _token({"r": round_id, "o": offset + round_.page_size})
            body["@odata.nextLink"] = f"{link}?{urlencode({'$skiptoken': token})}"
        else:
            token = _token(
                {
                    "m": mailbox.address,
                    "f": round_.folder_id,
                    "s": round_.final_seq,
                    "e": round_.epoch,
                    "sel": list(round_.select),
                    "ct": round_.change_type,
                }
            )
            body["@odata.deltaLink"] = f"{link}?{urlencode({'$deltatoken': token})}"
        applied = [f"odata.maxpagesize={round_.page_size}"]
        if round_.id_type == "immutable":
            applied.append('IdType="ImmutableId"')
        return graph_json(body, headers={"Preference-Applied": ", ".join(applied)})


UPLOAD_ROUTE = "/api/v2.0/Users('{user}')/Messages('{message}')/AttachmentSessions('{session}')"


def _stamp(response: Response, ids: RequestIds) -> Response:
    response.headers["request-id"] = ids.request_id
    response.headers["client-request-id"] = ids.client_request_id
    return response


async def _bounded_body(request: Request) -> bytes:
    # The whole body is read even when too large, so the client sees the 413 instead of a reset.
    body = await request.body()
    if len(body) > MAX_REQUEST_BYTES:
        raise GraphError(413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")
    return body


def _context(call: GraphCall) -> str:
    user = call.request.path_params.get("user")
    return f"https://graph.microsoft.com/v1.0/$metadata#users('{user or call.mailbox.address}')"


def _prefers_text(call: GraphCall) -> bool:
    prefer = ",".join(call.request.headers.getlist("prefer")).lower().replace(" ", "")
    return 'outlook.body-content-type="text"' in prefer


def _max_page_size(request: Request) -> int | None:
    found = re.search(r"odata\.maxpagesize=(\d+)", ",".join(request.headers.getlist("prefer")))
    return max(1, min(int(found.group(1)), MAX_PAGE_SIZE)) if found else None


def _page(call: GraphCall, resources: list[dict[str, Any]], *, context: str) -> dict[str, Any]:
    """One page of a collection with ``$top`` and ``$skip``, and the nextLink to the following one."""
    top = _int_query(call, "top", DEFAULT_PAGE_SIZE)
    skip = _int_query(call, "skip", 0)
    body: dict[str, Any] = {"@odata.context": context, "value": resources[skip : skip + top]}
    if skip + top < len(resources):
        query = {k: v for k, v in call.request.query_params.items() if k.lstrip("$") not in ("top", "skip")}
        query |= {"$top": str(top), "$skip": str(skip + top)}
        body["@odata.nextLink"] = f"{call.base_url}{call.request.url.path}?{urlencode(query)}"
    return body


def _int_query(call: GraphCall, name: str, default: int) -> int:
    value = call.query(name)
    if value is None:
        return default
    if not value.isdigit() or (name == "top" and not 0 < int(value) <= MAX_PAGE_SIZE):
        raise GraphError(400, "BadRequest", f"Invalid value '{value}' for query option '${name}'.")
    return int(value)


def _apply_patch(message: StoredMessage, name: str, value: Any) -> None:
    key = name.lower()
    if key not in PATCHABLE | PATCH_IGNORED:
        raise GraphError(
            400,
            "RequestBodyRead",
            f"The property '{name}' does not exist on type 'microsoft.graph.message'. Make sure to only use "
            "property names that are defined by the type or mark the type as open type.",
        )
    if key == "isread":
        message.is_read = bool(value)
    elif key == "categories" and isinstance(value, list):
        message.categories = [str(item) for item in value]
    elif key == "flag" and isinstance(value, dict):
        message.flag_status = str(value.get("flagStatus", message.flag_status))
    elif key == "inferenceclassification":
        message.inference = str(value)


def _content_range(header: str | None, session: UploadSession) -> tuple[int, int]:
    found = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*", header or "")
    if found is None:
        raise GraphError(400, "invalidRequest", "The Content-Range header is missing or malformed.")
    start, end, total = (int(part) for part in found.groups())
    if total != session.size:
        raise GraphError(
            400,
            "invalidRange",
            "Declared total size for this fragment is different from that of the upload session.",
        )
    if start != len(session.received) or end < start or end >= total:
        raise GraphError(
            416,
            "invalidRange",
            f"The uploaded fragment is out of order; the next expected byte is {len(session.received)}.",
        )
    return start, end


def _new_upload(
    call: GraphCall, message: StoredMessage, item: Mapping[str, Any], *, now: datetime
) -> UploadSession:
    if str(item.get("attachmentType", "file")).lower() != "file":
        raise GraphError(400, "ErrorInvalidParameter", "Only file attachments can be uploaded in a session.")
    size = item.get("size")
    if not isinstance(size, int) or size < UPLOAD_MIN_BYTES:
        raise GraphError(
            400,
            "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
            "Attachment size must be greater than the minimum size.",
        )
    if size > UPLOAD_MAX_BYTES:
        raise GraphError(400, "ErrorAttachmentSizeLimitExceeded", "The attachment is larger than 150 MB.")
    return UploadSession(
        session_id=_new_id("AAMkAGU"),
        secret=secrets.token_urlsafe(32),
        address=call.mailbox.address,
        immutable_id=message.immutable_id,
        name=str(item.get("name") or "attachment"),
        size=size,
        content_type=str(item.get("contentType") or "application/octet-stream"),
        is_inline=bool(item.get("isInline", False)),
        expires=now + UPLOAD_SESSION_LIFETIME,
    )


def _sync_state_not_found() -> GraphError:
    return GraphError(
        410,
        "syncStateNotFound",
        "The sync state generation is not found. "
        "The delta token is expired and data must be synchronized again.",
    )


def _delta_entries(
    mailbox: Mailbox, folder: MailFolder, since: int | None, change_type: str | None, id_type: IdType
) -> list[tuple[str, str, str]]:
    """What a delta round reports: every message on the first round, changes since ``since`` after."""
    present = mailbox.in_folder(folder.folder_id)
    if since is None:
        return [("message", m.immutable_id, m.shown_id(id_type)) for m in present]
    wanted = (change_type or "").lower()
    entries: list[tuple[str, str, str]] = []
    for message in present:
        created = message.entered_seq > since
        updated = not created and message.changed_seq > since
        if (created and wanted in ("", "created")) or (updated and wanted in ("", "updated")):
            entries.append(("message", message.immutable_id, message.shown_id(id_type)))
    if wanted in ("", "deleted"):
        entries += _removed_since(mailbox, folder, since, id_type)
    return entries


def _removed_since(
    mailbox: Mailbox, folder: MailFolder, since: int, id_type: IdType
) -> list[tuple[str, str, str]]:
    present = {m.immutable_id for m in mailbox.in_folder(folder.folder_id)}
    removed: dict[str, tuple[str, str, str]] = {}
    for removal in mailbox.removals:
        if removal.seq <= since or removal.folder_id != folder.folder_id:
            continue
        if id_type == "immutable" and removal.immutable_id in present:
            continue  # it left and came back: under an immutable id that is an update, not a removal
        shown = removal.immutable_id if id_type == "immutable" else removal.rest_id
        removed.setdefault(shown, ("removed", removal.immutable_id, shown))
    return list(removed.values())


def _delta_item(mailbox: Mailbox, round_: DeltaRound, entry: tuple[str, str, str]) -> dict[str, Any]:
    kind, immutable_id, shown = entry
    message = mailbox.messages.get(immutable_id) if kind == "message" else None
    if message is None or message.folder_id != round_.folder_id:
        # Removed, or gone since the round began: report the id the client knows as removed.
        return {"@odata.type": "#microsoft.graph.message", "id": shown, "@removed": {"reason": "deleted"}}
    resource = message_resource(message, id_type=round_.id_type, select=round_.select)
    return {"@odata.type": "#microsoft.graph.message", **resource}


def graph_routes(store: GraphMailStore) -> list[BaseRoute]:
    """The routes to add to the sandbox's web app, ahead of its own."""
    return GraphApi(store).routes()
