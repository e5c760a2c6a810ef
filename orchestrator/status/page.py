"""The status page's files: one HTML page, its stylesheet and its script, shipped as
package data (orchestrator/status/static/) and read once when the server starts.

No build step and nothing from another host: the page is plain HTML, CSS and a
little JavaScript that fetches `api/overview` (`status.overview`) and draws it,
charts as SVG. `CONTENT_SECURITY_POLICY` tells the browser the same: every
resource comes from the server that served the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Final

# The page itself at /, its assets under /static/<name>, by name with their content type.
INDEX: Final = "index.html"
ASSETS: Final = {
    INDEX: "text/html",
    "page.css": "text/css",
    "page.js": "text/javascript",
}
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class Asset:
    name: str
    content_type: str
    body: bytes


def load_assets() -> dict[str, Asset]:
    """Every file of the page, by name."""
    folder = resources.files("orchestrator.status").joinpath("static")
    return {
        name: Asset(name, content_type, folder.joinpath(name).read_bytes())
        for name, content_type in ASSETS.items()
    }


def page_bytes(assets: dict[str, Asset]) -> int:
    """What a browser downloads for the page, its data aside."""
    return sum(len(a.body) for a in assets.values())
