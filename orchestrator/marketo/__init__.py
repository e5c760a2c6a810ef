"""The Marketo Bulk Import client: the only package that speaks Marketo's HTTP and JSON.

`client` holds the `MarketoClient` and its retry loop; `auth` the token cache;
`limits` the call limiter and the daily quota; `wire` paths, operation ids and
the reading of envelopes and files.
"""

from orchestrator.marketo.bulk import ClientObserver, MarketoClient

__all__ = ["ClientObserver", "MarketoClient"]
