"""Breadth: 500 connected mailboxes held in IDLE by one worker process.

The mailboxes are connected through the sign-in flow, then one real ``postdesk worker`` process (SQLite,
polling every hour, so only IDLE brings mail in) takes them all. Once it holds an IDLE session on every
mailbox (counted as its established connections to Dovecot), one message is delivered to each of 100
mailboxes picked at random, one at a time, and the time from delivery to the committed article is taken
as in the latency benchmark. Then the connections are counted again, all 500 must still be there, and
the worker's peak resident memory (VmHWM) is read. The baseline is the same process's peak RSS with no
mailbox connected yet, measured in the same run. Targets: peak RSS under 400 MB, every IDLE connection
alive, p50 under 1 s and p99 under 3 s.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from tests.support.cli import environment_for
from tests.support.mailfactory import customer_mail

from bench.desk import BenchDesk, bench_desk
from bench.latency import percentile
from postdesk.db.models import Article, Channel
from postdesk.db.session import transaction

MAILBOXES = 500
PROBES = 100
RSS_LIMIT_MB = 400.0
SETTLE_SECONDS = 240.0
POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Row:
    name: str
    value: float
    unit: str
    baseline: str
    passed: bool


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to local port ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if remote_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def _start_worker(desk: BenchDesk) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "postdesk", "worker"],
        env=environment_for(desk.settings),
        stdout=subprocess.DEVNULL,
        stderr=(desk.work / "worker.log").open("wb"),
    )


def _wait_for(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench run invalid: gave up waiting for {what}")
        time.sleep(0.25)


def _idle_baseline_rss(desk: BenchDesk) -> float:
    """The worker's peak RSS with no mailbox connected yet (same settings, same jobs)."""
    worker = _start_worker(desk)
    try:
        time.sleep(10)
        if worker.poll() is not None:
            raise SystemExit("bench run invalid: the worker died")
        return peak_rss_mb(worker.pid)
    finally:
        worker.terminate()
        worker.wait(30)


def _probe(desk: BenchDesk, upns: list[str]) -> list[float]:
    chance = random.Random(5)  # noqa: S311 - which mailboxes get mail, not secrets
    latencies = []
    for n in range(PROBES):
        upn = chance.choice(upns)
        message_id = f"<breadth-{n}@example.org>"
        raw = customer_mail(to=upn, subject=f"Breadth question {n}", message_id=message_id)
        delivered = time.monotonic()
        desk.dovecot.deliver(upn, raw)
        deadline = delivered + 30
        while True:
            with desk.runtime.sessions() as session:
                found = session.scalar(select(Article.id).where(Article.message_id == message_id))
            if found is not None:
                latencies.append(time.monotonic() - delivered)
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench run invalid: mail to {upn} never became a ticket")
            time.sleep(POLL_SECONDS)
        time.sleep(chance.uniform(0.1, 0.5))
    return latencies


def run(mailboxes: int = MAILBOXES) -> list[Row]:
    with bench_desk() as desk:
        baseline_rss = _idle_baseline_rss(desk)
        upns = desk.add_mailboxes(mailboxes, prefix="breadth")
        started = time.monotonic()
        channels = desk.connect(upns)
        connect_seconds = time.monotonic() - started
        print(f"  ({len(channels)} mailboxes connected by signing in, {connect_seconds:.0f} s)", flush=True)
        with transaction(desk.runtime.sessions) as session:
            session.execute(update(Channel).values(fetch_interval_seconds=3600))
        worker = _start_worker(desk)
        try:
            port = desk.dovecot.port
            # One IDLE session per mailbox, plus at most a few fetch connections at any moment.
            _wait_for(
                lambda: connections_to(worker.pid, port) >= mailboxes, SETTLE_SECONDS, "IDLE everywhere"
            )
            _wait_for(lambda: connections_to(worker.pid, port) == mailboxes, 60, "the first fetches to end")
            latencies = _probe(desk, upns)
            time.sleep(2)
            alive = connections_to(worker.pid, port)
            rss = peak_rss_mb(worker.pid)
            if worker.poll() is not None:
                raise SystemExit("bench run invalid: the worker died")
        finally:
            worker.terminate()
            worker.wait(60)
    return [
        Row(
            f"peak RSS, {mailboxes} mailboxes in IDLE",
            rss,
            "MB",
            f"{baseline_rss:.0f} MB idle",
            rss < RSS_LIMIT_MB,
        ),
        Row("IDLE connections alive after the probes", alive, "", f"{mailboxes} wanted", alive >= mailboxes),
        Row(
            f"delivery → ticket, p50 ({PROBES} probes)",
            statistics.median(latencies),
            "s",
            "< 1 s",
            statistics.median(latencies) < 1,
        ),
        Row(
            "delivery → ticket, p99",
            percentile(latencies, 0.99),
            "s",
            "< 3 s",
            percentile(latencies, 0.99) < 3,
        ),
    ]


def print_table(rows: list[Row]) -> bool:
    print(f"\nBreadth: {MAILBOXES} mailboxes in one worker process (baseline: the same worker with none)")
    print(f"{'measurement':<44} {'Postdesk':>12} {'baseline / target':>20}  result")
    for row in rows:
        value = f"{row.value:.2f} {row.unit}" if row.unit == "s" else f"{row.value:.0f} {row.unit}"
        print(f"{row.name:<44} {value:>12} {row.baseline:>20}  {'ok' if row.passed else 'FAIL'}")
    return all(row.passed for row in rows)


if __name__ == "__main__":
    sys.exit(0 if print_table(run(int(sys.argv[1]) if len(sys.argv) > 1 else MAILBOXES)) else 1)
