"""The doctor's mail-server layers: reaching the IMAP and SMTP hosts, signing in, the folder, sending.

Where Exchange Online itself refuses (IMAP off for the mailbox, SMTP AUTH off, missing delegation),
the failure carries the exact Exchange Online PowerShell command that fixes it.
"""

from __future__ import annotations

import socket
import ssl

from postdesk.db.types import utcnow
from postdesk.doctor.model import NETWORK_TIMEOUT, CheckFailed, CheckSkipped, Probe
from postdesk.mail.compose import OutgoingMail, compose, new_message_id
from postdesk.outbox.explain import explain_refusal
from postdesk.transports.errors import TransportError
from postdesk.transports.imap import ImapMailbox
from postdesk.transports.smtp import SmtpRefusal, SmtpSubmission

IMAP_VARIABLE = "POSTDESK_MICROSOFT_IMAP"
SMTP_VARIABLE = "POSTDESK_MICROSOFT_SMTP"
TEST_SUBJECT = "Postdesk connection test"
_TENANT_SMTP_AUTH = "Set-TransportConfig -SmtpClientAuthenticationDisabled $false"


def imap_connection(probe: Probe) -> str:
    endpoint = probe.endpoints.imap
    host, _port = _host_port(endpoint)
    raw, peer = _reach(endpoint, IMAP_VARIABLE)
    with raw:
        try:
            tls = probe.ssl_context().wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(endpoint, exc, IMAP_VARIABLE) from exc
        except (ssl.SSLError, OSError) as exc:
            raise CheckFailed(
                f"The TLS handshake with {endpoint} failed ({exc}).",
                "The port must speak TLS from the first byte (993 on Exchange Online); "
                f"check {IMAP_VARIABLE}.",
            ) from exc
        with tls:
            greeting = _first_line(tls)
            version = tls.version()
    if not greeting.startswith("* OK"):
        raise CheckFailed(
            f"{endpoint} does not greet like an IMAP server (it said {greeting[:80]!r}).",
            f"Check {IMAP_VARIABLE}.",
        )
    return f"{endpoint} ({peer}): {version}, certificate trusted, IMAP greeting received."


def smtp_connection(probe: Probe) -> str:
    endpoint = probe.endpoints.smtp
    raw, peer = _reach(endpoint, SMTP_VARIABLE)
    raw.close()
    probe.smtp = SmtpSubmission(endpoint, ssl_context=probe.ssl_context(), timeout=NETWORK_TIMEOUT)
    try:
        probe.smtp.connect()
    except SmtpRefusal as refusal:
        raise CheckFailed(
            f"{endpoint} refused the connection at {refusal.stage}: {refusal.reply}",
            f"Check {SMTP_VARIABLE}; Exchange Online's submission endpoint is smtp.office365.com:587.",
        ) from refusal
    except TransportError as exc:
        if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
            raise _untrusted(endpoint, exc.__cause__, SMTP_VARIABLE) from exc
        raise CheckFailed(f"STARTTLS with {endpoint} failed: {exc}.", f"Check {SMTP_VARIABLE}.") from exc
    return f"{endpoint} ({peer}): STARTTLS done, certificate trusted."


def imap_authenticate(probe: Probe) -> str:
    assert probe.access_token is not None
    mailbox = ImapMailbox(probe.endpoints.imap, ssl_context=probe.ssl_context(), timeout=NETWORK_TIMEOUT)
    try:
        mailbox.login(probe.email, probe.access_token)
    except TransportError as exc:
        if not exc.needs_reauth:
            raise CheckFailed(f"{exc}.", f"Try again; if it persists, check {IMAP_VARIABLE}.") from exc
        raise _imap_refused(probe, exc) from exc
    probe.imap = mailbox
    return f"AUTHENTICATE XOAUTH2 as {probe.email} accepted."


def folder_select(probe: Probe) -> str:
    mailbox = probe.imap
    assert mailbox is not None
    try:
        state = mailbox.open(probe.folder)
    except TransportError as exc:
        raise CheckFailed(
            f"{exc}.",
            "Choose the folder again under Mail on this mailbox's page and save.",
            detail=f"The mailbox has: {_folder_list(mailbox)}",
        ) from exc
    finally:
        probe.imap = None
        mailbox.close()
    return f"{probe.folder}: {state.exists} messages, UIDVALIDITY {state.uidvalidity}."


def smtp_authenticate(probe: Probe) -> str:
    assert probe.smtp is not None and probe.access_token is not None
    try:
        probe.smtp.login(probe.login_name, probe.access_token)
    except SmtpRefusal as refusal:
        raise _smtp_refused(probe, refusal) from refusal
    except TransportError as exc:
        raise CheckFailed(f"{exc}.", f"Try again; if it persists, check {SMTP_VARIABLE}.") from exc
    return f"AUTH XOAUTH2 as {probe.login_name} accepted; nothing was sent."


def send_test_message(probe: Probe) -> str:
    if probe.send_test_to is None:
        raise CheckSkipped("No test message was asked for.")
    assert probe.smtp is not None
    raw = compose(
        OutgoingMail(
            sender_address=probe.email,
            sender_name=probe.display_name,
            to=(probe.send_test_to,),
            cc=(),
            subject=TEST_SUBJECT,
            body_text=f"Postdesk sent this message to test the connection of {probe.email}. "
            "No reply is needed.",
            message_id=new_message_id(probe.email),
            date=utcnow(),
            auto_submitted="auto-generated",
        )
    )
    try:
        reply = probe.smtp.send(probe.email, [probe.send_test_to], raw)
    except SmtpRefusal as refusal:
        raise _smtp_refused(probe, refusal) from refusal
    except TransportError as exc:
        raise CheckFailed(f"{exc}.", "Try again; look in the mailbox's Sent Items first.") from exc
    return f"Sent to {probe.send_test_to}; the server answered “{reply}”."


def _imap_refused(probe: Probe, exc: TransportError) -> CheckFailed:
    imap_on = f"Set-CASMailbox -Identity {probe.email} -ImapEnabled $true"
    if probe.shared:
        return CheckFailed(
            f"{exc}. Microsoft issued the token to {probe.login_name}, and Exchange does not let that "
            f"account open {probe.email}: it lacks Full Access to it, or IMAP is off for {probe.email}.",
            f"Give {probe.login_name} Full Access to {probe.email} (Exchange admin center › Recipients › "
            "Mailboxes › the mailbox › Delegation › Read and manage) and turn IMAP on for it; changes take "
            "up to an hour. Then test again.",
            command=(
                f"Add-MailboxPermission -Identity {probe.email} -User {probe.login_name} "
                f"-AccessRights FullAccess -InheritanceType All\n{imap_on}"
            ),
        )
    return CheckFailed(
        f"{exc}. Microsoft issued the token, so Exchange itself refuses: IMAP is turned off for this "
        "mailbox, or the app lacks the delegated permission IMAP.AccessAsUser.All.",
        "Turn IMAP on for the mailbox (Microsoft 365 admin center › Users › the mailbox › Mail › Manage "
        "email apps › IMAP, or the command below); changes take up to an hour. Then test again.",
        command=imap_on,
    )


def _smtp_refused(probe: Probe, refusal: SmtpRefusal) -> CheckFailed:
    explanation = explain_refusal(refusal.code, refusal.text)
    return CheckFailed(
        f"{explanation.title}. The server answered: {refusal.reply}",
        f"{explanation.fix}.",
        command=_smtp_command(probe, refusal.text),
    )


def _smtp_command(probe: Probe, text: str) -> str | None:
    status = text.split(" ", 1)[0]
    if status == "5.7.139" and "basic authentication" not in text.lower():
        command = f"Set-CASMailbox -Identity {probe.login_name} -SmtpClientAuthenticationDisabled $false"
        if "tenant" in text.lower():
            command += "\n# or, for every mailbox of the tenant:\n" + _TENANT_SMTP_AUTH
        return command
    if status in ("5.2.252", "5.7.60") or "sendasdenied" in text.lower():
        return (
            f"Add-RecipientPermission -Identity {probe.email} -Trustee {probe.login_name} "
            "-AccessRights SendAs -Confirm:$false"
        )
    return None


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def _reach(endpoint: str, variable: str) -> tuple[socket.socket, str]:
    """DNS, then TCP: a connected socket and the address it reached."""
    host, port = _host_port(endpoint)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CheckFailed(
            f"DNS cannot resolve {host} ({exc.strerror}).",
            f"Check the server's DNS resolver, and {variable} (now {endpoint}).",
        ) from exc
    addresses = ", ".join(dict.fromkeys(str(info[4][0]) for info in found))
    try:
        raw = socket.create_connection((host, port), timeout=NETWORK_TIMEOUT)
    except TimeoutError as exc:
        raise CheckFailed(
            f"No answer from {endpoint} ({addresses}) within {NETWORK_TIMEOUT:.0f} s.",
            f"A firewall drops the connection: allow outbound TCP {port} to {host}. Some hosting providers "
            "block mail ports until asked.",
        ) from exc
    except OSError as exc:
        raise CheckFailed(
            f"The TCP connection to {endpoint} ({addresses}) failed: {exc.strerror or exc}.",
            f"Check that {variable} names the right host and port, and that firewalls allow outbound "
            f"TCP {port} to {host}.",
        ) from exc
    return raw, str(raw.getpeername()[0])


def _untrusted(endpoint: str, exc: ssl.SSLCertVerificationError, variable: str) -> CheckFailed:
    return CheckFailed(
        f"The TLS certificate of {endpoint} is not trusted ({exc.verify_message}).",
        "If a proxy inspects TLS, add its CA certificate to the file named by POSTDESK_CA_BUNDLE; if "
        f"{variable} points at your own server, add that server's CA there. Never turn verification off.",
    )


def _first_line(tls: ssl.SSLSocket) -> str:
    tls.settimeout(NETWORK_TIMEOUT)
    with tls.makefile("rb") as stream:
        try:
            return stream.readline(1024).decode("utf-8", "replace").strip()
        except OSError:
            return ""


def _folder_list(mailbox: ImapMailbox) -> str:
    try:
        return ", ".join(mailbox.folders()) or "no folders"
    except TransportError:
        return "(the folder list could not be read)"
