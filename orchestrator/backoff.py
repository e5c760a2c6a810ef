"""Exponential backoff with full jitter, as a pure function.

Callers own the sleep (injected), so tests step through retries without
waiting. The same policy serves the Marketo client (606, 615, 5xx, network)
and the scheduler (1016, 1019).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits that double from `initial` up to `max`, jittered in [50 %, 100 %]."""

    initial: float
    max: float

    def ceiling(self, attempt: int) -> float:
        """The un-jittered wait before retry number `attempt` (1-based), capped."""
        if attempt < 1:
            return 0.0
        # 2**60 already dwarfs any cap; avoid float overflow for huge attempt counts.
        return min(self.max, self.initial * 2.0 ** min(attempt - 1, 60))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """A jittered wait for retry `attempt`: between half the ceiling and the ceiling.

        Half-to-full jitter keeps the growth visible (each ceiling doubles) while
        spreading clients that failed together.
        """
        top = self.ceiling(attempt)
        r = (rng or _RNG).random()
        return top * (0.5 + 0.5 * r)


_RNG = random.Random()
