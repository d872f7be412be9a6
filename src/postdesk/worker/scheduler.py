"""A small scheduler of periodic jobs that never lets one failing job stop the others.

Each job is a name, an interval and a function of the runtime. Jobs run one after another in the
worker thread; a job that raises is logged (redacted) and retried at its next due time. Stopping is
cooperative: set the stop event (SIGTERM does) and the loop ends after the job in progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from postdesk.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Job:
    name: str
    interval_seconds: float
    run: Callable[[Runtime], object]
    on_stop: Callable[[], object] | None = None
    next_due: float = field(default=0.0)
    failures: int = 0


class Scheduler:
    def __init__(
        self, runtime: Runtime, jobs: list[Job], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.runtime = runtime
        self.jobs = jobs
        self.clock = clock

    def run_due_jobs(self) -> list[str]:
        """Run every job that is due now; return the names of those that ran."""
        ran = []
        for job in self.jobs:
            now = self.clock()
            if job.next_due > now:
                continue
            self._run(job)
            job.next_due = self.clock() + job.interval_seconds
            ran.append(job.name)
        return ran

    def _run(self, job: Job) -> None:
        try:
            job.run(self.runtime)
        except Exception:
            job.failures += 1
            log.exception(
                "job %s failed (%d in a row); it runs again in %.0f s",
                job.name,
                job.failures,
                job.interval_seconds,
            )
        else:
            job.failures = 0

    def seconds_until_next(self) -> float:
        if not self.jobs:
            return 60.0
        return max(0.0, min(job.next_due for job in self.jobs) - self.clock())

    def run_until(self, stop: threading.Event) -> None:
        log.info("worker started with jobs: %s", ", ".join(job.name for job in self.jobs))
        try:
            while not stop.is_set():
                self.run_due_jobs()
                stop.wait(min(self.seconds_until_next(), 1.0))
        finally:
            for job in self.jobs:
                if job.on_stop is not None:
                    job.on_stop()
        log.info("worker stopped")
