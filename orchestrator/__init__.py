"""marketo-orchestrator: every row of a watched directory into Marketo's Bulk Import API."""

__version__ = "0.1.0"
