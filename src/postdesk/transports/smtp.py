"""SMTP submission with STARTTLS and SASL XOAUTH2, as Exchange Online offers it (smtp.office365.com:587).

A thin layer over smtplib: connect, upgrade to TLS (never optional: the token must not cross the
network in clear), authenticate, submit bytes. Every refusal becomes an ``SmtpRefusal`` carrying the
server's code and text verbatim, so the outbox can explain it; socket and TLS failures become a
``TransportError``. Whether a failure happened before or after the message data was handed over is
recorded, because after that point the server may have accepted the message.
"""

from __future__ import annotations

import base64
import contextlib
import smtplib
import ssl
from types import TracebackType

from postdesk.transports.errors import OutcomeUnknown, TransportError, connection_failure

CONNECT_TIMEOUT = 30.0
# Replies of servers that want the XOAUTH2 response after a 334 challenge rather than on the AUTH line.
_LINE_TOO_LONG = (500, 501, 504)


class SmtpRefusal(TransportError):
    """The server answered with an error code. ``code`` 4xx: try again later; 5xx: it will not work as is."""

    def __init__(self, code: int, text: str, *, stage: str) -> None:
        self.code = code
        self.text = text
        self.stage = stage
        super().__init__(f"{code} {text}", permanent=code >= 500)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


class SmtpSubmission:
    """One connection to a submission server: ``login`` once, then ``send`` any number of messages."""

    def __init__(
        self, endpoint: str, *, ssl_context: ssl.SSLContext, timeout: float = CONNECT_TIMEOUT
    ) -> None:
        self.endpoint = endpoint
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> SmtpSubmission:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def connect(self) -> None:
        host, port = _host_port(self.endpoint)
        try:
            # Given the host here (not only to connect()), smtplib uses it as the TLS server name.
            smtp = smtplib.SMTP(host, port, timeout=self._timeout)
            self._smtp = smtp
            self._upgrade_to_tls(smtp)
        except smtplib.SMTPConnectError as exc:
            raise SmtpRefusal(exc.smtp_code, _text(exc.smtp_error), stage="connect") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise _failure("connecting to the SMTP server", exc) from exc

    def _upgrade_to_tls(self, smtp: smtplib.SMTP) -> None:
        self._expect(smtp.ehlo(), 250, stage="ehlo")
        if not smtp.has_extn("starttls"):
            raise TransportError(
                f"the SMTP server {self.endpoint} does not offer STARTTLS, and Postdesk never sends a "
                "token over an unencrypted connection; check POSTDESK_MICROSOFT_SMTP",
                permanent=True,
            )
        self._expect(smtp.starttls(context=self._ssl_context), 220, stage="starttls")
        # RFC 3207: what the server said before TLS is forgotten; ask again over the encrypted channel.
        self._expect(smtp.ehlo(), 250, stage="ehlo")

    def login(self, user: str, token: str) -> None:
        """SASL XOAUTH2: the response on the AUTH line (RFC 4954 initial response), or after a 334
        challenge for servers that refuse such long lines."""
        smtp = self._connected()
        response = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode("ascii")
        try:
            code, reply = smtp.docmd("AUTH", f"XOAUTH2 {response}")
            if code in _LINE_TOO_LONG:
                code, reply = smtp.docmd("AUTH", "XOAUTH2")
                if code == 334:
                    code, reply = smtp.docmd(response)
            if code == 334:
                # A failed XOAUTH2 answers 334 with a JSON error; the client sends an empty line to end it.
                code, reply = smtp.docmd("")
        except (OSError, smtplib.SMTPException) as exc:
            raise _failure("signing in to the SMTP server", exc) from exc
        if code != 235:
            raise SmtpRefusal(code, _text(reply), stage="auth")

    def send(self, mail_from: str, recipients: list[str], raw: bytes) -> str:
        """Submit one message; returns the server's acceptance reply (e.g. ``250 2.0.0 OK <queue id>``).

        A recipient refused with 5xx while others were accepted still sends to the others; the refusal
        is part of the returned text. Raises ``SmtpRefusal`` when nothing was accepted, and
        ``OutcomeUnknown`` when the connection broke after the data went out.
        """
        smtp = self._connected()
        options = [f"SIZE={len(raw)}"] if smtp.has_extn("size") else []
        stage = "mail"
        try:
            self._expect(smtp.mail(mail_from, options), 250, stage="mail")
            refused = self._recipients(smtp, recipients)
            stage = "data"
            code, reply = smtp.data(raw)
        except smtplib.SMTPDataError as exc:
            self._reset(smtp)
            raise SmtpRefusal(exc.smtp_code, _text(exc.smtp_error), stage="data") from exc
        except (OSError, smtplib.SMTPException) as exc:
            if stage == "data":
                raise OutcomeUnknown(
                    f"the connection to the SMTP server broke while it was receiving the message ({exc})"
                ) from exc
            raise _failure("sending", exc) from exc
        if code != 250:
            self._reset(smtp)
            raise SmtpRefusal(code, _text(reply), stage="data")
        accepted = f"{code} {_text(reply)}"
        return accepted if not refused else f"{accepted}; refused: {'; '.join(refused)}"

    def _recipients(self, smtp: smtplib.SMTP, recipients: list[str]) -> list[str]:
        refused: list[str] = []
        last: SmtpRefusal | None = None
        for recipient in recipients:
            code, reply = smtp.rcpt(recipient)
            if code in (250, 251):
                continue
            last = SmtpRefusal(code, _text(reply), stage="rcpt")
            if code < 500:
                # Try the whole message again later rather than deliver to only some people now.
                self._reset(smtp)
                raise last
            refused.append(f"{recipient}: {code} {_text(reply)}")
        if len(refused) == len(recipients) and last is not None:
            self._reset(smtp)
            raise last
        return refused

    def close(self) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.quit()
        except (OSError, smtplib.SMTPException):
            self._smtp.close()
        self._smtp = None

    def _connected(self) -> smtplib.SMTP:
        if self._smtp is None:
            self.connect()
        assert self._smtp is not None
        return self._smtp

    @staticmethod
    def _expect(answer: tuple[int, bytes], code: int, *, stage: str) -> None:
        if answer[0] != code:
            raise SmtpRefusal(answer[0], _text(answer[1]), stage=stage)

    @staticmethod
    def _reset(smtp: smtplib.SMTP) -> None:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.rset()


def _failure(action: str, exc: BaseException) -> TransportError:
    if isinstance(exc, smtplib.SMTPResponseException):
        return SmtpRefusal(exc.smtp_code, _text(exc.smtp_error), stage=action)
    return connection_failure("SMTP", action, exc)
