"""Marketo's published limits and names, each with the place it comes from.

Sources: Marketo's "Bulk Import" page (shared/marketo-docs/, the "Limits"
section), its error-code reference, and Adobe's Swagger file
(shared/marketo-openapi/swagger-mapi.json).
"""

from typing import Final

# Bulk Import "Limits": max concurrent import jobs.
MAX_IMPORTING_JOBS: Final = 2
# Bulk Import "Limits": max queued import jobs, including the importing ones.
MAX_QUEUED_JOBS: Final = 10
# Bulk Import "Limits": max import file size, 10 MB. The simulator refuses a
# file of this size or larger (HTTP 413); our chunks stay under max_chunk_bytes.
MAX_FILE_BYTES: Final = 10_000_000
# Our default chunk ceiling: comfortably under MAX_FILE_BYTES, leaving room for
# the multipart envelope around the file.
DEFAULT_MAX_CHUNK_BYTES: Final = 9_500_000

# REST API limits (error codes 606 and 615): 100 calls per 20 s, 10 in flight.
API_CALLS_PER_WINDOW: Final = 100
API_WINDOW_SECONDS: Final = 20.0
CONCURRENT_API_CALLS: Final = 10
# Default daily quota of a subscription (error 607); resets at midnight CST.
DAILY_API_CALLS: Final = 50_000
QUOTA_RESET_TZ: Final = "America/Chicago"

# Access tokens from the identity service live 3600 s.
TOKEN_TTL_SECONDS: Final = 3600

# Batch statuses the status endpoints report (Bulk Import, "Polling Job Status").
STATUS_QUEUED: Final = "Queued"
STATUS_IMPORTING: Final = "Importing"
STATUS_COMPLETE: Final = "Complete"
STATUS_FAILED: Final = "Failed"
FINAL_STATUSES: Final = frozenset({STATUS_COMPLETE, STATUS_FAILED})

# Reason columns Marketo appends to failures and warnings files.
FAILURE_REASON_COLUMN: Final = "Import Failure Reason"
WARNING_REASON_COLUMN: Final = "Import Warning Reason"
# Column we add where a row can be matched back to its source line.
SOURCE_LINE_COLUMN: Final = "Source Line"

# Delimiters of the three formats Bulk Import accepts.
DELIMITERS: Final = {"csv": ",", "tsv": "\t", "ssv": ";"}
