"""Our picture of the subscription's import queue: how many more jobs it takes from us.

Marketo holds at most 10 jobs (queued + importing) from every integration
together; we only know ours. A 1016 ("Too many imports") while we hold fewer
than 10 means other integrations hold the rest, so the model lowers our
capacity to what is left and keeps it there until a job leaves the queue, when
it probes one slot: one of ours completes, or one of ours Marketo kept Queued
starts importing (the poller tells; a job ahead of it, not ours, must have
finished).

A create whose outcome is unknown may have made a job we will never see: each
counts like another integration's job (a phantom) until it would have finished
(see `orchestrator.scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator import constants


@dataclass
class QueueModel:
    """How many more jobs Marketo's queue can take from us."""

    limit: int  # our own ceiling: limits.queued_jobs, at most Marketo's 10
    foreign: int = 0  # slots we believe other integrations hold
    # Jobs a create with an unknown outcome may have made, by chunk id; and those of
    # chunks that will not be sent again (released one per job of ours that finishes).
    unknown: dict[int, int] = field(default_factory=dict)
    orphans: int = 0

    @property
    def phantoms(self) -> int:
        """Jobs we may have made and cannot see: counted like other integrations' jobs."""
        return sum(self.unknown.values()) + self.orphans

    def capacity(self, outstanding: int) -> int:
        held = self.foreign + self.phantoms
        room = min(self.limit, constants.MAX_QUEUED_JOBS - held)
        if outstanding == 0:
            # Nothing of ours will complete to free a slot: probe one (the 1016
            # backoff spaces the probes) rather than wait for an event that never comes.
            room = max(room, 1)
        return max(0, room - outstanding)

    def queue_full(self, outstanding: int) -> None:
        """1016 with `outstanding` of ours at Marketo: the rest is someone else's."""
        others = constants.MAX_QUEUED_JOBS - outstanding - self.phantoms  # phantoms counted apart
        self.foreign = max(self.foreign, others)

    def job_left(self) -> None:
        """A job left the queue (one of ours finished, or one ahead of ours started
        importing after another integration's finished): probe one slot more."""
        self.foreign = max(0, self.foreign - 1)

    def unknown_outcome(self, chunk_id: int) -> None:
        """A create of `chunk_id` may have made a job we will never see."""
        self.unknown[chunk_id] = self.unknown.get(chunk_id, 0) + 1

    def chunk_finished(self, chunk_id: int) -> None:
        """A job of ours ended: the copies of its chunk queued ahead of it ended too,
        and so, by FIFO order, did one orphan copy."""
        self.unknown.pop(chunk_id, None)
        self.orphans = max(0, self.orphans - 1)

    def abandon(self, chunk_id: int) -> None:
        """`chunk_id` will not be sent again: its copies leave with our next finishes."""
        self.orphans += self.unknown.pop(chunk_id, 0)
