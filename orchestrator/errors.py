"""Every error the orchestrator raises, in one shallow tree.

    OrchestratorError
    ├── ConfigError                 a key or flag is wrong (CLI: exit 2)
    │   └── UsageError              a command's argument is wrong: no such file, ... (exit 2)
    ├── InputError                  a source file cannot be split (file, offset, line)
    ├── StoreError                  the state store cannot be opened or written (path)
    ├── DataDirInUse                another daemon owns data_dir (CLI: exit 2)
    ├── CoordinationUnavailable     the coordination database cannot be reached (wait)
    ├── LeaseLost                   this daemon was taken as dead: register again first
    └── MarketoError                Marketo said no, or could not be reached (code)
        ├── RetryableError          worth trying again after a wait
        │   ├── AuthError           601, 602: token invalid or expired
        │   ├── RateLimitError      606, 615: calls per window / in flight
        │   ├── QueueFullError      1016: too many imports
        │   ├── ImportInProgressError  1019: an import to the same list is running
        │   ├── TransientError      5xx, 500/502/604/608/611/614/713/719, network, timeout
        │   └── UnknownOutcomeError a create whose body was sent, then no answer (or a 5xx,
        │                           or 500/502 inside the envelope)
        ├── QuotaExhaustedError     607: daily quota reached, wait for the reset
        └── FatalError              everything else; retrying will not help
            ├── CredentialsError    the identity service refused client id/secret
            │   └── AccessDeniedError   603: the API role or an IP allow-list refuses the call
            └── ChunkTooLargeError  HTTP 413: a chunk we built is too large (our bug)

Retryable or fatal is decided by class, from one table (`CODE_TO_ERROR`), never
by matching message text; `UNKNOWN_ON_CREATE` names the codes that a create call
cannot retry, because Marketo may have made the job before it answered them.
"""

from __future__ import annotations

from pathlib import Path


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class ConfigError(OrchestratorError):
    """A configuration key, environment variable or flag is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


class UsageError(ConfigError):
    """A command's argument is wrong (no such file, a directory, an id in use): `key` names it."""


class InputError(OrchestratorError):
    """A source file cannot be split; carries where the problem is."""

    def __init__(
        self, file: Path | str, problem: str, *, offset: int | None = None, line: int | None = None
    ) -> None:
        self.file = str(file)
        self.problem = problem
        self.offset = offset
        self.line = line
        where = []
        if line is not None:
            where.append(f"line {line}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        at = f" ({', '.join(where)})" if where else ""
        super().__init__(f"{self.file}: {problem}{at}")


class StoreError(OrchestratorError):
    """The state store cannot be opened, migrated or written."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DataDirInUse(OrchestratorError):
    """Another process holds data_dir's lock: one daemon per data directory."""

    def __init__(self, data_dir: Path | str, holder: int | None) -> None:
        self.data_dir = str(data_dir)
        self.holder = holder
        who = f"pid {holder}" if holder is not None else "a process whose pid is not known yet"
        super().__init__(
            f"data_dir {self.data_dir} is in use by another marketo-orchestrator daemon "
            f"({who}); one daemon per data directory: stop that one first, or give this "
            "one its own data_dir"
        )


class CoordinationUnavailable(OrchestratorError):
    """The coordination database (PostgreSQL) cannot be reached or refused a statement:
    nothing new is sent until it answers again. The message never holds a password."""


class LeaseLost(OrchestratorError):
    """Another daemon took this one as dead (its lease ran out): it registers again, with
    a new epoch, before it sends anything."""


class MarketoError(OrchestratorError):
    """Marketo answered with an error, or could not be reached.

    `code` is Marketo's `errors[].code` (a string), "http-NNN" for an HTTP
    status, or "network"/"timeout" for transport failures.
    """

    def __init__(
        self, code: str, message: str, *, operation: str = "", request_id: str = ""
    ) -> None:
        self.code = code
        self.message = message
        self.operation = operation
        self.request_id = request_id  # Marketo's request id, for Adobe support; "" if none
        prefix = f"{operation}: " if operation else ""
        suffix = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{prefix}Marketo error {code}: {message}{suffix}")


class RetryableError(MarketoError):
    """Trying again after a wait may succeed."""


class AuthError(RetryableError):
    """601/602: the access token is invalid or expired; refresh and retry."""


class RateLimitError(RetryableError):
    """606/615: too many calls in the window, or too many in flight."""


class QueueFullError(RetryableError):
    """1016: Marketo's import queue for the subscription is full."""


class ImportInProgressError(RetryableError):
    """1019: an import into the same static list is still running."""


class TransientError(RetryableError):
    """Server-side or transport trouble that usually passes."""


class UnknownOutcomeError(RetryableError):
    """A create call whose body was sent but whose answer never came (timeout, dropped
    connection), was an HTTP 5xx, or was an envelope with code 500 or 502
    (`UNKNOWN_ON_CREATE`): Marketo may or may not hold the job.

    Never retried by the client: creating an import job is not idempotent. The
    scheduler resubmits the chunk at most `limits.max_resubmits` times.
    """


class QuotaExhaustedError(MarketoError):
    """607: the subscription's daily quota is spent until the next reset."""


class FatalError(MarketoError):
    """Retrying the same request will not help."""


class CredentialsError(FatalError):
    """The identity service refused the client id or secret.

    Fatal for the process, not for the files: nothing can be imported until the
    configuration changes, so work waits instead of failing.
    """


class AccessDeniedError(CredentialsError):
    """603: the token is good, but the API user's role lacks the permission the call needs
    (Read-Write Lead, Read-Write Custom Object), or an IP allow-list refuses this address.

    A configuration problem, not a bad file: handled exactly as refused credentials
    (nothing fails, nothing new is sent) until a call of the kind refused succeeds."""


class ChunkTooLargeError(FatalError):
    """HTTP 413 for a chunk: the splitter produced a file Marketo refuses (a bug of ours)."""


# Marketo's error codes (REST API "Error Codes" reference) by the class that
# handles them. A code that is not here is fatal.
CODE_TO_ERROR: dict[str, type[MarketoError]] = {
    "500": TransientError,  # Internal server error inside the envelope: retry (not a create)
    "502": TransientError,  # Bad gateway inside the envelope: retry with backoff (not a create)
    "601": AuthError,  # Access token invalid
    "602": AuthError,  # Access token expired
    "603": AccessDeniedError,  # Access denied: the API role's permissions, or an IP allow-list
    "604": TransientError,  # Request timed out
    "606": RateLimitError,  # Max rate limit exceeded
    "607": QuotaExhaustedError,  # Daily quota reached
    "608": TransientError,  # API temporarily unavailable
    "611": TransientError,  # System error
    "614": TransientError,  # Invalid subscription (transient during maintenance)
    "615": RateLimitError,  # Concurrent access limit reached
    "713": TransientError,  # Transient error
    "719": TransientError,  # Lock wait timeout
    "1016": QueueFullError,  # Too many imports
    "1019": ImportInProgressError,  # Import in progress
}

# Codes that, answering a create, leave its outcome unknown: Adobe documents only the
# 6xx codes as "not executed", and calls 502 "likely a timeout" (of a server behind the
# one that answered, which may have made the job). Other calls retry them as above.
UNKNOWN_ON_CREATE: frozenset[str] = frozenset({"500", "502"})


def error_for_code(
    code: str, message: str, *, operation: str = "", request_id: str = ""
) -> MarketoError:
    """Build the error of the right class for Marketo's `errors[].code`."""
    cls = CODE_TO_ERROR.get(code, FatalError)
    return cls(code, message, operation=operation, request_id=request_id)


def error_for_http_status(status: int, message: str, *, operation: str = "") -> MarketoError:
    """Build the error of the right class for an HTTP status that is not 200."""
    code = f"http-{status}"
    if status == 413:
        return ChunkTooLargeError(code, message, operation=operation)
    if status >= 500 or status == 429:
        return TransientError(code, message, operation=operation)
    return FatalError(code, message, operation=operation)
