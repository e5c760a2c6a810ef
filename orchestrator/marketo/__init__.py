"""The Marketo Bulk Import client: the only package that speaks Marketo's HTTP and JSON.

`bulk` holds the `MarketoClient` with its twelve operations and three describe
calls; `retry` the one retry loop and the transport under it; `auth` the
credentials and the token cache; `limits` the call limiter; `quota` the daily
quota; `upload` the multipart upload and its unknown outcomes; `wire` paths,
operation ids and the reading of envelopes, descriptions and files; `access` what
Marketo refuses for a reason of configuration.
"""

from orchestrator.marketo.bulk import MarketoClient
from orchestrator.marketo.retry import ClientObserver
from orchestrator.marketo.wire import Description, permission_of

__all__ = ["ClientObserver", "Description", "MarketoClient", "permission_of"]
