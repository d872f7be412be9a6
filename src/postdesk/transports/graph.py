"""Microsoft Graph mail for one mailbox (``/me`` or ``/users/{address}``), over HTTPS with httpx.

What IMAP and SMTP do for a mailbox, through Graph: list folders for a picker, follow a folder's
changes with delta queries, read a message's MIME, flag, move or delete messages, and send MIME (in
one ``sendMail`` while it fits Graph's 4 MB request limit, else through a draft, upload sessions and
``send``). The client only moves bytes; it knows nothing about tickets.

Graph's rules it keeps, from Microsoft's documentation on throttling and on Outlook mail:

- At most four requests at a time per app and mailbox: every client in the process for the same
  Graph URL and mailbox shares one semaphore.
- 429 and 503 answers say how long to wait in ``Retry-After``: the client waits that long, up to a
  bounded total, then reports a transient error that says so. A send is never repeated after any
  other 5xx: the mail may have gone out regardless, so the outbox settles it through Sent Items.
- Every request carries a fresh ``client-request-id``; it is logged with the answer's ``request-id``
  and written into error texts, because those two are what Microsoft support asks for.
- The access token only goes to the configured Graph host: next and delta links are checked before
  they are followed, and upload URLs, which are pre-authenticated, get no token at all.

Failures become ``TransportError``: ``needs_reauth`` when the token is refused, ``permanent`` with the
fix in plain words (the PowerShell line for shared mailboxes, the Exchange setting for app-only
access), transient for throttling, outages and network failures.
"""

from __future__ import annotations

import base64
import email
import io
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import quote, urlsplit

import httpx

from postdesk.transports.errors import OutcomeUnknown, TransportError

log = logging.getLogger(__name__)

API_VERSION = "v1.0"
# Graph refuses request bodies over 4 MB (413). MIME travels base64-encoded, a third larger than raw.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Graph's split for attachments: under 3 MB in one POST, from 3 MB to 150 MB through an upload session.
UPLOAD_SESSION_MIN_BYTES = 3 * 1024 * 1024
# Upload ranges are whole multiples of 320 KiB, and each PUT stays under the 4 MB request limit.
UPLOAD_RANGE_UNIT = 320 * 1024
DEFAULT_UPLOAD_RANGE = 10 * UPLOAD_RANGE_UNIT
# Graph's documented limit for Outlook resources: four concurrent requests per app and mailbox.
DEFAULT_MAX_CONCURRENT = 4
DEFAULT_MAX_RETRY_WAIT = 30.0
DEFAULT_TIMEOUT = 60.0
DEFAULT_PAGE_SIZE = 100
# Exchange Online's largest message size.
DEFAULT_MAX_MESSAGE_BYTES = 150 * 1024 * 1024
# When a 503 or 504 comes without Retry-After: wait 1, 2, 4 ... seconds, never more than this at once.
MAX_BACKOFF = 30.0
BUSY_STATUSES = frozenset({429, 503, 504})
# Enough to dedupe and to apply the first-connection choice (only unread / since a date) without
# downloading each message's body in the delta round.
DELTA_FIELDS = "internetMessageId,receivedDateTime,isRead"
# Error codes saying a delta or skip token cannot be used any more: the folder must be read afresh.
SYNC_STATE_LOST = frozenset(
    {"syncstatenotfound", "syncstateinvalid", "resyncrequired", "errorinvalidsyncstatedata"}
)
NOT_ON_EXCHANGE_ONLINE = frozenset({"mailboxnotenabledforrestapi", "mailboxnotsupportedforrestapi"})
RETRIED = "this is usually temporary and is retried automatically"

Operation = Literal["read", "write", "send"]
ChangeType = Literal["created", "updated", "deleted"]
TokenSource = str | Callable[[], str]
Result = TypeVar("Result")

# The least permission each operation needs, delegated for one's own mailbox or app-only.
PERMISSIONS: dict[Operation, str] = {"read": "Mail.Read", "write": "Mail.ReadWrite", "send": "Mail.Send"}
# ... and delegated for somebody else's (shared) mailbox.
SHARED_PERMISSIONS: dict[Operation, str] = {
    "read": "Mail.Read.Shared",
    "write": "Mail.ReadWrite.Shared",
    "send": "Mail.Send.Shared",
}

_slots_lock = threading.Lock()
_slots: dict[tuple[str, str], threading.BoundedSemaphore] = {}


def mailbox_slots(api_root: str, mailbox_key: str, size: int) -> threading.BoundedSemaphore:
    """The semaphore that caps concurrent requests to one mailbox, shared within the process. The
    first client for a mailbox sets its size."""
    with _slots_lock:
        return _slots.setdefault((api_root, mailbox_key), threading.BoundedSemaphore(size))


# ---------------------------------------------------------------------------------------------
# What the client returns and raises
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestTrace:
    """What Microsoft support needs to find one request in their logs."""

    client_request_id: str
    request_id: str | None

    def __str__(self) -> str:
        return f"request-id {self.request_id or 'none'}, client-request-id {self.client_request_id}"


class GraphRefusal(TransportError):
    """Graph answered with an error: its HTTP status, Graph's error code and the request's trace."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        trace: RequestTrace,
        permanent: bool = False,
        needs_reauth: bool = False,
    ) -> None:
        super().__init__(message, permanent=permanent, needs_reauth=needs_reauth)
        self.status = status
        self.code = code
        self.trace = trace

    @property
    def item_gone(self) -> bool:
        """The message or folder is not there any more (moved or deleted meanwhile)."""
        return self.status == 404 and self.code.lower() == "erroritemnotfound"

    @property
    def sync_state_lost(self) -> bool:
        """A delta or skip token cannot be used any more; only a full round helps."""
        return self.status == 410 or self.code.lower() in SYNC_STATE_LOST


class MessageTooLarge(TransportError):
    """A message is larger than the caller accepts; it stays on the server."""

    def __init__(self, message_id: str, limit: int) -> None:
        super().__init__(
            f"the message is larger than {limit} bytes, the most Postdesk reads; it stays in the mailbox",
            permanent=True,
        )
        self.message_id = message_id
        self.limit = limit


class FolderChoice(NamedTuple):
    """A folder for the folder picker: its id and its path from the top (``Inbox/Customers``)."""

    id: str
    path: str


@dataclass(frozen=True)
class DeltaMessage:
    """A message that is new in the folder or changed there since the last round."""

    id: str
    internet_message_id: str | None
    received: datetime | None
    is_read: bool | None


@dataclass(frozen=True)
class DeltaPage:
    """One page of a delta round. ``resync`` marks pages of a full round that replaced a lost delta
    state: they list every message now in the folder, not only the changes."""

    messages: tuple[DeltaMessage, ...]
    removed: tuple[str, ...]
    resync: bool


class DeltaRound:
    """The changes in a folder since a delta link (or everything in it, without one), page by page.

    Iterate the pages, store each page's messages durably, and only then persist ``delta_link``: if
    the process dies in between, the next round starts from the old link and replays those messages
    (storage is idempotent per Message-ID), so nothing is lost. When Graph has forgotten the delta
    state (410 ``syncStateNotFound``), the round starts over as a full round by itself and sets
    ``resynced``; its pages then carry ``resync=True``.
    """

    def __init__(
        self,
        fetch_page: Callable[[str], dict[str, Any]],
        *,
        first_url: str,
        start: str | None,
        resynced: bool,
    ) -> None:
        self._fetch_page = fetch_page
        self._first_url = first_url
        self._start = start
        self._delta_link: str | None = None
        self._iterated = False
        self.resynced = resynced

    def __iter__(self) -> Iterator[DeltaPage]:
        if self._iterated:
            raise RuntimeError("a delta round can be iterated once; ask delta() for a new one")
        self._iterated = True
        url = self._start or self._first_url
        while True:
            try:
                body = self._fetch_page(url)
            except GraphRefusal as refusal:
                if not refusal.sync_state_lost or self.resynced:
                    raise
                log.warning(
                    "Graph lost the delta state (%s, %s); reading the folder afresh",
                    refusal.code,
                    refusal.trace,
                )
                self.resynced, url = True, self._first_url
                continue
            yield _delta_page(body, resync=self.resynced)
            if "@odata.deltaLink" in body:
                self._delta_link = str(body["@odata.deltaLink"])
                return
            url = _next_link(body)

    @property
    def delta_link(self) -> str:
        """Where the next round starts; known once every page has been read."""
        if self._delta_link is None:
            raise RuntimeError("the delta round is not finished: read all its pages first")
        return self._delta_link


def _next_link(body: dict[str, Any]) -> str:
    link = body.get("@odata.nextLink")
    if not isinstance(link, str) or not link:
        raise TransportError("Microsoft Graph's delta answer has neither a next link nor a delta link")
    return link


def _delta_page(body: dict[str, Any], *, resync: bool) -> DeltaPage:
    messages: list[DeltaMessage] = []
    removed: list[str] = []
    for item in body.get("value") or []:
        if "@removed" in item:
            removed.append(str(item["id"]))
            continue
        messages.append(
            DeltaMessage(
                id=str(item["id"]),
                internet_message_id=item.get("internetMessageId"),
                received=_timestamp(item.get("receivedDateTime")),
                is_read=item.get("isRead"),
            )
        )
    return DeltaPage(tuple(messages), tuple(removed), resync)


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Purpose:
    """What a request is for, to word its errors: "reading a message", read/write/send, the sender."""

    action: str
    operation: Operation
    sender: str | None = None


@dataclass(frozen=True)
class _Busy:
    """A 429, 503 or 504 answer: wait and try again."""

    status: int
    code: str
    retry_after: float | None
    trace: RequestTrace

    def delay(self, attempt: int) -> float:
        return self.retry_after if self.retry_after is not None else min(2.0**attempt, MAX_BACKOFF)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


class GraphMailbox:
    """Microsoft Graph mail for one mailbox. Use as a context manager; one instance per thread.

    ``base_url`` is the Graph root of the cloud (``https://graph.microsoft.com``, from
    ``endpoints_for(settings).graph_url``); ``mailbox`` is the address to act on, or None for the
    signed-in user's own (``/me``). ``token`` is an access token, or a function returning a current
    one, called before every request. ``delegate`` (the signed-in account) and ``app_only`` only
    shape error texts. With ``immutable_ids`` (the default) message ids survive moves.
    """

    def __init__(
        self,
        base_url: str,
        mailbox: str | None,
        *,
        token: TokenSource,
        ssl_context: ssl.SSLContext,
        delegate: str | None = None,
        app_only: bool = False,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
        timeout: float = DEFAULT_TIMEOUT,
        page_size: int = DEFAULT_PAGE_SIZE,
        upload_range: int = DEFAULT_UPLOAD_RANGE,
        immutable_ids: bool = True,
    ) -> None:
        if upload_range <= 0 or upload_range % UPLOAD_RANGE_UNIT or upload_range >= MAX_REQUEST_BYTES:
            raise ValueError("upload_range must be a multiple of 320 KiB below 4 MB")
        if app_only and mailbox is None:
            raise ValueError("app-only access has no signed-in user: name the mailbox")
        root = base_url.rstrip("/")
        self.api = root if root.endswith(f"/{API_VERSION}") else f"{root}/{API_VERSION}"
        self.mailbox = mailbox.lower() if mailbox else None
        self.delegate = delegate.lower() if delegate else None
        self.app_only = app_only
        self.max_retry_wait = max_retry_wait
        self.page_size = page_size
        self.upload_range = upload_range
        self.last_trace: RequestTrace | None = None
        self._token = token
        self._immutable_ids = immutable_ids
        self._origin = _origin(self.api)
        self._segment = "/me" if mailbox is None else f"/users/{quote(mailbox, safe='@')}"
        self._slots = mailbox_slots(self.api, self.mailbox or f"me:{self.delegate or ''}", max_concurrent)
        # trust_env off: proxy and CA variables of the environment do not apply, as for every other call.
        self._client = httpx.Client(
            verify=ssl_context,
            trust_env=False,
            timeout=timeout,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_concurrent),
            headers={"User-Agent": "Postdesk"},
        )

    def __enter__(self) -> GraphMailbox:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- reading ---------------------------------------------------------------------------------

    def folder_id(self, reference: str) -> str:
        """The id of a folder named by id or by well-known name (``inbox``, ``sentitems``)."""
        url = self._url(f"/mailFolders/{quote(reference, safe='')}")
        folder = self._call("GET", url, _Purpose("finding the mail folder", "read"), reader=_json)
        return str(folder["id"])

    def sent_items_holding(self, internet_message_ids: Iterable[str]) -> set[str]:
        """Which of these Message-IDs are in the mailbox's Sent Items (settling an interrupted send)."""
        purpose = _Purpose("looking in Sent Items", "read")
        return {wanted for wanted in internet_message_ids if self._holding("sentitems", wanted, purpose)}

    def discard_drafts_of(self, internet_message_ids: Iterable[str]) -> int:
        """Delete the drafts of these Message-IDs that an interrupted large send left in Drafts, before
        the message is sent again: left there, someone could send the same reply a second time."""
        purpose = _Purpose("clearing an unsent draft", "write")
        discarded = 0
        for wanted in internet_message_ids:
            for item in self._holding("drafts", wanted, purpose):
                self._discard_draft(str(item["id"]))
                discarded += 1
        return discarded

    def _holding(self, folder: str, internet_message_id: str, purpose: _Purpose) -> list[dict[str, Any]]:
        """The messages of a folder with this Message-ID."""
        # OData doubles a quote inside a string literal. The filter narrows the answer on Graph; the
        # comparison below is what decides.
        literal = internet_message_id.replace("'", "''")
        params = {"$filter": f"internetMessageId eq '{literal}'", "$select": "id,internetMessageId"}
        url = str(httpx.URL(self._url(f"/mailFolders/{folder}/messages"), params=params))
        return [
            item
            for item in self._collection(url, purpose)
            if str(item.get("internetMessageId") or "").strip() == internet_message_id.strip()
        ]

    def folders(self) -> list[FolderChoice]:
        """Every folder under the top of the mailbox, parents before their children."""
        found: list[FolderChoice] = []
        self._add_folders(self._url("/mailFolders"), "", found)
        return found

    def _add_folders(self, url: str, prefix: str, found: list[FolderChoice]) -> None:
        for folder in self._collection(url, _Purpose("listing folders", "read")):
            path = f"{prefix}{folder.get('displayName', '')}"
            found.append(FolderChoice(str(folder["id"]), path))
            if folder.get("childFolderCount"):
                children = self._url(f"/mailFolders/{_quoted(str(folder['id']))}/childFolders")
                self._add_folders(children, f"{path}/", found)

    def delta(
        self, folder_id: str, delta_link: str | None = None, *, change_type: ChangeType | None = None
    ) -> DeltaRound:
        """The folder's changes since ``delta_link`` (a full round without one). ``folder_id`` may be a
        well-known name such as ``inbox``. See ``DeltaRound`` for when to persist the new link."""
        params = {"$select": DELTA_FIELDS} | ({"changeType": change_type} if change_type else {})
        first_url = str(
            httpx.URL(self._url(f"/mailFolders/{_quoted(folder_id)}/messages/delta"), params=params)
        )
        resynced = False
        if delta_link is not None and _origin(delta_link) != self._origin:
            # Graph's URL changed since the link was stored (a move between clouds): read afresh
            # rather than send the token elsewhere.
            log.warning("the stored delta link is not on %s; reading the folder afresh", self._origin)
            delta_link, resynced = None, True
        return DeltaRound(self._delta_page, first_url=first_url, start=delta_link, resynced=resynced)

    def _delta_page(self, url: str) -> dict[str, Any]:
        prefer = [f"odata.maxpagesize={self.page_size}"]
        return self._call(
            "GET", url, _Purpose("reading the folder's changes", "read"), reader=_json, prefer=prefer
        )

    def raw(self, message_id: str, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes | None:
        """The message's MIME bytes, or None when it was moved or deleted meanwhile. Raises
        ``MessageTooLarge`` past ``max_bytes`` without reading the rest."""
        url = self._url(f"/messages/{_quoted(message_id)}/$value")
        try:
            return self._call(
                "GET",
                url,
                _Purpose("reading a message", "read"),
                reader=lambda response: _read_capped(response, message_id, max_bytes),
            )
        except GraphRefusal as refusal:
            if refusal.item_gone:
                log.info("message %s is gone from the mailbox; skipped (%s)", message_id, refusal.trace)
                return None
            raise

    # -- changing --------------------------------------------------------------------------------

    def mark_read(self, message_ids: Sequence[str]) -> list[str]:
        """Flag messages read; returns the ids that were gone (skipped)."""
        purpose = _Purpose("flagging mail as read", "write")
        return [
            message_id
            for message_id in message_ids
            if not self._on_message("PATCH", message_id, "", purpose, json_body={"isRead": True})
        ]

    def move(self, message_ids: Sequence[str], destination_folder_id: str) -> dict[str, str | None]:
        """Move messages; returns each message's id in its new folder (the same id with immutable ids),
        or None when it was gone."""
        purpose = _Purpose("moving mail", "write")
        body = {"destinationId": destination_folder_id}
        moved: dict[str, str | None] = {}
        for message_id in message_ids:
            answer = self._on_message("POST", message_id, "/move", purpose, json_body=body)
            moved[message_id] = str(answer["id"]) if answer else None
        return moved

    def delete(self, message_ids: Sequence[str]) -> list[str]:
        """Delete messages (Graph moves them to Deleted Items); returns the ids that were gone."""
        purpose = _Purpose("deleting mail", "write")
        return [
            message_id
            for message_id in message_ids
            if self._on_message("DELETE", message_id, "", purpose) is None
        ]

    def _on_message(
        self,
        method: str,
        message_id: str,
        suffix: str,
        purpose: _Purpose,
        *,
        json_body: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """One request on one message: its JSON answer ({} when empty), or None when it is gone."""
        url = self._url(f"/messages/{_quoted(message_id)}{suffix}")
        try:
            return self._call(method, url, purpose, reader=_json, json_body=json_body)
        except GraphRefusal as refusal:
            if refusal.item_gone:
                log.info("message %s is gone from the mailbox; skipped (%s)", message_id, refusal.trace)
                return None
            raise

    # -- sending ---------------------------------------------------------------------------------

    def send_mime(self, raw: bytes) -> None:
        """Send a MIME message from this mailbox; Exchange keeps a copy in Sent Items. Messages over
        Graph's 4 MB request limit go through a draft with their large attachments uploaded apart.
        Raises ``OutcomeUnknown`` when the connection broke after the send request went out."""
        encoded = base64.b64encode(raw)
        purpose = _Purpose("sending mail", "send", sender=_from_address(raw))
        if len(encoded) <= MAX_REQUEST_BYTES:
            self._call(
                "POST",
                self._url("/sendMail"),
                purpose,
                content=encoded,
                reader=_ignore,
                headers={"Content-Type": "text/plain"},
                may_have_sent=True,
            )
            return
        self._send_through_draft(raw, purpose)

    def _send_through_draft(self, raw: bytes, purpose: _Purpose) -> None:
        draft_mime, detached = detach_attachments(raw)
        draft_id = self._create_draft(draft_mime, purpose)
        try:
            for attachment in detached:
                self._attach(draft_id, attachment, purpose)
            self._call(
                "POST",
                self._url(f"/messages/{_quoted(draft_id)}/send"),
                _Purpose("sending mail", "send", purpose.sender),
                reader=_ignore,
                may_have_sent=True,
            )
        except OutcomeUnknown:
            raise  # the draft may have been sent: leave it for a person to check
        except BaseException:
            self._discard_draft(draft_id)
            raise
        log.info("sent a %d-byte message through a draft with %d attachments added", len(raw), len(detached))

    def _create_draft(self, mime: bytes, purpose: _Purpose) -> str:
        draft = self._call(
            "POST",
            self._url("/messages"),
            _Purpose("preparing a large message", "write", purpose.sender),
            reader=_json,
            content=base64.b64encode(mime),
            headers={"Content-Type": "text/plain"},
        )
        return str(draft["id"])

    def _attach(self, draft_id: str, attachment: DetachedAttachment, purpose: _Purpose) -> None:
        adding = _Purpose("adding an attachment to a large message", "write", purpose.sender)
        if attachment.size >= UPLOAD_SESSION_MIN_BYTES:
            self._upload(draft_id, attachment, adding)
            return
        body: dict[str, Any] = {
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": attachment.name,
            "contentType": attachment.content_type,
            "contentBytes": base64.b64encode(attachment.content).decode("ascii"),
            "isInline": attachment.is_inline,
        }
        if attachment.content_id:
            body["contentId"] = attachment.content_id
        self._call(
            "POST",
            self._url(f"/messages/{_quoted(draft_id)}/attachments"),
            adding,
            reader=_ignore,
            json_body=body,
        )

    def _upload(self, draft_id: str, attachment: DetachedAttachment, purpose: _Purpose) -> None:
        item: dict[str, Any] = {
            "attachmentType": "file",
            "name": attachment.name,
            "size": attachment.size,
            "contentType": attachment.content_type,
            "isInline": attachment.is_inline,
        }
        if attachment.content_id:
            item["contentId"] = attachment.content_id
        url = self._url(f"/messages/{_quoted(draft_id)}/attachments/createUploadSession")
        session = self._call("POST", url, purpose, reader=_json, json_body={"AttachmentItem": item})
        try:
            self._put_ranges(str(session["uploadUrl"]), attachment.content, purpose)
        except GraphRefusal as refusal:
            if refusal.status not in (401, 403, 404):
                raise
            # The session's own credential expired or was dropped: nothing a new sign-in would fix.
            raise TransportError(
                f"{purpose.action} failed: the upload session ended before the attachment was complete "
                f"({refusal.status} {refusal.code}); {RETRIED} ({refusal.trace})"
            ) from refusal

    def _put_ranges(self, upload_url: str, content: bytes, purpose: _Purpose) -> None:
        size = len(content)
        for start in range(0, size, self.upload_range):
            chunk = content[start : start + self.upload_range]
            # The upload URL carries its own credential; Graph refuses a bearer token next to it.
            self._call(
                "PUT",
                upload_url,
                purpose,
                content=chunk,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{size}",
                },
                reader=_ignore,
                authorized=False,
            )

    def _discard_draft(self, draft_id: str) -> None:
        try:
            url = self._url(f"/messages/{_quoted(draft_id)}")
            self._call("DELETE", url, _Purpose("discarding a draft", "write"), reader=_ignore)
        except TransportError as exc:
            log.warning("could not discard the unsent draft %s: %s", draft_id, exc)

    # -- one request, with throttling, tracing and errors -------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.api}{self._segment}{path}"

    def _collection(self, url: str, purpose: _Purpose) -> Iterator[dict[str, Any]]:
        """The items of a collection, following ``@odata.nextLink`` to the end."""
        next_url: str | None = str(httpx.URL(url, params={"$top": str(self.page_size)}))
        while next_url:
            page = self._call("GET", next_url, purpose, reader=_json)
            yield from page.get("value") or []
            link = page.get("@odata.nextLink")
            next_url = link if isinstance(link, str) else None

    def _call(
        self,
        method: str,
        url: str,
        purpose: _Purpose,
        *,
        reader: Callable[[httpx.Response], Result],
        json_body: dict[str, Any] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        prefer: Sequence[str] = (),
        authorized: bool = True,
        may_have_sent: bool = False,
    ) -> Result:
        """Send one request, waiting out 429/503/504 as Graph asks, within ``max_retry_wait`` in all;
        ``reader`` turns a successful answer into the result while the request's slot is held."""
        if authorized and _origin(url) != self._origin:
            raise TransportError(
                f"{purpose.action} failed: Graph pointed to {_origin(url)}, not {self._origin}; the access "
                "token is only sent to POSTDESK_MICROSOFT_GRAPH_URL",
                permanent=True,
            )
        waited, attempt = 0.0, 0
        while True:
            request = self._client.build_request(
                method,
                url,
                json=json_body,
                content=content,
                headers=self._headers(headers, prefer, authorized),
            )
            outcome = self._attempt(request, purpose, reader, may_have_sent=may_have_sent)
            if not isinstance(outcome, _Busy):
                return outcome
            delay = outcome.delay(attempt)
            if waited + delay > self.max_retry_wait:
                raise self._still_busy(outcome, purpose, waited=waited, delay=delay)
            log.info(
                "Graph answered %s %s; waiting %.1f s as asked (%s)",
                outcome.status,
                outcome.code,
                delay,
                outcome.trace,
            )
            time.sleep(delay)
            waited, attempt = waited + delay, attempt + 1

    def _headers(
        self, extra: dict[str, str] | None, prefer: Sequence[str], authorized: bool
    ) -> dict[str, str]:
        headers = {"client-request-id": str(uuid.uuid4()), **(extra or {})}
        if authorized:
            token = self._token() if callable(self._token) else self._token
            headers["Authorization"] = f"Bearer {token}"
            preferences = [*prefer, 'IdType="ImmutableId"'] if self._immutable_ids else list(prefer)
            if preferences:
                headers["Prefer"] = ", ".join(preferences)
        return headers

    def _attempt(
        self,
        request: httpx.Request,
        purpose: _Purpose,
        reader: Callable[[httpx.Response], Result],
        *,
        may_have_sent: bool,
    ) -> Result | _Busy:
        client_request_id = request.headers["client-request-id"]
        with self._slots:
            started = time.monotonic()
            try:
                response = self._client.send(request, stream=True)
                try:
                    trace = RequestTrace(client_request_id, response.headers.get("request-id"))
                    self.last_trace = trace
                    if response.status_code < 400:
                        _log_exchange(request, response.status_code, "", trace, started)
                        return reader(response)
                    response.read()
                finally:
                    response.close()
            except httpx.TransportError as exc:
                raise self._network_failure(
                    exc, purpose, client_request_id, may_have_sent=may_have_sent
                ) from exc
        code, message = _graph_error(response)
        _log_exchange(request, response.status_code, code, trace, started)
        if may_have_sent and response.status_code >= 500 and response.status_code != 503:
            # 500, 502, 504: a front end's answer while the mailbox server may have sent it all the
            # same. Trying again could send it twice; the outbox looks in Sent Items first. (503 is
            # Graph turning the request away, to be tried again after Retry-After.)
            raise OutcomeUnknown(
                f"Microsoft Graph answered {response.status_code} {code or 'without an error code'} after "
                "the message was handed over; it may or may not have been sent: check the mailbox's "
                f"Sent Items ({trace})"
            )
        if response.status_code in BUSY_STATUSES:
            return _Busy(response.status_code, code, _retry_after(response.headers.get("retry-after")), trace)
        raise self._refusal(response.status_code, code, message, trace, purpose)

    # -- errors in plain words ---------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return self.mailbox or "the signed-in user's mailbox"

    @property
    def _who(self) -> str:
        return self.delegate or "<the signed-in account>"

    @property
    def _is_delegated_shared(self) -> bool:
        return not self.app_only and self.mailbox is not None and self.mailbox != self.delegate

    def _still_busy(self, busy: _Busy, purpose: _Purpose, *, waited: float, delay: float) -> TransportError:
        if busy.status == 429:
            cause = (
                f"Microsoft Graph is throttling requests to {self._label} ({busy.code or 'TooManyRequests'}) "
                f"and asked to wait {delay:.0f} s more after {waited:.0f} s already waited"
            )
        else:
            cause = f"Microsoft Graph is unavailable for now ({busy.status} {busy.code or 'no error code'})"
        return TransportError(f"{purpose.action} failed: {cause}; {RETRIED} ({busy.trace})")

    def _refusal(
        self, status: int, code: str, message: str, trace: RequestTrace, purpose: _Purpose
    ) -> GraphRefusal:
        words, permanent, needs_reauth = self._explain(status, code, message, purpose)
        return GraphRefusal(
            f"{purpose.action} failed: {words} ({trace})",
            status=status,
            code=code,
            trace=trace,
            permanent=permanent,
            needs_reauth=needs_reauth,
        )

    def _explain(self, status: int, code: str, message: str, purpose: _Purpose) -> tuple[str, bool, bool]:
        """Plain words for a Graph error, whether it is permanent, and whether it needs a new sign-in.
        Only the status and the code are trusted: Graph's messages change over time."""
        lowered = code.lower()
        said = f"{status} {code}: {message}" if code else f"HTTP {status}: {message}"
        if status == 401:
            return self._token_refused(said), True, True
        if status == 403:
            if lowered == "errorsendasdenied":
                return self._send_as_denied(purpose), True, False
            return self._access_denied(purpose, code or "403"), True, False
        if lowered in NOT_ON_EXCHANGE_ONLINE or lowered == "errorinvaliduser":
            return self._mailbox_missing(code), True, False
        transient = status >= 500 or status in {408, 410} or lowered in SYNC_STATE_LOST
        return _status_words(status, lowered, said), not transient, False

    def _mailbox_missing(self, code: str) -> str:
        if code.lower() == "errorinvaliduser":
            return f"Microsoft 365 knows no mailbox {self._label} in this tenant ({code}); check the address"
        return (
            f"Microsoft Graph cannot reach the mailbox {self._label} ({code}): it has no Exchange Online "
            "licence, is inactive or soft-deleted, or is hosted on-premises. Assign an Exchange Online "
            "licence to the user (a shared mailbox needs none but must live in Exchange Online), or "
            "connect an on-premises mailbox over IMAP"
        )

    def _token_refused(self, said: str) -> str:
        if self.app_only:
            return (
                f"Microsoft Graph refused the app's access token ({said}); check the app registration's "
                "client secret or certificate and its admin consent"
            )
        return f"Microsoft Graph refused the sign-in of {self._who} ({said}); sign in to the mailbox again"

    def _send_as_denied(self, purpose: _Purpose) -> str:
        sender = purpose.sender or self.mailbox or "<the From address>"
        trustee = self.mailbox if self.app_only else self._who
        return (
            f"{trustee} may not send as {sender} (ErrorSendAsDenied). Give it the right in Exchange Online "
            f"PowerShell: Add-RecipientPermission {sender} -Trustee {trustee} -AccessRights SendAs "
            f'(or Set-Mailbox {sender} -GrantSendOnBehalfTo {trustee} for "on behalf of")'
        )

    def _access_denied(self, purpose: _Purpose, code: str) -> str:
        operation = purpose.operation
        if self.app_only:
            return (
                f"the app may not {_VERBS[operation]} {self._label} ({code}). It needs the application "
                f"permission {PERMISSIONS[operation]} with admin consent; if Exchange limits the app to some "
                "mailboxes (RBAC for Applications, or an application access policy), this mailbox must be in "
                f"its scope: Test-ServicePrincipalAuthorization -Identity <app ID> -Resource {self._label}, "
                f"or Test-ApplicationAccessPolicy -Identity {self._label} -AppId <app ID> shows the verdict"
            )
        if self._is_delegated_shared and self.mailbox is not None:
            return self._shared_access_denied(operation, code, self.mailbox)
        return (
            f"the sign-in of {self._who} does not grant {PERMISSIONS[operation]} ({code}); sign in again and "
            "accept it (where users may not consent, an admin grants consent for the app in Entra ID)"
        )

    def _shared_access_denied(self, operation: Operation, code: str, shared: str) -> str:
        if operation == "send":
            right = f"Add-RecipientPermission {shared} -Trustee {self._who} -AccessRights SendAs"
        else:
            right = f"Add-MailboxPermission -Identity {shared} -User {self._who} -AccessRights FullAccess"
        return (
            f"{self._who} may not {_VERBS[operation]} the shared mailbox {shared} ({code}). In Exchange "
            f"Online PowerShell run: {right}; the sign-in must also grant {SHARED_PERMISSIONS[operation]} "
            "(sign in again to consent). New rights can take up to an hour to apply"
        )

    def _network_failure(
        self, exc: httpx.TransportError, purpose: _Purpose, client_request_id: str, *, may_have_sent: bool
    ) -> TransportError:
        cause = _root_cause(exc)
        trace = f"client-request-id {client_request_id}"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return TransportError(
                f"the Graph server's TLS certificate is not trusted ({cause.verify_message}); check "
                "POSTDESK_MICROSOFT_GRAPH_URL and POSTDESK_CA_BUNDLE",
                permanent=True,
            )
        if isinstance(cause, socket.gaierror):
            return TransportError(
                f"cannot resolve the Graph host ({cause}); check POSTDESK_MICROSOFT_GRAPH_URL and DNS"
            )
        if may_have_sent and isinstance(exc, httpx.ReadError | httpx.ReadTimeout | httpx.RemoteProtocolError):
            return OutcomeUnknown(
                "the connection to Microsoft Graph broke after the message was handed over "
                f"({exc or type(exc).__name__}); it may or may not have been sent: check the mailbox's "
                f"Sent Items ({trace})"
            )
        if isinstance(exc, httpx.TimeoutException):
            text = "Microsoft Graph did not answer in time"
        elif isinstance(exc, httpx.ConnectError):
            text = f"cannot connect to Microsoft Graph ({cause or type(cause).__name__})"
        else:
            text = f"the connection to Microsoft Graph broke ({exc or type(exc).__name__})"
        return TransportError(f"{purpose.action} failed: {text}; {RETRIED} ({trace})")


_VERBS: dict[Operation, str] = {"read": "read", "write": "change mail in", "send": "send from"}


def _status_words(status: int, lowered_code: str, said: str) -> str:
    if status == 404 and lowered_code == "erroritemnotfound":
        return f"it is not in the mailbox any more: moved or deleted ({said})"
    if status == 410 or lowered_code in SYNC_STATE_LOST:
        return f"Microsoft Graph lost the folder's delta state ({said}); the folder is read afresh"
    if status == 413:
        return f"the request is larger than the 4 MB Microsoft Graph accepts at once ({said})"
    if status >= 500 or status == 408:
        return f"Microsoft Graph failed ({said}); {RETRIED}"
    return f"Microsoft Graph refused it ({said})"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _quoted(identifier: str) -> str:
    # Graph ids are base64 and may hold "/", "+" and "="; each must stay inside one path segment.
    return quote(identifier, safe="")


def _ignore(response: httpx.Response) -> None:
    response.read()


def _json(response: httpx.Response) -> dict[str, Any]:
    response.read()
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError as exc:
        raise TransportError("Microsoft Graph answered with something other than JSON") from exc
    return body if isinstance(body, dict) else {}


def _read_capped(response: httpx.Response, message_id: str, limit: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise MessageTooLarge(message_id, limit)
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise MessageTooLarge(message_id, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _graph_error(response: httpx.Response) -> tuple[str, str]:
    """Graph's error code and message; a proxy's or firewall's page has neither."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        return "", "the answer is not Microsoft Graph's (a proxy or firewall in between?)"
    return str(error.get("code") or ""), " ".join(str(error.get("message") or "").split())


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, given as a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _root_cause(exc: BaseException) -> BaseException | None:
    """The socket or TLS error under httpx's and httpcore's wrappers."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _log_exchange(
    request: httpx.Request, status: int, code: str, trace: RequestTrace, started: float
) -> None:
    # The path only: queries hold delta and upload-session tokens. Never headers or bodies.
    elapsed = (time.monotonic() - started) * 1000
    level = logging.DEBUG if status < 400 else logging.INFO
    log.log(
        level,
        "Graph %s %s -> %s%s in %.0f ms (%s)",
        request.method,
        request.url.path,
        status,
        f" {code}" if code else "",
        elapsed,
        trace,
    )


def _from_address(raw: bytes) -> str | None:
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    found = getaddresses([str(value) for value in headers.get_all("From", [])])
    return found[0][1].lower() if found and found[0][1] else None


# ---------------------------------------------------------------------------------------------
# Taking attachments out of MIME that is too large for one request (pure: no network)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetachedAttachment:
    name: str
    content_type: str
    content: bytes
    is_inline: bool
    content_id: str | None

    @property
    def size(self) -> int:
        return len(self.content)


def detach_attachments(
    raw: bytes, *, limit: int = MAX_REQUEST_BYTES
) -> tuple[bytes, list[DetachedAttachment]]:
    """Split ``raw`` into MIME whose base64 fits one Graph request of ``limit`` bytes and the
    attachments taken out of it, largest first, as few as needed.

    The message's own header block is kept byte for byte, so Message-ID, In-Reply-To and References
    reach Exchange exactly as written; only the body parts are written anew.
    """
    head, linesep = _header_block(raw)
    message = email.message_from_bytes(raw, policy=policy.compat32)
    candidates = sorted(_attachment_parts(message), key=lambda found: len(found[1].as_bytes()), reverse=True)
    draft, detached = raw, []
    for parent, part in candidates:
        if _base64_size(len(draft)) <= limit:
            break
        siblings = parent.get_payload()
        assert isinstance(siblings, list)
        siblings.remove(part)
        detached.append(_detached(part))
        draft = _with_header_block(message, head, linesep)
    if _base64_size(len(draft)) > limit:
        raise TransportError(
            "the message is over the 4 MB Microsoft Graph accepts at once even without its attachments; "
            "shorten the text or send it over SMTP",
            permanent=True,
        )
    return draft, detached


def _base64_size(length: int) -> int:
    return 4 * ((length + 2) // 3)


def _header_block(raw: bytes) -> tuple[bytes, str]:
    for separator, linesep in ((b"\r\n\r\n", "\r\n"), (b"\n\n", "\n")):
        end = raw.find(separator)
        if end != -1:
            return raw[:end], linesep
    return raw, "\r\n"


def _with_header_block(message: Message, head: bytes, linesep: str) -> bytes:
    buffer = io.BytesIO()
    BytesGenerator(buffer, mangle_from_=False, policy=policy.compat32.clone(linesep=linesep)).flatten(message)
    separator = (linesep * 2).encode()
    _, _, body = buffer.getvalue().partition(separator)
    return head + separator + body


def _attachment_parts(parent: Message) -> Iterator[tuple[Message, Message]]:
    for part in _children(parent):
        if part.get_content_type() == "message/rfc822" or not part.is_multipart():
            if _is_attachment(part):
                yield parent, part
        else:
            yield from _attachment_parts(part)


def _children(parent: Message) -> list[Message]:
    payload = parent.get_payload() if parent.is_multipart() else []
    return [part for part in payload if isinstance(part, Message)] if isinstance(payload, list) else []


def _is_attachment(part: Message) -> bool:
    return (
        part.get_content_disposition() == "attachment"
        or part.get_filename() is not None
        or part.get_content_maintype() not in ("text", "multipart")
    )


def _detached(part: Message) -> DetachedAttachment:
    if part.get_content_type() == "message/rfc822":
        inner = _children(part)
        content, default_name = (inner[0].as_bytes() if inner else b""), "message.eml"
    else:
        payload = part.get_payload(decode=True)
        content, default_name = payload if isinstance(payload, bytes) else b"", "attachment"
    content_id = part.get("Content-ID")
    return DetachedAttachment(
        name=part.get_filename() or default_name,
        content_type=part.get_content_type(),
        content=content,
        is_inline=part.get_content_disposition() == "inline",
        content_id=str(content_id).strip().strip("<>") if content_id else None,
    )
