"""Uploading a chunk file: the multipart request, its stall watchdog, its unknown outcome.

Creating an import job is not idempotent, so an upload tells apart an attempt
Marketo cannot have acted on from one it may have. Before the whole body went
out (the connection was never made, or the upload stalled), the attempt failed
and may be retried. After it, a timeout, a dropped connection, an HTTP 5xx or
an unreadable answer is an unknown outcome: `UnknownOutcomeError`, which the
retry loop does not retry (the scheduler resubmits, capped). An error envelope
is Marketo's word that it did not execute the call, so that one is retried;
except codes 500 and 502 inside it (`errors.UNKNOWN_ON_CREATE`): Adobe documents
only 6xx codes as not executed, and 502 as "likely a timeout" behind the server
that answered, so those are unknown outcomes too.

An upload is never cut off for taking long, only for making no progress:
aiohttp's trace hook (`on_chunk_sent`) reports every block of the body leaving,
and `UploadProgress` pushes the watchdog's deadline on by `request_timeout`
each time. Once the body is out, the session's read timeout takes over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Final

import aiohttp

from orchestrator.errors import UNKNOWN_ON_CREATE, TransientError, UnknownOutcomeError
from orchestrator.marketo.wire import CONTENT_TYPES, Exchange, Scrub, describe, read_result

# An upload's expected time, for the token's minimum life: its size over this rate.
ASSUMED_UPLOAD_BYTES_PER_SECOND: Final = 250_000


def expected_seconds(size: int) -> float:
    """How long an upload of `size` bytes is expected to take (its token must outlive it)."""
    return size / ASSUMED_UPLOAD_BYTES_PER_SECOND


def upload_exchange(
    url: str,
    params: dict[str, str],
    file: Path,
    fmt: str,
    *,
    operation: str,
    stall: float,
    timeout: aiohttp.ClientTimeout,
    scrub: Scrub,
) -> Exchange[Any]:
    """POST `file` as the multipart part `file`, reopened for every attempt; cut off
    after `stall` seconds without progress."""
    content_type = CONTENT_TYPES.get(fmt.lower(), "text/plain")

    async def exchange(session: aiohttp.ClientSession, headers: dict[str, str]) -> Any:
        fh = await asyncio.to_thread(file.open, "rb")
        progress: UploadProgress | None = None
        try:
            form = aiohttp.FormData()
            form.add_field("file", fh, filename=file.name, content_type=content_type)
            body = form()
            async with asyncio.timeout(stall) as watchdog:
                progress = UploadProgress(body.size, watchdog, stall)
                async with session.post(
                    url,
                    params=params,
                    data=body,
                    headers=headers,
                    timeout=timeout,
                    trace_request_ctx=progress,
                ) as resp:
                    progress.settle()  # the answer is here: sock_read rules
                    return await read_result(resp, operation, scrub)
        except TransientError as exc:
            if exc.code.startswith("http-") or exc.code == "invalid-response":
                # Not Marketo's envelope: whatever answered may have passed the body on.
                raise unknown_outcome(operation, exc.code, exc.message) from None
            if exc.code in UNKNOWN_ON_CREATE:
                # Marketo's envelope, but not its word that the job was not made.
                what = f"Marketo error {exc.code}: {exc.message}"
                raise unknown_outcome(operation, exc.code, what, exc.request_id) from None
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            if progress is not None and progress.body_sent:
                kind = "timeout" if isinstance(exc, TimeoutError) else "network"
                raise unknown_outcome(operation, kind, scrub(describe(exc))) from None
            raise  # never connected or body not fully sent: the retry loop may try again
        finally:
            fh.close()  # closing a file opened for reading does not block

    return exchange


def unknown_outcome(
    operation: str, code: str, what: str, request_id: str = ""
) -> UnknownOutcomeError:
    return UnknownOutcomeError(
        code,
        f"the request was sent but its outcome is unknown ({what}); "
        "Marketo may or may not have created the import job",
        operation=operation,
        request_id=request_id,
    )


class UploadProgress:
    """How much of an upload's body went out; keeps its stall watchdog from firing
    while bytes keep leaving (the request's `trace_request_ctx`)."""

    def __init__(self, total: int | None, watchdog: asyncio.Timeout, stall: float) -> None:
        self.total = total
        self.sent = 0
        self._watchdog = watchdog
        self._stall = stall

    @property
    def body_sent(self) -> bool:
        """The whole body went out: Marketo may have acted on it."""
        return self.total is None or self.sent >= self.total

    def advance(self, n: int) -> None:
        self.sent += n
        if self.body_sent:
            self.settle()
        elif not self._watchdog.expired():
            self._watchdog.reschedule(asyncio.get_running_loop().time() + self._stall)

    def settle(self) -> None:
        """No more stall watch: the body is out (the read timeout takes over)."""
        if not self._watchdog.expired():  # an expiring watchdog cannot be changed
            self._watchdog.reschedule(None)


async def on_chunk_sent(
    _session: aiohttp.ClientSession,
    context: Any,
    params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    """aiohttp's trace hook: a block of a request body was written."""
    progress = context.trace_request_ctx
    if isinstance(progress, UploadProgress):
        progress.advance(len(params.chunk))
