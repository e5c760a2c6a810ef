"""Injected faults (SPEC section 5): every kind at 10 % of calls at once, and still every
row lands with no file failed.

The simulator answers 10 % of bulk calls each with HTTP 500, HTTP 503, 601, 602, 606,
608, 611 and 615; closes 10 % of connections before answering, and 10 % after the
call took effect (the create queued a job, the client cannot know); delays 10 % past
`request_timeout`; and its tokens live two seconds. The daemon runs in-process
(`Daemon(once=True)`) so its metrics can be read directly; retries by cause come from
both sides: what the simulator answered and what the daemon counted.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from orchestrator.daemon import Daemon
from orchestrator.simulator import Simulator
from tests.support.data import drop_workload, result_docs
from tests.support.faults import FAULT_KNOBS, REQUEST_TIMEOUT, answered
from tests.support.reliability import Record
from tests.support.settings import CARS, CLIENT_ID, LEADS, MEMBERS, SIM_KNOBS, fast_settings
from tests.support.simulators import MakeSimulator

ROWS = {"leads": 150, "cars": 120, "members": 120}


def drop_three_routes(data_dir: Path) -> None:
    drop_workload(
        data_dir, leads=ROWS["leads"], cars=ROWS["cars"], members=ROWS["members"], prefix="f"
    )


def landed(sim: Simulator) -> dict[str, int]:
    """Rows that reached the simulator per object, counted (not deduplicated)."""
    return {
        "leads": len(sim.records("leads")),
        "cars": len(sim.records("customobject", api_name="car_c")),
        "members": len(sim.records("programmembers", program_id=1001)),
    }


def metric_samples(daemon: Daemon, name: str, label: str) -> dict[str, float]:
    found = {}
    for family in daemon.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and label in sample.labels:
                found[sample.labels[label]] = sample.value
    return found


async def test_every_fault_at_ten_percent_still_lands_every_row(
    make_simulator: MakeSimulator, tmp_path: Path, figures: Record
) -> None:
    sim = await make_simulator(**SIM_KNOBS, **FAULT_KNOBS)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS, MEMBERS), max_chunk_bytes=400)
    settings = replace(settings, marketo=replace(settings.marketo, request_timeout=REQUEST_TIMEOUT))
    drop_three_routes(tmp_path)

    daemon = Daemon(settings, once=True)
    async with asyncio.timeout(90):
        assert await daemon.run() == 0, "no file may fail"

    docs = result_docs(tmp_path)
    assert len(docs) == 3
    chunks = sum(len(doc["chunks"]) for doc in docs)
    assert chunks >= 30
    for doc in docs:
        assert doc["status"] == "complete", doc["error"]
        assert doc["rows"] == doc["rows_processed"] == ROWS[doc["route"]]
    assert landed(sim) == ROWS, "every row lands"

    causes = answered(sim)
    for cause in (
        "http 500",
        "http 503",
        *(f"marketo {code}" for code in ("601", "602", "606", "608", "611", "615")),
        "dropped connection",
        "slower than request_timeout",
    ):
        assert causes.get(cause, 0) > 0, f"the run never met {cause}"
    stats = sim.stats()
    assert stats["violations"] == [], "no token or secret in a URL or form, no oversized file"
    jobs = [j for j in sim.jobs() if j["owner"] == CLIENT_ID]
    assert len(jobs) >= chunks
    seen = metric_samples(daemon, "marketo_orchestrator_marketo_errors_total", "code")
    assert seen.get("timeout", 0) > 0
    assert seen.get("network", 0) > 0
    figures(
        chunks=chunks,
        rows=sum(ROWS.values()),
        rows_landed=sum(landed(sim).values()),
        files_failed=0,
        bulk_calls=sum(n for op, n in stats["calls"].items() if op != "identity"),
        tokens_issued=stats["tokens_issued"],
        faults_answered_by_simulator=causes,
        errors_counted_by_daemon={k: int(v) for k, v in sorted(seen.items())},
        backoff_waits_by_reason={
            k: int(v)
            for k, v in sorted(
                metric_samples(daemon, "marketo_orchestrator_backoff_waits_total", "reason").items()
            )
        },
        jobs_created=len(jobs),
        extra_jobs_from_unknown_outcomes=len(jobs) - chunks,
        # aiohttp re-sends an idempotent GET once, unseen, when a reused connection drops.
        drops_the_client_never_saw=causes["dropped connection"] - int(seen.get("network", 0)),
    )
