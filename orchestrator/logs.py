"""Logging: structlog configured once, by the CLI.

JSON lines on stdout when it is not a terminal, console rendering when it is.
A `LiveLine` (the progress display) and log lines never share a line: while
one is shown, each log line first erases it, and it is drawn again below.
The standard library's logging (asyncio's "Task exception was never
retrieved", aiohttp's server errors, anything a dependency logs) goes through
the same processors and renderer, so every line has one format; its records
carry `logger` (the stdlib logger's name) and are filtered at the same level.
Per-file context (route, file, chunk, batch_id) is bound through contextvars
by the engine. As a last line of defence, every string in an event is scrubbed
of registered secrets (the client secret, each access token) before rendering.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
LEVELS["error"] = logging.ERROR
REDACTED = "***"
# Libraries that say something at INFO on every event: heard from at WARNING and up
# unless the level is debug (watchfiles logs "N changes detected" for every change).
CHATTY = ("watchfiles",)

_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Never let `value` reach a rendered log line (ignored when short or empty)."""
    if len(value) >= 6:
        _secrets.add(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def scrub_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: replace registered secrets in every value."""
    if not _secrets:
        return event
    return {k: _scrub(v) for k, v in event.items()}


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog for the process: `fmt` is json, console or auto (console on a TTY).

    The root logger of the standard library gets one handler rendering through structlog."""
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    tail: list[Any] = [
        structlog.processors.format_exc_info if not console else _passthrough,
        scrub_secrets,
        renderer,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamper,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level.lower()]),
        logger_factory=LineLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    route_stdlib(level, stream, stamper, tail)


def route_stdlib(level: str, stream: TextIO, stamper: Any, tail: list[Any]) -> None:
    """Replace the root logger's handlers with one that renders records as structlog does."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            stamper,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = LineHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level.lower()])
    for name in CHATTY:
        logging.getLogger(name).setLevel(max(LEVELS[level.lower()], logging.WARNING))


def _passthrough(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return event


ERASE = "\r\x1b[2K"  # back to column 0, erase the whole line

_live: LiveLine | None = None


class LiveLine:
    """One line redrawn in place at the bottom of a terminal (a progress display).

    Log lines written meanwhile erase it first, and it is drawn again after them,
    so the two never run together. Only one is live per process."""

    def __init__(self, stream: TextIO) -> None:
        global _live
        self._stream = stream
        self._text = ""
        _live = self

    def show(self, text: str) -> None:
        width = shutil.get_terminal_size().columns
        self._text = text if len(text) < width else text[: max(1, width - 2)] + "~"
        self.redraw()

    def hide(self) -> None:
        if self._text:
            self._stream.write(ERASE)
            self._stream.flush()

    def redraw(self) -> None:
        if self._text:
            self._stream.write(ERASE + self._text)
            self._stream.flush()

    def close(self, *, keep: bool = False) -> None:
        """Stop: leave the last text as an ordinary line (`keep`), or erase it."""
        global _live
        if keep and self._text:
            self.redraw()
            self._stream.write("\n")
            self._stream.flush()
        else:
            self.hide()
        self._text = ""
        if _live is self:
            _live = None


class LineLogger:
    """structlog's PrintLogger, but stepping around a `LiveLine` on the terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        live = _live
        if live is not None:
            live.hide()
        self._stream.write(message + "\n")
        self._stream.flush()
        if live is not None:
            live.redraw()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class LineHandler(logging.Handler):
    """The standard library's records, written as a `LineLogger` writes (around a LiveLine)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._line = LineLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._line.msg(self.format(record))
        except Exception:
            self.handleError(record)


class LineLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, *args: Any) -> LineLogger:
        return LineLogger(self._stream)
