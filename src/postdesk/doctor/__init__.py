"""The connection doctor: check a mailbox layer by layer and stop at the first failure, with its fix.

Layers, in the order Postdesk meets them: settings complete → authority discovery for the tenant →
token acquisition → token claims (Outlook audience, IMAP and SMTP scopes) → DNS/TCP/TLS to the IMAP
and SMTP hosts → IMAP AUTHENTICATE → folder select → SMTP AUTH → optional test message → for Graph
mailboxes, the mailbox endpoint. Pure orchestration over the modules that do the real work; each layer
is one small function in ``signin`` or ``mailservers``. Checks after a failure are reported skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from postdesk.db.models import Channel, ChannelEvent, Transport
from postdesk.doctor import mailservers, signin
from postdesk.doctor.model import Check, CheckFailed, CheckSkipped, Diagnosis, Probe
from postdesk.doctor.signin import check_token_claims
from postdesk.microsoft.clouds import endpoints_for
from postdesk.microsoft.identity import tls_context
from postdesk.runtime import Runtime
from postdesk.security.redact import redact
from postdesk.transports.errors import TransportError
from postdesk.transports.graph import GraphMailbox

__all__ = ["Check", "CheckFailed", "Diagnosis", "check_token_claims", "diagnose", "record"]

log = logging.getLogger(__name__)
_EVERY = frozenset(Transport)
_IMAP_SMTP = frozenset({Transport.IMAP})


@dataclass(frozen=True)
class _Layer:
    name: str
    label: str
    run: Callable[[Probe], str]
    transports: frozenset[Transport] = _EVERY


def _graph_mailbox(probe: Probe) -> str:
    """List the mailbox's folders through Graph with the token just acquired: the request the fetch
    makes first. Graph's refusal already says what to fix (missing consent, a shared mailbox without
    FullAccess, a mailbox not in Exchange Online) and carries the ids Microsoft support asks for."""
    assert probe.access_token is not None
    settings = probe.runtime.settings
    with GraphMailbox(
        endpoints_for(settings).graph_url,
        probe.email,
        token=probe.access_token,
        ssl_context=tls_context(settings),
        delegate=probe.login_name if probe.shared else None,
        max_retry_wait=10.0,
    ) as graph:
        try:
            folders = graph.folders()
        except TransportError as exc:
            raise CheckFailed(f"Graph refused to open the mailbox {probe.email}.", str(exc)) from exc
    wanted = probe.folder.lower()
    found = any(folder.path.lower() == wanted or folder.id == probe.folder for folder in folders)
    where = f"the folder {probe.folder!r} is there" if found else f"{len(folders)} folders"
    return f"Graph opened {probe.email}: {where}."


LAYERS = (
    _Layer("settings", "Settings complete", signin.settings_complete),
    _Layer("discovery", "Authority discovery", signin.authority_discovery),
    _Layer("token", "Token acquisition", signin.token_acquisition),
    _Layer("claims", "Token claims", signin.token_claims, _IMAP_SMTP),
    _Layer("imap_connection", "IMAP host: DNS, TCP, TLS", mailservers.imap_connection, _IMAP_SMTP),
    _Layer("smtp_connection", "SMTP host: DNS, TCP, STARTTLS", mailservers.smtp_connection, _IMAP_SMTP),
    _Layer("imap_auth", "IMAP AUTHENTICATE", mailservers.imap_authenticate, _IMAP_SMTP),
    _Layer("imap_folder", "Folder select", mailservers.folder_select, _IMAP_SMTP),
    _Layer("smtp_auth", "SMTP AUTH", mailservers.smtp_authenticate, _IMAP_SMTP),
    _Layer("test_message", "Test message", mailservers.send_test_message, _IMAP_SMTP),
    _Layer("graph_mailbox", "Graph mailbox endpoint", _graph_mailbox, frozenset({Transport.GRAPH})),
)
_NOT_FOR = {
    Transport.GRAPH: "This mailbox is read through Microsoft Graph, not IMAP and SMTP.",
    Transport.IMAP: "Only for mailboxes read through Microsoft Graph.",
}


def diagnose(runtime: Runtime, channel_id: int, *, send_test_to: str | None = None) -> Diagnosis:
    """Run every layer for one mailbox; raises ``LookupError`` when there is no such mailbox.

    ``send_test_to``: after SMTP AUTH, also send a short test message to this (checked) address.
    """
    probe = _probe(runtime, channel_id, send_test_to)
    checks: list[Check] = []
    try:
        for layer in LAYERS:
            checks.append(_run(layer, probe, next((c for c in checks if c.status == "failed"), None)))
    finally:
        probe.close()
    return Diagnosis(probe.channel_id, probe.email, probe.transport.value, tuple(checks))


def record(runtime: Runtime, diagnosis: Diagnosis, *, actor_id: int | None) -> None:
    """Note the outcome in the mailbox's event log (kind ``doctor``), with who ran it."""
    with runtime.sessions() as session, session.begin():
        if session.get(Channel, diagnosis.channel_id) is None:
            return
        session.add(
            ChannelEvent(
                channel_id=diagnosis.channel_id,
                kind="doctor",
                actor_id=actor_id,
                message=diagnosis.summary()[:1000],
            )
        )


def _probe(runtime: Runtime, channel_id: int, send_test_to: str | None) -> Probe:
    with runtime.sessions() as session:
        channel = session.get(Channel, channel_id)
        if channel is None:
            raise LookupError(f"there is no mailbox with ID {channel_id}")
        return Probe(
            runtime=runtime,
            channel_id=channel.id,
            email=channel.email,
            login_name=channel.account_username or channel.email,
            display_name=channel.sender_name or channel.display_name,
            folder=channel.folder,
            transport=channel.transport,
            send_test_to=send_test_to,
        )


def _run(layer: _Layer, probe: Probe, earlier_failure: Check | None) -> Check:
    if earlier_failure is not None:
        return Check(layer.name, layer.label, "skipped", f"Not run: “{earlier_failure.label}” failed.")
    if probe.transport not in layer.transports:
        return Check(layer.name, layer.label, "skipped", _NOT_FOR[probe.transport])
    try:
        detail = layer.run(probe)
    except CheckSkipped as skipped:
        return Check(layer.name, layer.label, "skipped", skipped.detail)
    except CheckFailed as failed:
        return Check(
            layer.name, layer.label, "failed", failed.detail, failed.cause, failed.fix, failed.command
        )
    except Exception as exc:  # a doctor that crashes tells the admin nothing
        log.exception("connection test of mailbox %s: %s crashed", probe.channel_id, layer.name)
        cause = f"Unexpected {exc.__class__.__name__}: {redact(str(exc), keep_addresses=True)}"
        fix = "Report this, with the server log, to whoever runs Postdesk."
        return Check(layer.name, layer.label, "failed", "", cause, fix)
    return Check(layer.name, layer.label, "ok", detail)
