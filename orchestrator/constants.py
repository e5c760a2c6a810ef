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
# Bulk Import "Limits": max import file size, 10 MB. Marketo applies it to the
# request body (the whole multipart request), not to the file part alone: the
# simulator refuses a request whose Content-Length reaches it (HTTP 413).
MAX_FILE_BYTES: Final = 10_000_000
# Room kept for the multipart envelope around the file (boundaries, part
# headers, file name): max_chunk_bytes may be at most MAX_FILE_BYTES minus this.
MULTIPART_OVERHEAD_BYTES: Final = 4_096
MAX_CHUNK_BYTES_CAP: Final = MAX_FILE_BYTES - MULTIPART_OVERHEAD_BYTES
# Our default chunk ceiling: comfortably under the cap.
DEFAULT_MAX_CHUNK_BYTES: Final = 9_500_000

# REST API limits (error codes 606 and 615): 100 calls per 20 s, 10 in flight,
# for the whole subscription, shared with every other integration.
API_CALLS_PER_WINDOW: Final = 100
API_WINDOW_SECONDS: Final = 20.0
CONCURRENT_API_CALLS: Final = 10
# Our defaults leave the rest to other integrations. Integration best practices,
# "Rate Limit": "limit each third-party integration to 50 calls per 20 seconds or
# fewer"; "Concurrency Limit": "five or fewer concurrent requests".
DEFAULT_API_CALLS_PER_WINDOW: Final = 50
DEFAULT_CONCURRENT_API_CALLS: Final = 5
# A subscription's daily quota (error 607): "Each subscription is allocated 50,000 API
# calls per day" (REST API page), shared by every API user; "resets daily at 12:00AM
# CST" (error-code page).
DAILY_QUOTA: Final = 50_000
# Our default share of it left to the other integrations (limits.daily_reserve).
DEFAULT_DAILY_RESERVE: Final = 5_000
QUOTA_RESET_TZ: Final = "America/Chicago"
# The other reading of "12:00AM CST": fixed UTC-6 all year (06:00 UTC).
QUOTA_RESET_FIXED_OFFSET_HOURS: Final = -6
# After a 607 at a reset we expected to have passed, probe this often.
QUOTA_PROBE_SECONDS: Final = 300.0
# Marketo's own count of the subscription's calls today (GET /rest/v1/stats/usage.json)
# is read this often; a reading that failed is tried again after USAGE_RETRY_SECONDS.
USAGE_READ_SECONDS: Final = 600.0
USAGE_RETRY_SECONDS: Final = 60.0
# Error-code page, response-level codes marked "*": "An API call that returns this
# response code is not counted against your daily quota, or your rate limit."
UNCOUNTED_CODES: Final = frozenset({"601", "602", "604", "605", "608", "611"})

# Creating an import job is not idempotent: a chunk whose create had an unknown
# outcome is sent again at most this often (limits.max_resubmits).
DEFAULT_MAX_RESUBMITS: Final = 2

# Access tokens from the identity service live 3600 s.
TOKEN_TTL_SECONDS: Final = 3600
# A token is used for an upload only with at least this much life left (or the
# upload's expected time, if longer).
TOKEN_MIN_LIFE_SECONDS: Final = 60.0

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
