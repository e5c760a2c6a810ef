"""The scheduler's backoffs: for the whole queue, and per static list.

A `Wait` is one backoff in progress; `Waits` starts them (exponential and jittered,
`orchestrator.backoff`), reports them to the observer and logs each at warning level,
like every retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from orchestrator.backoff import Backoff

log = structlog.get_logger(__name__)


class Observer(Protocol):
    """What the scheduler reports (orchestrator.metrics.Metrics)."""

    def backoff(self, reason: str, seconds: float) -> None: ...
    def set_backoff_current(self, seconds: float) -> None: ...
    def job_created(self, files: int) -> None: ...


@dataclass
class Wait:
    """A backoff in progress: nothing is submitted before `until` (monotonic)."""

    attempts: int = 0
    until: float = 0.0
    reason: str = ""


@dataclass
class Waits:
    """The queue's backoff and each static list's."""

    backoff: Backoff
    observer: Observer | None = None
    clock: Callable[[], float] = time.monotonic
    queue: Wait = field(default_factory=Wait)
    lists: dict[int, Wait] = field(default_factory=dict)

    def start(self, wait: Wait, reason: str) -> float:
        """Start (or lengthen) `wait`; the seconds it lasts."""
        wait.attempts += 1
        wait.reason = reason
        delay = self.backoff.delay(wait.attempts)
        wait.until = self.clock() + delay
        if self.observer:
            self.observer.backoff(reason, delay)
        self.report()
        # A retry after a wait: warning level, like every retry.
        log.warning("backoff", reason=reason, attempt=wait.attempts, seconds=round(delay, 3))
        return delay

    def start_queue(self, reason: str) -> float:
        return self.start(self.queue, reason)

    def start_list(self, list_id: int, reason: str) -> float:
        return self.start(self.lists.setdefault(list_id, Wait()), reason)

    def answered(self, list_id: int) -> None:
        """Marketo made a job: the queue (and that list) are not in trouble."""
        self.queue = Wait()
        self.lists.pop(list_id, None)
        self.report()

    def queue_open(self) -> bool:
        return self.queue.until <= self.clock()

    def list_open(self, list_id: int) -> bool:
        wait = self.lists.get(list_id)
        return wait is None or wait.until <= self.clock()

    def remaining(self) -> float:
        """Seconds until the queue's backoff ends (0 when none runs)."""
        return max(0.0, self.queue.until - self.clock())

    def ends(self) -> list[float]:
        """When each backoff in progress ends (monotonic)."""
        return [self.queue.until, *(w.until for w in self.lists.values())]

    def report(self) -> None:
        if self.observer:
            self.observer.set_backoff_current(self.remaining())
