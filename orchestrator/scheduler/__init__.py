"""The scheduler stage: pending chunks become Marketo import jobs (see `stage`)."""

from orchestrator.scheduler.creating import Submitter
from orchestrator.scheduler.shared import SharedQueue
from orchestrator.scheduler.stage import Scheduler
from orchestrator.scheduler.waits import Observer, Wait

__all__ = ["Observer", "Scheduler", "SharedQueue", "Submitter", "Wait"]
