"""Running the web server, with the worker in a thread beside it."""

from __future__ import annotations

import threading

import uvicorn

from postdesk.runtime import Runtime, settle_heap
from postdesk.web.app import create_app
from postdesk.worker.jobs import default_jobs
from postdesk.worker.scheduler import Scheduler


def run_server(runtime: Runtime, *, host: str, port: int, with_worker: bool) -> None:
    """Serve the web UI; with_worker also runs the scheduler in a thread until the server stops."""
    stop = threading.Event()
    worker = threading.Thread(
        target=Scheduler(runtime, default_jobs()).run_until, args=(stop,), name="postdesk-worker", daemon=True
    )
    app = create_app(runtime)
    settle_heap()
    if with_worker:
        worker.start()
    try:
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
        if with_worker:
            worker.join(timeout=30)
