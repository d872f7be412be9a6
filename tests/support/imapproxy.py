"""A TLS-terminating IMAP proxy that injects faults between Postdesk and the test Dovecot.

Postdesk connects to the proxy on 127.0.0.1 (it presents a certificate from its own test CA, see
``ca_path``); the proxy connects on to the upstream server over TLS and relays bytes both ways. Faults
are armed before the step that should meet them and fire once, on the next client command of that
name (``"SELECT"``, ``"UID FETCH"``, ``"IDLE"``; or the n-th next, see ``occurrence``), on whichever
connection sends it. Faults armed for the same command fire together:

- ``cut_after``: relay only N more bytes of server output, then drop both connections (N may end
  inside a literal, i.e. in the middle of a message's bytes);
- ``inject_after``: send the client an untagged line after the server's first responses, then
  optionally drop the connection (what a server does with ``* BYE``);
- ``replace_reply``: the tagged reply to the command is replaced by another one (``NO [UNAVAILABLE]``);
- ``before``: run a callback before the command reaches the server (e.g. stop the server);
- ``refusing``: new connections are accepted and closed at once, as by a server that is down;
- ``drop_connections``: cut every open connection now.

The server's output is read line by line with its literals (``{N}`` then N bytes) passed through
as data, so a tagged reply is recognised only where a reply can start, never inside a message.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

import trustme

# A line that announces a literal ends with {N} (or {N+}, non-synchronising) before its CRLF.
_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n\Z")
_CHUNK = 16 * 1024
HANDSHAKE_TIMEOUT_SECONDS = 10.0


class Upstream(Protocol):
    """The real server behind the proxy (a ``DovecotServer``); read at every new connection, so a
    server restarted on another port or with a new certificate is followed."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def ca_path(self) -> Path: ...


@dataclass
class _Fault:
    command: str
    skip: int = 0  # matching commands to let pass first
    cut_after: int | None = None
    inject: bytes | None = None
    inject_after_responses: int = 1
    close_after_inject: bool = False
    reply: bytes | None = None
    callback: Callable[[], None] | None = None


@dataclass
class _Relay:
    """One client connection and its upstream twin, with the faults that have fired on it."""

    client: ssl.SSLSocket
    server: ssl.SSLSocket
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    budget: int | None = None  # server bytes still to relay before the cut
    inject: _Fault | None = None
    responses_seen: int = 0
    replies: dict[bytes, bytes] = field(default_factory=dict)  # tag -> replacement reply
    closed: bool = False
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    threads_inside: int = 2  # the two relay threads; the last one out frees the sockets

    def close(self) -> None:
        """Stop relaying: shut both connections down, which wakes the threads blocked reading them.

        Only shut down, never freed here: closing a TLS socket while another thread is inside OpenSSL
        on it can crash the whole process (it did, once, in CI). ``leave`` frees them."""
        with self.state_lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def leave(self) -> None:
        """A relay thread is done with the sockets; the last one closes them."""
        self.close()
        with self.state_lock:
            self.threads_inside -= 1
            last = self.threads_inside == 0
        if last:
            for sock in (self.client, self.server):
                with contextlib.suppress(OSError):
                    sock.close()


def _close(sock: ssl.SSLSocket) -> None:
    # Shut the plain socket under TLS down: that wakes a thread blocked reading from it.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class ImapFaultProxy:
    """Use as a context manager; point ``POSTDESK_MICROSOFT_IMAP`` at ``127.0.0.1:<port>``."""

    def __init__(self, upstream: Upstream, state_dir: Path) -> None:
        self.upstream = upstream
        self.host = "127.0.0.1"
        self.port = 0
        self.commands: list[str] = []  # every command name clients sent, in order
        self.connections = 0  # connections accepted (refused ones included)
        self.cuts: list[str] = []  # where each cut landed: "literal" (inside a message) or "line"
        self._state_dir = Path(state_dir)
        self._armed: list[_Fault] = []
        self._relays: list[_Relay] = []
        self._refusing = False
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._tls = self._server_context()

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The PEM file of the CA behind the proxy's certificate: Postdesk must trust it."""
        return self._state_dir / "imap-proxy-ca.pem"

    def _server_context(self) -> ssl.SSLContext:
        authority = trustme.CA()
        self._state_dir.mkdir(parents=True, exist_ok=True)
        authority.cert_pem.write_to_path(str(self.ca_path))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        authority.issue_cert(self.host, "localhost").configure_cert(context)
        return context

    def start(self) -> None:
        listener = socket.create_server((self.host, 0))
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept_loop, listener)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.drop_connections()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> ImapFaultProxy:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------------

    def cut_after(self, command: str, *, server_bytes: int, occurrence: int = 1) -> None:
        """After the next ``command`` (or the ``occurrence``-th next), relay ``server_bytes`` bytes of
        server output, then cut."""
        self._arm(_Fault(command, skip=occurrence - 1, cut_after=server_bytes))

    def inject_after(
        self, command: str, line: str, *, responses: int = 1, close: bool = False, occurrence: int = 1
    ) -> None:
        """After the server's first ``responses`` responses to the next ``command``, send the client
        ``line`` (e.g. ``* BYE ...``); with ``close`` the connection is dropped right after it. With
        ``responses=0`` the line comes instead of the server's answer (and, closing, the command never
        reaches the server)."""
        self._arm(
            _Fault(
                command,
                skip=occurrence - 1,
                inject=line.encode() + b"\r\n",
                inject_after_responses=responses,
                close_after_inject=close,
            )
        )

    def replace_reply(self, command: str, reply: str, *, occurrence: int = 1) -> None:
        """Answer the next ``command`` with ``<tag> <reply>`` instead of the server's tagged reply
        (the server still runs the command; its untagged responses still pass)."""
        self._arm(_Fault(command, skip=occurrence - 1, reply=reply.encode() + b"\r\n"))

    def before(self, command: str, callback: Callable[[], None], *, occurrence: int = 1) -> None:
        """Call ``callback`` when the next ``command`` arrives, before it is passed to the server."""
        self._arm(_Fault(command, skip=occurrence - 1, callback=callback))

    @contextlib.contextmanager
    def refusing(self) -> Iterator[None]:
        """While inside, new connections are closed as soon as they are accepted."""
        self._refusing = True
        try:
            yield
        finally:
            self._refusing = False

    def drop_connections(self) -> None:
        with self._lock:
            relays, self._relays = self._relays, []
        for relay in relays:
            relay.close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for relay in self._relays if not relay.closed)

    def armed(self) -> list[str]:
        """Commands with a fault still waiting for them (empty once every fault has fired)."""
        with self._lock:
            return [fault.command for fault in self._armed]

    def _arm(self, fault: _Fault) -> None:
        with self._lock:
            self._armed.append(fault)

    def _take_faults(self, command: str) -> list[_Fault]:
        """The faults that fire on this command, in the order they were armed."""
        with self._lock:
            self.commands.append(command)
            fired = []
            for fault in [fault for fault in self._armed if fault.command == command]:
                if fault.skip:
                    fault.skip -= 1
                else:
                    fired.append(fault)
                    self._armed.remove(fault)
            return fired

    # -- relaying ------------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="imap-fault-proxy")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                raw, _address = listener.accept()
            except OSError:
                return  # stopped
            self.connections += 1
            if self._refusing:
                raw.close()
                continue
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            client = self._tls.wrap_socket(raw, server_side=True)
            client.settimeout(None)
        except OSError:
            raw.close()
            return
        try:
            server = self._connect_upstream()
        except OSError:
            # The server is down: the client sees the connection close before any greeting.
            _close(client)
            return
        relay = _Relay(client, server)
        with self._lock:
            self._relays.append(relay)
        self._spawn(self._server_to_client, relay)
        self._client_to_server(relay)

    def _connect_upstream(self) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(self.upstream.ca_path))
        plain = socket.create_connection((self.upstream.host, self.upstream.port), timeout=5)
        try:
            server = context.wrap_socket(plain, server_hostname=self.upstream.host)
        except OSError:
            plain.close()
            raise
        server.settimeout(None)
        return server

    def _client_to_server(self, relay: _Relay) -> None:
        stream = relay.client.makefile("rb")
        try:
            while not relay.closed:
                line = stream.readline()
                if not line:
                    break
                self._on_client_line(relay, line)
                relay.server.sendall(line)
                # A client literal follows only once the server said "+": pass it on as plain data.
                _copy_literal(stream, line, relay.server.sendall)
        except (OSError, ValueError):
            pass
        finally:
            relay.leave()

    def _on_client_line(self, relay: _Relay, line: bytes) -> None:
        tag, command = _command_of(line)
        if not command:
            return  # an authentication response, IDLE's DONE or the rest of a command
        for fault in self._take_faults(command):
            self._fire(relay, tag, fault)

    def _fire(self, relay: _Relay, tag: bytes, fault: _Fault) -> None:
        if fault.callback is not None:
            fault.callback()
        if fault.cut_after is not None:
            relay.budget = fault.cut_after
        if fault.inject is not None and fault.inject_after_responses == 0:
            self._inject(relay, fault)
        elif fault.inject is not None:
            relay.inject, relay.responses_seen = fault, 0
        if fault.reply is not None:
            relay.replies[tag] = fault.reply

    def _server_to_client(self, relay: _Relay) -> None:
        stream = relay.server.makefile("rb")
        try:
            while not relay.closed:
                line = stream.readline()
                if not line:
                    break
                line = self._replaced(relay, line)
                self._to_client(relay, line)
                if _copy_literal(stream, line, lambda chunk: self._to_client(relay, chunk, in_literal=True)):
                    continue  # the response goes on after its literal
                self._after_response(relay)
        except (OSError, ValueError):
            pass
        finally:
            relay.leave()

    @staticmethod
    def _replaced(relay: _Relay, line: bytes) -> bytes:
        tag = line.split(b" ", 1)[0]
        replacement = relay.replies.pop(tag, None)
        return line if replacement is None else tag + b" " + replacement

    def _to_client(self, relay: _Relay, data: bytes, *, in_literal: bool = False) -> None:
        with relay.send_lock:
            if relay.budget is None:
                relay.client.sendall(data)
                return
            sent = data[: relay.budget]
            relay.budget -= len(sent)
            relay.client.sendall(sent)
            if relay.budget == 0:
                self.cuts.append("literal" if in_literal and len(sent) < len(data) else "line")
                relay.close()
                raise ConnectionAbortedError("the proxy cut the connection")

    def _after_response(self, relay: _Relay) -> None:
        fault = relay.inject
        if fault is None or fault.inject is None:
            return
        relay.responses_seen += 1
        if relay.responses_seen < fault.inject_after_responses:
            return
        relay.inject = None
        self._inject(relay, fault)

    @staticmethod
    def _inject(relay: _Relay, fault: _Fault) -> None:
        assert fault.inject is not None
        with relay.send_lock:
            relay.client.sendall(fault.inject)
        if fault.close_after_inject:
            relay.close()


def _command_of(line: bytes) -> tuple[bytes, str]:
    """The tag and the command name of a client line (``UID FETCH`` counts as one name)."""
    words = line.rstrip(b"\r\n").split(b" ", 3)
    if len(words) < 2 or not words[1].isalpha():
        return b"", ""
    name = words[1].upper()
    if name == b"UID" and len(words) > 2:
        name += b" " + words[2].upper()
    return words[0], name.decode("ascii")


def _copy_literal(stream: BinaryIO, line: bytes, send: Callable[[bytes], None]) -> bool:
    """If ``line`` announces a literal, pass its bytes from ``stream`` to ``send``; whether it did."""
    announced = _LITERAL.search(line)
    if announced is None:
        return False
    remaining = int(announced[1])
    while remaining:
        chunk = stream.read(min(remaining, _CHUNK))
        if not chunk:
            raise ConnectionResetError("the connection ended inside a literal")
        send(chunk)
        remaining -= len(chunk)
    return True
