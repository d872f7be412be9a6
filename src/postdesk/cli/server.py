"""Running the web server, with the worker in a thread beside it."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import NoReturn

import uvicorn

from postdesk.runtime import Runtime, settle_heap
from postdesk.web.app import create_app
from postdesk.worker.jobs import default_jobs
from postdesk.worker.scheduler import Scheduler


def run_server(runtime: Runtime, *, host: str, port: int, with_worker: bool) -> None:
    """Serve the web UI; with_worker also runs the scheduler in a thread until the server stops.

    SIGTERM (systemd's stop, ``docker stop``) ends it as Ctrl+C does: the server finishes the requests
    under way, the worker its current step, and whatever the caller set up is taken down. Uvicorn
    drains on SIGTERM and then raises it again; left at its default, that second SIGTERM would kill
    the process on the spot.
    """
    stop = threading.Event()
    worker = threading.Thread(
        target=Scheduler(runtime, default_jobs()).run_until, args=(stop,), name="postdesk-worker", daemon=True
    )
    app = create_app(runtime)
    settle_heap()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if in_main_thread else None
    try:
        if with_worker:
            worker.start()
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_config=None,
            proxy_headers=True,
            server_header=False,
        )
    finally:
        stop.set()
        if worker.is_alive():
            worker.join(timeout=30)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(_signum: int, _frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)
