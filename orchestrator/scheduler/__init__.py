"""The scheduler stage: pending chunks become Marketo import jobs (see `fifo`)."""

from orchestrator.scheduler.creating import Submitter
from orchestrator.scheduler.fifo import Scheduler
from orchestrator.scheduler.shared import SharedQueue
from orchestrator.scheduler.waits import Observer, Wait

__all__ = ["Observer", "Scheduler", "SharedQueue", "Submitter", "Wait"]
