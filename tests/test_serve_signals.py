"""`postdesk serve` and `postdesk demo` stop cleanly on SIGTERM, as systemd and `docker stop` send it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from postdesk.config import Settings
from tests.support.cli import environment_for
from tests.support.postgres import free_port


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "postdesk", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_until_up(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"it did not come up: {process.communicate()[0]}")


def _terminate(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return output


def test_sigterm_stops_the_server_after_its_worker(make_settings: Callable[..., Settings]) -> None:
    port = free_port()
    env = environment_for(make_settings()) | {"POSTDESK_LOG_LEVEL": "INFO"}
    process = _start(["serve", "--port", str(port)], env)
    _wait_until_up(f"http://127.0.0.1:{port}", process)

    output = _terminate(process)

    assert process.returncode == 0, output
    assert "worker stopped" in output  # the worker thread was asked to stop, not cut off


def test_sigterm_stops_the_demo_and_the_servers_it_started(tmp_path: Path) -> None:
    port, sandbox_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTDESK_")} | {"COLUMNS": "200"}
    data_dir = tmp_path / "demo"
    process = _start(
        ["demo", "--port", str(port), "--sandbox-port", str(sandbox_port), "--data-dir", str(data_dir)], env
    )
    _wait_until_up(f"http://127.0.0.1:{port}", process)

    output = _terminate(process)

    assert process.returncode == 0, output
    left = subprocess.run(["pgrep", "-f", str(data_dir)], capture_output=True, text=True, check=False)
    assert left.stdout == "", f"still running after the demo stopped: {left.stdout}"
