"""Run the sandbox identity platform over HTTPS in a background thread.

Used by the test suite (one server per session) and by ``postdesk demo``. The listening socket is
bound before uvicorn starts, so ``port=0`` yields a free port that is known before the first request.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path
from types import TracebackType

import uvicorn

from postdesk.sandbox.graph import GraphMailStore, graph_routes
from postdesk.sandbox.identity import SandboxDirectory, create_app
from postdesk.sandbox.tls import TlsFiles, ensure_server_certificate

STARTUP_TIMEOUT_SECONDS = 15.0


class SandboxServer:
    """The sandbox identity platform listening on ``host:port`` with a certificate from a test CA.

    ``state_dir`` receives ``ca.pem``, ``server.pem`` and ``server.key``; they are reused on the next
    start while still valid, so clients that trust ``ca.pem`` once keep working.
    """

    def __init__(
        self,
        directory: SandboxDirectory,
        state_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        graph: GraphMailStore | None = None,
    ) -> None:
        self.directory = directory
        # Mailboxes served by the Graph mail API under /v1.0 (base_url stands in for graph.microsoft.com).
        self.graph = graph or GraphMailStore(directory)
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port
        self._tls: TlsFiles | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """The authority host, e.g. ``https://127.0.0.1:43121``; append ``/{tenant}`` for MSAL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def ca_path(self) -> Path:
        """The PEM file of the CA that clients must trust to reach this server."""
        if self._tls is None:
            raise RuntimeError("the sandbox server has not been started")
        return self._tls.ca_path

    def start(self) -> None:
        """Start serving; returns once the server accepts TLS connections."""
        if self._thread is not None:
            raise RuntimeError("the sandbox server is already running")
        self._tls = ensure_server_certificate(self.state_dir)
        listener = self._bind()
        app = create_app(self.directory)
        app.router.routes[0:0] = graph_routes(self.graph)
        config = uvicorn.Config(
            app,
            ssl_certfile=str(self._tls.cert_path),
            ssl_keyfile=str(self._tls.key_path),
            log_level="warning",
            # Request lines can carry codes and hints; the sandbox keeps them out of the logs.
            access_log=False,
            lifespan="off",
            # Clients such as MSAL keep connections alive; do not wait for them at shutdown.
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener]}, name="postdesk-sandbox", daemon=True
        )
        self._thread.start()
        self._wait_until_serving()

    def stop(self) -> None:
        """Stop serving and wait for the background thread to finish."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STARTUP_TIMEOUT_SECONDS)
        self._server = None
        self._thread = None

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        self.port = listener.getsockname()[1]
        return listener

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the sandbox server stopped during start-up; see the log above")
            if self._server is not None and self._server.started and self._handshake_succeeds():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the sandbox server did not accept connections within {STARTUP_TIMEOUT_SECONDS}s")

    def _handshake_succeeds(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=2) as raw,
                context.wrap_socket(raw, server_hostname=self.host),
            ):
                return True
        except OSError:
            return False
