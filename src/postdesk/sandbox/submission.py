"""A stand-in for Exchange Online's SMTP submission endpoint (smtp.office365.com:587), for tests and the demo.

Postdesk sends agents' replies over SMTP submission with SASL XOAUTH2, using the Outlook access token of
the mailbox's Microsoft 365 sign-in. This server behaves the way Exchange Online is documented and seen to
behave, built on aiosmtpd (its handler hooks carry the policy; a small ``SMTP`` subclass only changes
what aiosmtpd hard-codes):

- STARTTLS with a certificate from a private test CA (``ca_path``); AUTH is neither advertised nor
  accepted before it ("504 5.7.4 Unrecognized authentication type"), and the client must say EHLO again
  after it ("503 5.5.2 Send hello first").
- ``AUTH XOAUTH2`` takes the initial response on the AUTH line or after an empty ``334`` challenge. With
  ``challenge_only`` it answers a token on the AUTH line with "500 5.5.2 Line too long", as Dovecot's
  submission service does, so a client must be able to fall back. ``AUTH LOGIN`` is advertised, as
  Exchange does, and refused (basic authentication is retired).
- The bearer token is checked with the sandbox identity platform (RFC 7662 introspection, in process):
  active, for the Outlook resource, with the ``SMTP.Send`` scope, and issued to the ``user=`` of the
  XOAUTH2 string; anything else is "535 5.7.3 Authentication unsuccessful". An app's own token (client
  credentials, no user) is accepted instead when it carries the application permission SMTP.SendAsApp
  and the app has FullAccess on the ``user=`` mailbox (``Add-MailboxPermission`` for its service
  principal: the sandbox directory's mailbox rights, keyed by client id); the mailbox then counts as
  the one that authenticated.
- Exchange's per-mailbox and per-tenant switches for SMTP AUTH (``SmtpClientAuthenticationDisabled``),
  send-as grants (``grant_send_as`` here, or SendAs in the sandbox directory's mailbox rights; checked
  on the envelope sender and the header From after DATA, "554 5.2.252 SendAsDenied"), and a maximum
  message size advertised in EHLO SIZE.
- Accepted mail is recorded in ``accepted``, delivered into Dovecot for recipients the sandbox hosts, and
  copied into the sending mailbox's "Sent Items", as Exchange does for SMTP AUTH submissions.
- ``fail_next(stage, code, text)`` queues a reply to give instead of the normal one, and
  ``drop_after_data(accepted=...)`` a connection that ends after the message data with no reply at all
  (the server having taken the message or not), for tests.

Every reply text Exchange is known to send is reproduced word for word, but clients must branch on the
code and enhanced status code only: Exchange appends diagnostics that change with every reply.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import logging
import secrets
import socket
import ssl
import threading
from base64 import b64decode
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, Literal, get_args

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, auth_mechanism

from postdesk.sandbox.identity import (
    FULL_ACCESS,
    OUTLOOK,
    SEND_AS,
    SandboxDirectory,
    SandboxUser,
    introspect,
)
from postdesk.sandbox.mailserver import DovecotServer
from postdesk.sandbox.tls import TlsFiles, ensure_server_certificate

Stage = Literal["connect", "ehlo", "auth", "mail", "rcpt", "data"]
STAGES: tuple[str, ...] = get_args(Stage)
SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
# The Exchange Online application permission (app role) for SMTP AUTH with an app's own token.
SMTP_APP_ROLE = "SMTP.SendAsApp"
SENT_ITEMS = "Sent Items"
# Exchange Online's default maximum size of a message a mailbox sends (MaxSendSize, 35 MB).
DEFAULT_MAX_MESSAGE_SIZE = 35 * 1024 * 1024
# An `AUTH XOAUTH2 <base64>` line carries a whole JWT: several KB, where RFC 5321 allows 512 octets and
# aiosmtpd answers "500 Command line too long". Data lines may be as long, which Exchange tolerates too.
LINE_LIMIT = 64 * 1024
SERVER_NAME = "sandbox-smtp.postdesk.invalid"
GREETING = "Postdesk sandbox ESMTP MAIL Service ready (not Microsoft)"

AUTH_SUCCESSFUL = "235 2.7.0 Authentication successful"
AUTH_UNSUCCESSFUL = "535 5.7.3 Authentication unsuccessful"
SMTP_AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the {scope}. "
    "Visit https://aka.ms/smtp_auth_disabled for more information."
)
BASIC_AUTH_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
AUTH_BEFORE_TLS = "504 5.7.4 Unrecognized authentication type"
INITIAL_RESPONSE_TOO_LONG = "500 5.5.2 Line too long"
CANNOT_DECODE = "501 5.5.2 Cannot decode response"
SEND_HELLO_FIRST = "503 5.5.2 Send hello first"
NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail."
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
SEND_AS_DENIED = (
    "554 5.2.252 SendAsDenied; {user} not allowed to send as {sender}; "
    "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
    "Failed to process message due to a permanent exception with message "
    "[BeginDiagnosticData]Cannot submit message. [Hostname={host}]"
)
# What a handler returns to close the connection instead of answering (never sent to the client).
HANG_UP = "\x00hang up"


@dataclass(frozen=True)
class AcceptedMessage:
    """One message the server took responsibility for (250 after DATA)."""

    user: str  # the mailbox that authenticated (the token's user)
    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes  # exactly as submitted, CRLF line ends, dot-stuffing undone
    delivered_to: tuple[str, ...]  # recipients whose Dovecot INBOX got it
    sent_items: tuple[str, ...]  # mailboxes whose "Sent Items" got a copy


def parse_xoauth2(blob: bytes) -> tuple[str, str] | None:
    """``(user, token)`` from a SASL XOAUTH2 response (``user=U^Aauth=Bearer T^A^A``), or None."""
    fields: dict[str, str] = {}
    for part in blob.decode("utf-8", errors="replace").split("\x01"):
        name, separator, value = part.partition("=")
        if separator:
            fields[name.strip().lower()] = value
    scheme, _, token = fields.get("auth", "").partition(" ")
    user = fields.get("user", "").strip()
    if not user or scheme.lower() != "bearer" or not token.strip():
        return None
    return user, token.strip()


def header_senders(raw: bytes) -> list[str]:
    """The addresses in the message's From header(s)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = [str(value) for value in headers.get_all("From", [])]
    return [address for _, address in getaddresses(values) if address]


def _diagnostics() -> str:
    # Exchange ends authentication replies with "[server timestamp id]"; clients must not parse it.
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return f" [{SERVER_NAME} {stamp} {secrets.token_hex(8).upper()}]"


class SubmissionServer:
    """Exchange Online's SMTP submission (STARTTLS, XOAUTH2) on ``host:port``, in a background thread.

    Use as a context manager, or ``start()``/``stop()``. Settings, grants and fault queues may be changed
    from any thread while it runs; ``reset()`` puts them all back.
    """

    def __init__(
        self,
        directory: SandboxDirectory,
        state_dir: Path,
        *,
        dovecot: DovecotServer | None = None,
        challenge_only: bool = False,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        host: str = "127.0.0.1",
    ) -> None:
        self.directory = directory
        self.state_dir = Path(state_dir)
        self.dovecot = dovecot
        self.host = host
        self.port = 0
        self.challenge_only = challenge_only
        self.max_message_size = max_message_size
        self.accepted: list[AcceptedMessage] = []
        self._defaults = (challenge_only, max_message_size)
        self._lock = threading.Lock()
        self._faults: dict[str, collections.deque[str]] = {stage: collections.deque() for stage in STAGES}
        self._drops: collections.deque[bool] = collections.deque()
        self._send_as: dict[str, set[str]] = {}
        self._mailbox_smtp_auth_disabled: dict[str, bool] = {}
        self._tenants_smtp_auth_disabled: set[str] = set()
        self._copy_for_sent_as: set[str] = set()
        self._answers_released = threading.Event()
        self._answers_released.set()
        self._answers_before_hold = 0
        self._tls: TlsFiles | None = None
        self._controller: _Controller | None = None

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The PEM file of the CA that signed the server certificate: SMTP clients must trust it."""
        if self._tls is None:
            raise RuntimeError("the submission server has not been started")
        return self._tls.ca_path

    def start(self) -> None:
        """Start listening on a free port of ``host``; returns once the server answers."""
        if self._controller is not None:
            raise RuntimeError("the submission server is already running")
        # aiosmtpd logs every peer, command and address at INFO and a deprecation notice on every AUTH
        # at WARNING; the sandbox keeps addresses out of the logs and shows only real errors.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        self._tls = ensure_server_certificate(self.state_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._tls.cert_path, self._tls.key_path)
        listener = socket.create_server((self.host, 0))
        self.port = listener.getsockname()[1]
        handler = _SubmissionHandler(self)
        self._controller = _Controller(
            handler,
            listener,
            server_hostname=SERVER_NAME,
            ident=GREETING,
            tls_context=context,
            data_size_limit=None,  # the handler enforces max_message_size with Exchange's replies
            auth_exclude_mechanism=["PLAIN"],
            authenticator=handler.refuse_basic_auth,
        )
        try:
            self._controller.start()
        except BaseException:
            self._controller = None
            listener.close()
            raise

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SubmissionServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- test controls -------------------------------------------------------------------------

    def fail_next(self, stage: Stage, code: int, text: str) -> None:
        """Answer the next command of ``stage`` with ``"{code} {text}"`` instead of what it would get.

        Stages: ``connect`` (the greeting; the connection is then closed), ``ehlo``, ``auth`` (the AUTH
        command, before any challenge), ``mail``, ``rcpt``, ``data`` (the reply after the message; the
        message is not accepted). Replies queue up per stage and each is used once; a 421 reply closes
        the connection, as RFC 5321 says.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
        if not 400 <= code <= 599:
            raise ValueError(f"an injected failure needs a 4xx or 5xx code, not {code}")
        with self._lock:
            self._faults[stage].append(f"{code} {text}")

    def drop_after_data(self, *, accepted: bool) -> None:
        """Close the connection after the next message's data instead of answering it: the moment a
        client cannot know whether its message went out. ``accepted``: the server took the message
        (delivered it, filed it in Sent Items) and only the ``250`` was lost; else it never took it.
        Queued drops are used one message each, after any fault queued for the ``data`` stage."""
        with self._lock:
            self._drops.append(accepted)

    def take_drop(self) -> bool | None:
        with self._lock:
            return self._drops.popleft() if self._drops else None

    def hold_answers(self, *, after: int = 0) -> None:
        """Accept (deliver, file in Sent Items) as usual, but hold back the ``250`` after DATA until
        ``release_answers()``: the moment a client dies after the server took its message.
        ``after``: answer that many more messages first, so the hold starts at a later one."""
        with self._lock:
            self._answers_before_hold = after
        self._answers_released.clear()

    def release_answers(self) -> None:
        with self._lock:
            self._answers_before_hold = 0
        self._answers_released.set()

    async def wait_before_answering(self) -> None:
        with self._lock:
            if self._answers_before_hold > 0:
                self._answers_before_hold -= 1
                return
        while not self._answers_released.is_set():
            await asyncio.sleep(0.05)

    def take_fault(self, stage: Stage) -> str | None:
        with self._lock:
            queue = self._faults[stage]
            return queue.popleft() if queue else None

    def grant_send_as(self, user: str, address: str) -> None:
        """Let ``user`` send as ``address`` (Exchange's Send As permission, e.g. on a shared mailbox)."""
        with self._lock:
            self._send_as.setdefault(user.lower(), set()).add(address.lower())

    def revoke_send_as(self, user: str, address: str) -> None:
        with self._lock:
            self._send_as.get(user.lower(), set()).discard(address.lower())

    def set_smtp_auth_disabled(self, mailbox: str, disabled: bool | None) -> None:
        """Like ``Set-CASMailbox -SmtpClientAuthenticationDisabled``: None follows the tenant's setting,
        False enables SMTP AUTH for the mailbox even where the tenant disabled it."""
        with self._lock:
            if disabled is None:
                self._mailbox_smtp_auth_disabled.pop(mailbox.lower(), None)
            else:
                self._mailbox_smtp_auth_disabled[mailbox.lower()] = disabled

    def set_tenant_smtp_auth_disabled(self, tenant: str, disabled: bool) -> None:
        """Like ``Set-TransportConfig -SmtpClientAuthenticationDisabled``; ``tenant`` is an id or domain."""
        authority = self.directory.resolve_authority(tenant)
        if authority is None or authority.tenant is None:
            raise KeyError(f"no sandbox tenant {tenant}")
        with self._lock:
            if disabled:
                self._tenants_smtp_auth_disabled.add(authority.tenant.tenant_id)
            else:
                self._tenants_smtp_auth_disabled.discard(authority.tenant.tenant_id)

    def set_message_copy_for_sent_as(self, mailbox: str, enabled: bool) -> None:
        """Like ``Set-Mailbox -MessageCopyForSentAsEnabled``: mail sent as this (shared) mailbox is also
        copied into its own Sent Items, not only into the sender's."""
        with self._lock:
            if enabled:
                self._copy_for_sent_as.add(mailbox.lower())
            else:
                self._copy_for_sent_as.discard(mailbox.lower())

    def reset(self) -> None:
        """Forget queued faults, grants, SMTP AUTH switches and accepted mail; restore the settings."""
        with self._lock:
            for queue in self._faults.values():
                queue.clear()
            self._drops.clear()
            self._send_as.clear()
            self._mailbox_smtp_auth_disabled.clear()
            self._tenants_smtp_auth_disabled.clear()
            self._copy_for_sent_as.clear()
            self.accepted.clear()
            self.challenge_only, self.max_message_size = self._defaults
            self._answers_before_hold = 0
        self._answers_released.set()

    # -- policy (called from the server thread) ------------------------------------------------

    def verify_token(self, user: str, token: str) -> SandboxUser | None:
        """The sandbox user the token authenticates as ``user`` for SMTP.Send, or None."""
        claims = introspect(self.directory, token)
        if not claims.get("active"):
            return None
        scopes = {name.lower() for name in str(claims.get("scope") or "").split()}
        upn = str(claims.get("upn") or "")
        if not OUTLOOK.names(str(claims.get("aud") or "")) or "smtp.send" not in scopes:
            return None
        if upn.lower() != user.lower():
            return None
        with self.directory.lock:  # tests add users from their own thread
            return self.directory.find_user(upn)

    def verify_app_token(self, mailbox: str, token: str) -> Submitter | None:
        """Who submits when an app authenticates as ``mailbox`` with its own token: the mailbox, when the
        token carries SMTP.SendAsApp and the app has FullAccess on it (a user's or a shared mailbox);
        otherwise None."""
        claims = introspect(self.directory, token)
        if not claims.get("active") or "upn" in claims or not OUTLOOK.names(str(claims.get("aud") or "")):
            return None
        if SMTP_APP_ROLE.lower() not in {name.lower() for name in str(claims.get("scope") or "").split()}:
            return None
        client_id, tenant_id = str(claims.get("client_id") or ""), str(claims.get("tid") or "")
        holders = (client_id, str(claims.get("oid") or ""))
        if not any(FULL_ACCESS in self.directory.rights_on(mailbox, holder) for holder in holders if holder):
            return None
        return Submitter(mailbox.lower(), tenant_id)

    def smtp_auth_disabled_for(self, submitter: Submitter) -> str | None:
        """``"Mailbox"`` or ``"Tenant"`` when SMTP AUTH is off for this mailbox, else None."""
        with self._lock:
            mailbox_setting = self._mailbox_smtp_auth_disabled.get(submitter.address)
            tenant_disabled = submitter.tenant_id in self._tenants_smtp_auth_disabled
        if mailbox_setting is not None:
            return "Mailbox" if mailbox_setting else None
        return "Tenant" if tenant_disabled else None

    def send_as_refusal(self, user: str, mail_from: str, raw: bytes) -> str | None:
        """Exchange's SendAsDenied reply when the envelope or header sender is not ``user``'s to use."""
        with self._lock:
            allowed = {user.lower()} | self._send_as.get(user.lower(), set())
        for sender in [mail_from, *header_senders(raw)]:
            # Grants made here last until reset(); the directory's (a shared mailbox's SendAs) stay.
            if sender.lower() not in allowed and SEND_AS not in self.directory.rights_on(sender, user):
                return SEND_AS_DENIED.format(user=user, sender=sender, host=SERVER_NAME)
        return None

    def accept(self, user: str, envelope: Envelope, raw: bytes) -> AcceptedMessage:
        """Record the message, deliver it to hosted recipients and file the sender's copy."""
        mail_from = envelope.mail_from or ""
        rcpt_tos = tuple(envelope.rcpt_tos)
        delivered = self._deliver(rcpt_tos, raw)
        sent_items = self._file_sent_copies(user, [mail_from, *header_senders(raw)], raw)
        message = AcceptedMessage(user, mail_from, rcpt_tos, raw, delivered, sent_items)
        with self._lock:
            self.accepted.append(message)
        return message

    def hosts(self, address: str) -> bool:
        """Whether the address is a mailbox of the sandbox (a user, or any address in a tenant's domain)."""
        domain = address.rpartition("@")[2].lower()
        with self.directory.lock:
            return self.directory.find_user(address) is not None or any(
                tenant.domain == domain for tenant in self.directory.tenants.values()
            )

    def _deliver(self, rcpt_tos: tuple[str, ...], raw: bytes) -> tuple[str, ...]:
        if self.dovecot is None:
            return ()
        delivered: list[str] = []
        for recipient in dict.fromkeys(address.lower() for address in rcpt_tos):
            if self.hosts(recipient):
                self.dovecot.deliver(recipient, raw)
                delivered.append(recipient)
        return tuple(delivered)

    def _file_sent_copies(self, user: str, senders: list[str], raw: bytes) -> tuple[str, ...]:
        if self.dovecot is None:
            return ()
        with self._lock:
            owners = [user.lower()] + [s.lower() for s in senders if s.lower() in self._copy_for_sent_as]
        filed = tuple(dict.fromkeys(owners))
        for mailbox in filed:
            # Sent Items copies are read already, as Outlook files them.
            self.dovecot.create_folder(mailbox, SENT_ITEMS)
            self.dovecot.deliver(mailbox, raw, folder=SENT_ITEMS, flags="S")
        return filed


@dataclass(frozen=True)
class Submitter:
    """What a successful AUTH leaves on the session: the mailbox that authenticated (a user's own, or
    the one an app authenticated for) and its tenant."""

    address: str
    tenant_id: str

    @classmethod
    def of(cls, user: SandboxUser) -> Submitter:
        return cls(user.upn.lower(), user.tenant_id)


class _SubmissionHandler:
    """aiosmtpd handler hooks: every decision is the SubmissionServer's, this only speaks SMTP."""

    def __init__(self, server: SubmissionServer) -> None:
        self.server = server

    async def handle_EHLO(  # noqa: N802 (aiosmtpd finds hooks by this name)
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        fault = self.server.take_fault("ehlo")
        if fault is not None:
            return [fault]
        session.host_name = hostname
        peer = session.peer[0] if isinstance(session.peer, tuple) else "127.0.0.1"
        tls = session.ssl is not None
        lines = [
            f"{SERVER_NAME} Hello [{peer}]",
            f"SIZE {self.server.max_message_size}",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            *([] if tls else ["STARTTLS"]),
            *(["AUTH LOGIN XOAUTH2"] if tls else []),
            "8BITMIME",
            "SMTPUTF8",
        ]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_AUTH(  # noqa: N802
        self, smtp: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        fault = self.server.take_fault("auth")
        return MISSING if fault is None else fault

    @auth_mechanism("XOAUTH2")
    async def auth_xoauth2(self, smtp: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 2:
            if self.server.challenge_only:
                return AuthResult(success=False, handled=False, message=INITIAL_RESPONSE_TOO_LONG)
            try:
                blob = b64decode(args[1], validate=True)
            except (binascii.Error, ValueError):
                return AuthResult(success=False, handled=False, message=CANNOT_DECODE)
        else:
            answer = await smtp.challenge_auth("", encode_to_b64=False)
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            blob = bytes(answer)
        return self._authenticate(blob)

    def _authenticate(self, blob: bytes) -> AuthResult:
        submitter = self._submitter(blob)
        if submitter is None:
            return AuthResult(success=False, handled=False, message=AUTH_UNSUCCESSFUL + _diagnostics())
        disabled_for = self.server.smtp_auth_disabled_for(submitter)
        if disabled_for is not None:
            message = SMTP_AUTH_DISABLED.format(scope=disabled_for) + _diagnostics()
            return AuthResult(success=False, handled=False, message=message)
        return AuthResult(success=True, auth_data=submitter, message=AUTH_SUCCESSFUL)

    def _submitter(self, blob: bytes) -> Submitter | None:
        credentials = parse_xoauth2(blob)
        if credentials is None:
            return None
        user = self.server.verify_token(*credentials)
        return Submitter.of(user) if user is not None else self.server.verify_app_token(*credentials)

    def refuse_basic_auth(
        self, smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        # Exchange Online retired basic authentication for SMTP AUTH; LOGIN stays advertised.
        return AuthResult(success=False, handled=False, message=BASIC_AUTH_DISABLED + _diagnostics())

    async def handle_MAIL(  # noqa: N802
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        fault = self.server.take_fault("mail")
        if fault is not None:
            return fault
        if not session.authenticated:
            return NOT_AUTHENTICATED
        declared = next((int(o[5:]) for o in mail_options if o.startswith("SIZE=") and o[5:].isdigit()), 0)
        if declared > self.server.max_message_size:
            return MESSAGE_TOO_BIG
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return SENDER_OK

    async def handle_RCPT(  # noqa: N802
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        fault = self.server.take_fault("rcpt")
        if fault is not None:
            return fault
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return RECIPIENT_OK

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        fault = self.server.take_fault("data")
        if fault is not None:
            return fault
        raw = envelope.original_content or b""
        if len(raw) > self.server.max_message_size:
            return MESSAGE_TOO_BIG
        submitter = session.auth_data
        assert isinstance(submitter, Submitter)  # MAIL needs a successful AUTH
        refusal = self.server.send_as_refusal(submitter.address, envelope.mail_from or "", raw)
        if refusal is not None:
            return refusal
        drop = self.server.take_drop()
        if drop is False:
            return HANG_UP
        self.server.accept(submitter.address, envelope, raw)
        if drop:
            return HANG_UP
        await self.server.wait_before_answering()
        message_id = str(BytesHeaderParser(policy=compat32).parsebytes(raw).get("Message-ID", "")).strip()
        return " ".join(["250 2.0.0 OK", *([message_id] if message_id else []), f"[Hostname={SERVER_NAME}]"])


class _ExchangeSMTP(SMTP):
    """aiosmtpd's SMTP with Exchange's wording where aiosmtpd hard-codes its own, and room for tokens."""

    line_length_limit = LINE_LIMIT
    command_size_limit = LINE_LIMIT

    def __init__(self, handler: _SubmissionHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # aiosmtpd keeps the per-command limits in a dict on its class, defaulting to 512 octets; this
        # server's own dict stays out of other aiosmtpd servers' way.
        self.command_size_limits = collections.defaultdict(lambda: LINE_LIMIT)
        self.submission = handler.server

    async def _handle_client(self) -> None:
        fault = self.submission.take_fault("connect")
        if fault is None:
            await super()._handle_client()
            return
        await self.push(fault)
        if self.transport is not None:
            self.transport.close()

    async def push(self, status: AnyStr) -> None:
        text = status if isinstance(status, str) else status.decode("ascii", errors="replace")
        if text == HANG_UP:
            if self.transport is not None:
                self.transport.close()
            return
        await super().push(status)
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        if self.session is not None and not self.session.host_name:
            await self.push(SEND_HELLO_FIRST)
            return True
        return False

    async def smtp_AUTH(self, arg: str) -> None:  # noqa: N802
        # Exchange offers no AUTH mechanism before STARTTLS, so it does not know the one asked for.
        if self.session is not None and self.session.host_name and self.session.ssl is None:
            await self.push(AUTH_BEFORE_TLS)
            return
        await super().smtp_AUTH(arg)


class _Controller(Controller):
    """aiosmtpd's threaded controller on a socket bound beforehand, so port 0 yields a known free port."""

    def __init__(self, handler: _SubmissionHandler, listener: socket.socket, **smtp_options: Any) -> None:
        host, port = listener.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **smtp_options)
        self._listener = listener

    def factory(self) -> SMTP:
        return _ExchangeSMTP(self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(self._factory_invoker, sock=self._listener)
