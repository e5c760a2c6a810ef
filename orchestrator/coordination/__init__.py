"""Coordination: daemons that share one Marketo subscription share its limits.

Marketo's queue (2 importing, 10 outstanding), its call budget and its daily quota
belong to the whole subscription. Alone, a daemon models them itself; with a
`[coordination] url`, every daemon naming that PostgreSQL database shares one model
(`postgres`): one FIFO by claim time, one cap on outstanding jobs, one 1016 backoff,
one call window, one daily count, and the key rule across daemons.
"""

from orchestrator.coordination.shapes import Deferral, Grant, Limits, Orphan

__all__ = ["Deferral", "Grant", "Limits", "Orphan"]
