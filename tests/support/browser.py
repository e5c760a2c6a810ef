"""Headless Chromium for the status page's tests: the system's browser driven by Playwright.

- `locate_chromium()`: the browser to drive (ORCHESTRATOR_TEST_CHROMIUM, else `chromium`
  on PATH, else /usr/bin/chromium) with Playwright importable; without them the
  caller's test is skipped with a reason that says how to get them, or fails under
  ORCHESTRATOR_REQUIRE_BROWSER=1 (CI).
- `open_browser()`: Chromium in a fresh profile directory with the flags below, and one
  page whose console messages, uncaught errors and requests are all recorded
  (`BrowserPage`). Playwright never downloads a browser here: it is given the path.

Without `--disable-background-networking` and its neighbours Chromium opens connections
of its own (updates, field trials, sync); here they are refused, many at a time, and
they are no part of what the page asks for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Page, Request

BROWSER_ENV = "ORCHESTRATOR_TEST_CHROMIUM"  # a Chromium binary to use instead of the system's
REQUIRE_ENV = "ORCHESTRATOR_REQUIRE_BROWSER"  # "1": a missing browser fails, never skips
DEBIAN_CHROMIUM = Path("/usr/bin/chromium")
HOW_TO_GET = (
    "install Debian's browser (`apt-get install chromium`) and the dev extra "
    f"(`pip install -e '.[dev]'`, which brings Playwright), or set {BROWSER_ENV} "
    "to a Chromium binary"
)
FLAGS = (
    "--no-sandbox",  # the tests run as root in CI; the sandbox refuses root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1100, "height": 900}


def unavailable(reason: str, env: Mapping[str, str] = os.environ) -> NoReturn:
    """Skip the test for want of a browser, or fail it where one is required (CI)."""
    if env.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{REQUIRE_ENV} is set, but {reason}", pytrace=False)
    pytest.skip(f"{reason}: {HOW_TO_GET}")


def locate_chromium(env: Mapping[str, str] = os.environ) -> Path:
    """The Chromium binary to drive; skips (or fails, see REQUIRE_ENV) when there is none
    or when Playwright is not installed."""
    named = env.get(BROWSER_ENV, "")
    found = named or shutil.which("chromium") or str(DEBIAN_CHROMIUM)
    path = Path(found)
    if not (path.is_file() and os.access(path, os.X_OK)):
        unavailable(f"no Chromium at {path}", env)
    try:
        import playwright.async_api  # noqa: F401  (only whether it is there)
    except ImportError:
        unavailable("Playwright is not installed", env)
    return path


@dataclass
class BrowserPage:
    """One page in headless Chromium, and everything it said and asked for."""

    page: Page
    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    requests: list[str] = field(default_factory=list)  # every URL asked for
    failed: list[str] = field(default_factory=list)  # requests that got no answer

    def watch(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("requestfailed", self._failed)

    def _console(self, message: ConsoleMessage) -> None:
        self.console.append((message.type, message.text))

    def _failed(self, request: Request) -> None:
        self.failed.append(f"{request.url}: {request.failure}")

    def problems(self, origin: str) -> dict[str, list[str]]:
        """What went wrong so far: console errors, uncaught errors, failed requests, and
        requests to anywhere but `origin` (scheme://host:port); empty when all is well.
        `data:` URLs (the page's empty icon) go nowhere and do not count."""
        elsewhere = [
            url
            for url in self.requests
            if not url.startswith("data:") and origin_of(url) != origin_of(origin)
        ]
        found = {
            "console errors": [text for kind, text in self.console if kind == "error"],
            "page errors": self.errors,
            "failed requests": self.failed,
            "requests elsewhere": elsewhere,
        }
        return {name: items for name, items in found.items() if items}

    async def evaluate(self, script: str, arg: Any = None) -> Any:
        return await self.page.evaluate(script, arg)


def origin_of(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


@contextlib.asynccontextmanager
async def open_browser(
    profile: Path, *, viewport: Mapping[str, int] = VIEWPORT
) -> AsyncIterator[BrowserPage]:
    """Chromium (headless, a fresh profile in `profile`) with one watched page."""
    executable = locate_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        context = await driver.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(executable),
            headless=True,
            args=list(FLAGS),
            viewport={"width": viewport["width"], "height": viewport["height"]},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            watched = BrowserPage(page)
            watched.watch()
            yield watched
        finally:
            await context.close()
