"""The status page at GET /: its files and its data over real sockets, then the page itself
in headless Chromium (the system's browser, driven by Playwright) against a daemon in a
subprocess and the bundled simulator.

Without Chromium or Playwright the browser tests are skipped, saying how to get them;
under ORCHESTRATOR_REQUIRE_BROWSER=1 (.ci/run) they fail instead (tests/support/browser.py).
Each browser test ends by asserting that the page logged no console error, threw
nothing, and asked for nothing but the daemon's own host and port.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator import constants
from orchestrator.config import LimitSettings
from orchestrator.metrics import Metrics
from orchestrator.models import BatchStatus, ChunkStatus, FileStatus
from orchestrator.simulator import Simulator
from orchestrator.status import (
    DaemonSlots,
    PageSources,
    QueueView,
    Series,
    StatusServer,
    load_assets,
    page_bytes,
)
from orchestrator.status.overview import FILES_SHOWN, held_chunks, queue_entry, quota_resets_at
from orchestrator.status.page import ASSETS, CONTENT_SECURITY_POLICY
from orchestrator.store import Store
from tests.support import browser as chromium
from tests.support.data import drop_leads
from tests.support.http import contains_any, http_get, metric_samples
from tests.support.processes import CliProcess, CliRunner
from tests.support.settings import (
    CLIENT_SECRET,
    LEADS,
    SIM_KNOBS,
    fast_settings,
    free_port,
    write_settings,
)
from tests.support.simulators import MakeSimulator
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "orchestrator" / "status" / "static"
SCREENSHOT = ROOT / "tests" / "artifacts" / "status-page.png"
SECRET_ENV = {"MARKETO_CLIENT_SECRET": CLIENT_SECRET}
NOW = "2026-11-23T14:03:11Z"
LATER = "2026-11-23T14:09:40Z"
PREFIX = "marketo_orchestrator_"
FINAL = ("complete", "failed")


# -- the page's files and its data, without a browser ------------------------------------


@pytest.fixture
async def server(store: Store) -> AsyncIterator[StatusServer]:
    queue = QueueView(limit=10, foreign=3, phantoms=1, importing=1, backoff_seconds=2.0)
    page = PageSources(limits=LimitSettings(), series=Series(), queue=lambda: queue)
    srv = StatusServer(
        "127.0.0.1", 0, store=store, metrics=Metrics(), readiness=lambda: None, page=page
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_the_page_is_small_self_contained_and_served_with_its_policy(
    server: StatusServer,
) -> None:
    base = f"http://127.0.0.1:{server.port}"
    served: dict[str, bytes] = {}
    async with aiohttp.ClientSession() as session:
        for path in ("/", *(f"/static/{name}" for name in ASSETS if name != "index.html")):
            async with session.get(base + path) as resp:
                assert resp.status == 200, path
                assert resp.charset == "utf-8"
                assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
                served[path] = await resp.read()
        for missing in ("/static/index.html", "/static/nothing.js", "/static/..%2Fpage.py"):
            async with session.get(base + missing) as resp:
                assert resp.status == 404, missing
        for path in ("/", "/api/overview", "/static/page.js"):
            async with session.post(base + path) as resp:
                assert resp.status == 405, path

    assets = load_assets()
    assert served["/"] == assets["index.html"].body
    total = page_bytes(assets)
    print(f"status page: {total} bytes in {len(assets)} files")
    assert total == sum(len(body) for body in served.values())
    assert total < 64 * 1024, "well under 1 MB: a page, a stylesheet and a little script"
    html = served["/"].decode()
    # Every reference of the page is relative to the daemon that served it.
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert ref == "data:," or not re.match(r"^[a-z]+:|^//|^/", ref), ref
    # No address of another host anywhere (the SVG namespace is a name, never fetched).
    for path, body in served.items():
        hosts = set(re.findall(rb"https?://[^\s\"'`)]+", body)) - {b"http://www.w3.org/2000/svg"}
        assert hosts == set(), path
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "connect-src 'self'" in CONTENT_SECURITY_POLICY


def test_the_page_ships_in_the_wheel_and_the_image() -> None:
    """pyproject's package data names every file the page needs, and the image's build
    context lets them in (.ci/check-container then builds the wheel from that context)."""
    from tests.test_container import dockerignore_allows

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = project["tool"]["setuptools"]["package-data"]["orchestrator.status"]
    files = sorted(p.name for p in STATIC.iterdir())
    assert files == sorted(ASSETS)
    for name in files:
        assert any(Path(f"static/{name}").match(pattern) for pattern in patterns), name
        assert dockerignore_allows(f"orchestrator/status/static/{name}"), name


async def fill(store: Store, tmp_path: Path) -> None:
    """leads/big.csv: 3 chunks (1 complete, 1 submitted, 1 pending); leads/bad.csv: failed,
    its one chunk refused by Marketo."""
    work = tmp_path / "work"

    async def claimed(name: str, ticket: str) -> int:
        record = await store.begin_claim(
            route="leads",
            name=name,
            source_path=str(tmp_path / "inbox" / "leads" / name),
            work_path=str(work / name),
            max_chunk_bytes=1000,
            claimed_at=NOW,
            ticket=ticket,
        )
        await store.finish_claim(record.id)
        await store.start_split(record.id)
        return record.id

    big = await claimed("big.csv", "big-1")
    chunks = [
        await store.add_chunk(
            big, index=i, path=str(work / f"big.{i}"), rows=10, bytes=900, first_line=2
        )
        for i in (1, 2, 3)
    ]
    await store.finish_split(big, rows=30, chunks_total=3)
    for chunk, batch_id in ((chunks[0], 101), (chunks[1], 102)):
        await store.mark_submitting(chunk.id)
        await store.mark_submitted(
            chunk.id, batch_id=batch_id, marketo_status="Queued", submitted_at=NOW
        )
    await store.finish_chunk(
        chunks[0].id,
        status=ChunkStatus.COMPLETE,
        message="Import succeeded",
        finished_at=LATER,
        batch=BatchStatus(101, "Complete", 10, 0, 0, "Import succeeded"),
    )
    bad = await claimed("bad.csv", "bad-1")
    [chunk] = [
        await store.add_chunk(
            bad, index=1, path=str(work / "bad.1"), rows=5, bytes=100, first_line=2
        )
    ]
    await store.finish_split(bad, rows=5, chunks_total=1)
    await store.finish_chunk(
        chunk.id, status=ChunkStatus.FAILED, message="refused: <b>bold</b>", finished_at=LATER
    )
    await store.reserve_result(
        bad, result_path=str(tmp_path / "failed" / "leads" / "bad.csv.result.json")
    )
    await store.finish_file(
        bad, status=FileStatus.FAILED, error="bad.csv: chunk 1 failed", finished_at=LATER
    )


async def test_overview_carries_queue_files_failures_quota_and_rates(
    server: StatusServer, store: Store, tmp_path: Path
) -> None:
    await fill(store, tmp_path)
    async with aiohttp.ClientSession() as session:
        status, text = await http_get(session, f"http://127.0.0.1:{server.port}/api/overview")
    assert status == 200
    data = json.loads(text)

    queue = data["queue"]
    assert queue["daemons"] == [
        {"name": "this daemon", "local": True, "importing": 1, "queued": 0, "creating": 0}
    ]
    kinds = [s["kind"] for s in queue["slots"]]
    assert kinds == ["importing", "foreign", "foreign", "foreign", "phantom"] + ["free"] * 5
    assert [s["kind"] for s in queue["import_slots"]] == ["importing", "unknown"]
    assert (queue["foreign"], queue["phantoms"], queue["free"]) == (3, 1, 5)

    files = {f["file"]: f for f in data["files"]}
    big = files["big.csv"]
    assert (big["state"], big["waiting_for"]) == ("queued", "Marketo's queue")
    assert (big["chunks_done"], big["chunks_total"], big["rows_processed"], big["rows"]) == (
        1,
        3,
        10,
        30,
    )
    assert "chunks" not in big, "the page gets no chunk lists, only counts"
    assert files["bad.csv"]["state"] == "failed"
    assert data["totals"]["files"]["failed"] == 1
    assert data["totals"]["jobs_outstanding"] == 1
    assert data["failures"]["files"] == [
        {
            "id": "bad-1",
            "route": "leads",
            "file": "bad.csv",
            "error": "bad.csv: chunk 1 failed",
            "finished_at": LATER,
        }
    ]
    [failed_chunk] = data["failures"]["chunks"]
    assert (failed_chunk["file"], failed_chunk["chunk"]) == ("bad.csv", 1)
    assert failed_chunk["message"] == "refused: <b>bold</b>", "text, escaped by the page"
    assert data["held"] == []
    limit = constants.DAILY_QUOTA - constants.DEFAULT_DAILY_RESERVE
    assert data["quota"]["daily_limit"] == limit, "new jobs stop at quota minus reserve"
    assert data["quota"]["subscription"] is None
    assert datetime.fromisoformat(data["quota"]["resets_at"]) > datetime.now(UTC)
    rates = data["rates"]
    assert rates["budget_per_window"] == constants.DEFAULT_API_CALLS_PER_WINDOW
    assert len(rates["points"]) == 1, "no sample yet: the live point alone"
    assert rates["points"][0][1] == 10, "rows processed, from the store's tally"
    assert str(tmp_path) not in text, "no paths"


def test_queue_places_per_daemon_and_import_places() -> None:
    view = QueueView(
        limit=10,
        foreign=2,
        phantoms=0,
        importing=5,  # more than is submitted: the store's count wins
        others=(DaemonSlots("b", importing=1, queued=1),),
    )
    queue = queue_entry(view, {"submitted": 2, "submitting": 1})
    here, other = queue["daemons"]
    assert (here["importing"], here["queued"], here["creating"]) == (2, 0, 1)
    assert (other["name"], other["local"]) == ("b", False)
    assert [(s["kind"], s["daemon"]) for s in queue["slots"]] == [
        ("importing", "this daemon"),
        ("importing", "this daemon"),
        ("creating", "this daemon"),
        ("importing", "b"),
        ("queued", "b"),
        ("foreign", None),
        ("foreign", None),
        ("free", None),
        ("free", None),
        ("free", None),
    ]
    assert [s["daemon"] for s in queue["import_slots"]] == ["this daemon", "this daemon"]
    idle = queue_entry(QueueView(limit=3, foreign=0, phantoms=0, importing=0), {})
    assert [s["kind"] for s in idle["import_slots"]] == ["free", "free"]
    assert idle["free"] == constants.MAX_QUEUED_JOBS
    crowded = queue_entry(QueueView(limit=10, foreign=9, phantoms=3, importing=0), {"submitted": 1})
    assert len(crowded["slots"]) == constants.MAX_QUEUED_JOBS
    assert crowded["free"] == 0


def test_series_keeps_an_hour_and_ends_with_the_live_point() -> None:
    now = [1_000.0]
    series = Series(capacity=5, clock=lambda: now[0])
    for rows in range(7):
        series.add(rows * 10, rows)
        now[0] += 600.0  # ten minutes apart
    kept = series.points()
    assert [p.rows_processed for p in kept] == [20, 30, 40, 50, 60], "capacity"
    now[0] += 1300.0  # the newest point is now at 6,500 s: 30's at 2,800 s is too old
    series.add(70, 7)
    assert [p.rows_processed for p in series.points()] == [40, 50, 60, 70], "an hour at most"
    now[0] += 2.0
    live = series.now(75, 8)
    assert series.points(live)[-1] == live
    assert series.points(series.points()[0]) == series.points(), "an older point is not live"


@pytest.mark.parametrize(
    ("now", "resets"),
    [
        ("2026-01-15T12:00:00+00:00", "2026-01-16T06:00:00.000000Z"),  # CST: UTC-6
        ("2026-07-15T12:00:00+00:00", "2026-07-16T05:00:00.000000Z"),  # CDT: UTC-5
        ("2026-07-16T04:59:00+00:00", "2026-07-16T05:00:00.000000Z"),  # still the 15th there
    ],
)
def test_quota_resets_at_midnight_in_chicago(now: str, resets: str) -> None:
    assert quota_resets_at(constants.QUOTA_RESET_TZ, datetime.fromisoformat(now)) == resets


def test_a_missing_browser_skips_saying_how_or_fails_where_required(tmp_path: Path) -> None:
    nowhere = {chromium.BROWSER_ENV: str(tmp_path / "no-chromium")}
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium.locate_chromium(nowhere)
    with pytest.raises(pytest.fail.Exception, match=chromium.REQUIRE_ENV):
        chromium.locate_chromium({**nowhere, chromium.REQUIRE_ENV: "1"})


# -- in a real browser, against a daemon in a subprocess ----------------------------------


@pytest.fixture
async def cli(tmp_path: Path, make_simulator: MakeSimulator) -> AsyncIterator[CliRunner]:
    """Subprocess factory; depends on make_simulator so daemons die before simulators stop."""
    workdir = tmp_path / "cli"
    workdir.mkdir()
    runner = CliRunner(workdir)
    yield runner
    await runner.close()


@pytest.fixture
def browser_ready() -> Path:
    """Chromium's path, or the test is skipped (failed under ORCHESTRATOR_REQUIRE_BROWSER)."""
    return chromium.locate_chromium()


async def start_daemon(
    cli: CliRunner, tmp_path: Path, sim: Simulator, port: int, **sections: Any
) -> tuple[CliProcess, Path]:
    data_dir = tmp_path / "data"
    settings = fast_settings(sim.base_url, data_dir, (LEADS,))
    config = write_settings(
        tmp_path / "orchestrator.toml",
        settings,
        http={"listen": f"127.0.0.1:{port}"},
        logging={"format": "json", "level": "info"},
        **sections,
    )
    daemon = await cli.start("run", "--config", str(config), env=SECRET_ENV)
    await daemon.wait_for_event("status_server")
    return daemon, data_dir


# What the page shows, read from its DOM: counters by element id, files by hand-over id.
READ_PAGE = """() => {
  const text = (id) => (document.getElementById(id) || {}).textContent;
  const ids = ["files-active", "files-complete", "files-failed", "jobs-outstanding",
    "chunks-done", "chunks-all", "api-calls", "rows-processed", "rows-failed", "calls-today"];
  const files = {};
  for (const tr of document.querySelectorAll("#files tbody tr[data-id]")) {
    const cell = (f) => tr.querySelector(`[data-field="${f}"]`).textContent;
    files[tr.dataset.id] = {state: cell("state"), chunks: cell("chunks"), rows: cell("rows"),
      failed: cell("failed"), file: cell("file")};
  }
  const slots = [...document.querySelectorAll("#queue-slots li")].map((li) => li.classList[1]);
  return {totals: Object.fromEntries(ids.map((id) => [id, text(id)])), files,
    order: Object.keys(files), slots};
}"""


def shown(n: int | float | None) -> str:
    """A number as the page writes it."""
    return "?" if n is None else f"{int(n):,}"


def same(page: dict[str, Any], want: dict[str, Any]) -> bool:
    """The page shows what /jobs and /metrics said (read at one moment)."""
    return bool(want["agree"]) and all(page[k] == want[k] for k in ("totals", "files", "order"))


def expected_page(jobs: dict[str, Any], metrics: str, limit: int) -> dict[str, Any]:
    """What the page should show, computed from /jobs and /metrics read at one moment."""
    samples = metric_samples(metrics)

    def metric(name: str, **labels: str) -> float:
        return samples.get((PREFIX + name, tuple(sorted(labels.items()))), 0.0)

    totals = jobs["totals"]
    files = totals["files"]
    entries = jobs["files"][:limit]
    return {
        # /jobs and /metrics were read one after the other: the same moment only if they agree
        "agree": metric("jobs_outstanding") == totals["jobs_outstanding"]
        and metric("files", status="complete") == files["complete"],
        "totals": {
            "files-active": shown(sum(n for s, n in files.items() if s not in FINAL)),
            "files-complete": shown(files["complete"]),
            "files-failed": shown(files["failed"]),
            "jobs-outstanding": shown(totals["jobs_outstanding"]),
            "chunks-done": shown(totals["chunks"]["complete"] + totals["chunks"]["failed"]),
            "chunks-all": shown(sum(totals["chunks"].values())),
            "api-calls": shown(
                sum(v for (n, _), v in samples.items() if n == PREFIX + "api_calls_total")
            ),
            "rows-processed": shown(metric("rows_total", outcome="processed")),
            "rows-failed": shown(metric("rows_total", outcome="failed")),
            "calls-today": shown(metric("api_calls_today")),
        },
        "files": {
            e["id"]: {
                "state": e["state"],
                "chunks": f"{shown(e['chunks_done'])}/{shown(e['chunks_total'])}",
                "rows": f"{shown(e['rows_processed'])}/{shown(e['rows'])}",
                "failed": shown(e["rows_failed"]),
                "file": e["file"],
            }
            for e in entries
        },
        "order": [e["id"] for e in entries],
    }


async def test_page_shows_what_jobs_and_metrics_say_while_a_run_goes_on(
    browser_ready: Path, make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path
) -> None:
    # Jobs of a couple of seconds and polls a second apart: the numbers move about once a
    # second, so the page (refreshing twice a second) and the test meet between moves.
    # A queue that takes 4 jobs: to the daemon, 1016 with 4 of ours at Marketo means other
    # integrations hold the other 6 places (the page shows the scheduler's model), and it
    # keeps saying so however slow the machine is (real foreign jobs end on a timer).
    knobs = {"job_overhead": 1.5, "rows_per_second": 100.0, "max_queued": 4}
    sim = await make_simulator(**{**SIM_KNOBS, **knobs})
    port = free_port()
    daemon, data_dir = await start_daemon(
        cli,
        tmp_path,
        sim,
        port,
        polling={"interval": 1.0, "max_interval": 2.0},
        backoff={"initial": 1.0, "max": 2.0},  # 1016 probes no more often than polls
    )
    for i in range(3):
        drop_leads(data_dir, f"run-{i}.csv", 150, prefix=f"r{i}-", bad={7})
    base = f"http://127.0.0.1:{port}"

    async with (
        chromium.open_browser(tmp_path / "profile") as browser,
        aiohttp.ClientSession() as session,
    ):
        await browser.page.goto(f"{base}/?refresh=0.5")

        async def page_and_daemon() -> tuple[dict[str, Any], dict[str, Any]]:
            page = await browser.evaluate(READ_PAGE)
            _, jobs = await http_get(session, f"{base}/jobs")
            _, metrics = await http_get(session, f"{base}/metrics")
            return page, expected_page(json.loads(jobs), metrics, FILES_SHOWN)

        async def others_shown() -> bool:
            page = await browser.evaluate(READ_PAGE)
            return "foreign" in page["slots"]

        await wait_until(others_shown, "the page to show others' jobs in the queue", process=daemon)

        async def under_way() -> bool:
            """Mid-run, a few chunks done, both charts with a line (for the screenshot)."""
            page = await browser.evaluate(READ_PAGE)
            lines = await browser.evaluate(
                "() => [...document.querySelectorAll('svg.chart path.series')]"
                ".filter((p) => p.getAttribute('d').includes('L')).length"
            )
            done = int(page["totals"]["chunks-done"] or 0)
            return lines == 2 and done >= 2 and page["totals"]["files-active"] != "0"

        await wait_until(under_way, "the run under way with both charts drawn", process=daemon)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        await browser.page.screenshot(path=str(SCREENSHOT), full_page=True)
        print(f"screenshot of the status page mid-run: {SCREENSHOT}")

        async def same_mid_run() -> tuple[dict[str, Any], dict[str, Any]] | None:
            page, want = await page_and_daemon()
            in_flight = (
                want["totals"]["files-active"] != "0" or want["totals"]["jobs-outstanding"] != "0"
            )
            return (page, want) if in_flight and same(page, want) else None

        _, want = await wait_until(
            same_mid_run, "the page to show /jobs' and /metrics' numbers mid-run", process=daemon
        )
        assert want["order"], "files were in flight"

        async def finished() -> bool:
            page, want = await page_and_daemon()
            done = want["totals"]["files-complete"] == "3"
            return done and same(page, want)

        await wait_until(
            finished, "the page to show the finished run as /jobs and /metrics do", process=daemon
        )

        chart_text = await browser.evaluate(
            "() => document.getElementById('rows-text').textContent"
        )
        assert "rows/s" in chart_text

        # No secret and no token in anything the page is made of or fetches.
        bodies = [
            (await http_get(session, f"{base}{path}"))[1].encode()
            for path in ("/", "/static/page.js", "/static/page.css", "/api/overview")
        ]
        page_text = (await browser.page.content()).encode()
        for body in (*bodies, page_text):
            assert contains_any(body, [CLIENT_SECRET, *sim.tokens()]) == []
        assert browser.problems(base) == {}

    daemon.terminate()
    assert await daemon.wait(60) == 0


async def test_page_updates_itself_when_a_file_completes(
    browser_ready: Path, make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    port = free_port()
    daemon, data_dir = await start_daemon(cli, tmp_path, sim, port)
    base = f"http://127.0.0.1:{port}"
    async with chromium.open_browser(tmp_path / "profile") as browser:
        await browser.page.goto(f"{base}/?refresh=0.5")

        async def drawn() -> bool:
            summary: str = await browser.evaluate(
                "() => document.getElementById('summary').textContent"
            )
            return summary.startswith("Version")

        await wait_until(drawn, "the page's first data", process=daemon)
        await browser.evaluate("() => { window.sameDocument = true; }")
        assert "No files yet." in await browser.page.inner_text("#files")

        drop_leads(data_dir, "late.csv", 40)

        async def row_state() -> str | None:
            state: str | None = await browser.evaluate(
                """() => { const row = [...document.querySelectorAll('#files tbody tr[data-id]')]
                  .find((tr) => tr.querySelector('[data-field="file"]').textContent === 'late.csv');
                  return row ? row.querySelector('[data-field="state"]').textContent : null; }"""
            )
            return state if state == "complete" else None

        await wait_until(row_state, "late.csv's row to say complete", process=daemon)
        assert await browser.evaluate("() => window.sameDocument === true"), "never reloaded"
        navigations = await browser.evaluate(
            "() => performance.getEntriesByType('navigation').length"
        )
        assert navigations == 1
        requests = [u for u in browser.requests if u.endswith("/api/overview")]
        assert len(requests) >= 2, "it asked again by itself"
        assert browser.problems(base) == {}
    daemon.terminate()
    assert await daemon.wait(60) == 0


# Headings, names of charts, labels of controls: what a screen reader needs.
A11Y = """() => {
  const visible = (el) => !el.closest('[hidden]');
  const headings = [...document.querySelectorAll('h1,h2,h3,h4,h5,h6')].filter(visible)
    .map((h) => Number(h.tagName[1]));
  const named = (el, attr) => (el.getAttribute(attr) || '').split(/\\s+/).filter(Boolean)
    .map((id) => (document.getElementById(id) || {}).textContent || '').join(' ').trim();
  const charts = [...document.querySelectorAll('svg')].map((svg) => ({
    role: svg.getAttribute('role'), name: named(svg, 'aria-labelledby') || svg.getAttribute('aria-label'),
    description: named(svg, 'aria-describedby')}));
  const controls = [...document.querySelectorAll('input,select,textarea,button,progress')].map(
    (c) => ({id: c.id, label: [...(c.labels || [])].map((l) => l.textContent.trim()).join(' ')
      || c.getAttribute('aria-label') || ''}));
  const lists = [...document.querySelectorAll('.slots')].map((ol) => named(ol, 'aria-labelledby'));
  const places = [...document.querySelectorAll('.slots li')].map(
    (li) => li.querySelector('.visually-hidden').textContent);
  return {headings, charts, controls, lists, places, lang: document.documentElement.lang,
    title: document.title, width: document.documentElement.scrollWidth,
    noscript: document.querySelector('noscript').textContent};
}"""


async def test_page_is_accessible_and_fits_a_narrow_screen(
    browser_ready: Path, make_simulator: MakeSimulator, cli: CliRunner, tmp_path: Path
) -> None:
    sim = await make_simulator(**SIM_KNOBS)
    port = free_port()
    daemon, data_dir = await start_daemon(cli, tmp_path, sim, port)
    drop_leads(data_dir, "a-file-with-a-rather-long-name-that-must-wrap-somewhere.csv", 30)
    (data_dir / "inbox" / "leads" / "empty.csv").write_bytes(b"")  # fails: a failure to list
    base = f"http://127.0.0.1:{port}"
    narrow = {"width": 320, "height": 640}
    async with chromium.open_browser(tmp_path / "profile", viewport=narrow) as browser:
        await browser.page.goto(f"{base}/?refresh=0.5")

        async def both_finished() -> bool:
            page = await browser.evaluate(READ_PAGE)
            states = sorted(f["state"] for f in page["files"].values())
            failures = await browser.page.inner_text("#failed-files")
            return states == ["complete", "failed"] and "empty.csv" in failures

        await wait_until(both_finished, "both files finished on the page", process=daemon)
        seen = await browser.evaluate(A11Y)
        await browser.page.screenshot(path=str(tmp_path / "narrow.png"), full_page=True)

        assert seen["lang"] == "en"
        assert seen["title"]
        headings = seen["headings"]
        assert headings.count(1) == 1, headings
        assert headings[0] == 1, headings
        assert all(b <= a + 1 for a, b in itertools.pairwise(headings)), headings
        assert len(seen["charts"]) == 2
        for chart in seen["charts"]:
            assert chart["role"] == "img", chart
            assert chart["name"], chart
            assert chart["description"], chart
        assert {c["id"] for c in seen["controls"]} == {"auto-refresh", "quota-bar"}
        for control in seen["controls"]:
            assert control["label"], control
        assert all(seen["lists"]), "each row of places has a name"
        assert len(seen["places"]) == constants.MAX_QUEUED_JOBS + constants.MAX_IMPORTING_JOBS
        assert all(re.fullmatch(r"place \d+: .+", p) for p in seen["places"]), seen["places"]
        assert "JavaScript" in seen["noscript"]
        assert "/jobs" in seen["noscript"]
        assert seen["width"] <= narrow["width"], "no sideways scrolling at 320 px"
        legend = await browser.page.inner_text("#legend")
        assert "free" in legend, "the legend says in words what each colour means"
        assert browser.problems(base) == {}
    daemon.terminate()
    assert await daemon.wait(60) == 0


def test_held_chunks_say_which_earlier_chunk_they_wait_for() -> None:
    """The key rule's holds as the snapshot gives them (`held_by`), in the page's words."""
    waits = [
        {"id": "big-1", "file": "big.csv", "chunk": 3},
        {"id": "big-1", "file": "big.csv", "chunk": 4},
    ]
    files = [
        {
            "id": "small-2",
            "route": "leads",
            "file": "small.csv",
            "chunks": [{"index": 1, "held_by": waits}, {"index": 2, "held_by": None}],
        }
    ]
    assert held_chunks(files) == [
        {
            "id": "small-2",
            "route": "leads",
            "file": "small.csv",
            "chunk": 1,
            "reason": "waits for big.csv chunk 3 (and 1 more): they share record keys",
        }
    ]
