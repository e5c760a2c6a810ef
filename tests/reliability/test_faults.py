"""Injected faults (SPEC section 5): every kind at 10 % of calls at once, and still every
row lands with no file failed.

The simulator answers 10 % of bulk calls each with HTTP 500, HTTP 503, 601, 602, 606,
608, 611 and 615; closes 10 % of connections before answering, and 10 % after the
call took effect (the create queued a job, the client cannot know); delays 10 % past
`request_timeout`; and its tokens live two seconds. The daemon runs in-process
(`Daemon(once=True)`) so its metrics can be read directly; retries by cause come from
both sides: what the simulator answered and what the daemon counted.

Creating an import job is not idempotent (issue 10, item 1): a create whose body went
out and whose answer is a 5xx, a drop or a timeout has an unknown outcome and is sent
again at most `limits.max_resubmits` times (default 2). Five of the fault kinds above
do that to a create, and the known refusals (601/602/606/608/611/615) only delay the
next try, so about 60 % of creates end unknown (41 of 71 in one run) and about a
quarter of the chunks need more than two resubmits (8 of 30): the default cap would
rightly fail their files. The 10 % test therefore raises the cap to
FAULT_MAX_RESUBMITS (20) to land every row, and records how many jobs each chunk
made; `test_delayed_creates_...` keeps the default cap.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.daemon import Daemon
from orchestrator.simulator import Simulator
from tests.support.daemons import LockedDaemon
from tests.support.data import drop_workload, result_docs
from tests.support.faults import FAULT_KNOBS, FAULT_MAX_RESUBMITS, REQUEST_TIMEOUT, answered
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
    """Every row lands and no file fails with max_resubmits = 20, not the default 2:
    about 60 % of creates have an unknown outcome under these faults, so the default
    cap would rightly fail the files of the chunks that drew three or more (see the
    module docstring and FAULT_MAX_RESUBMITS)."""
    sim = await make_simulator(**SIM_KNOBS, **FAULT_KNOBS)
    settings = fast_settings(
        sim.base_url,
        tmp_path,
        (LEADS, CARS, MEMBERS),
        max_chunk_bytes=600,
        max_resubmits=FAULT_MAX_RESUBMITS,
    )
    settings = replace(settings, marketo=replace(settings.marketo, request_timeout=REQUEST_TIMEOUT))
    drop_three_routes(tmp_path)

    daemon = LockedDaemon(settings, once=True)
    async with asyncio.timeout(90):
        assert await daemon.run() == 0, "no file may fail"

    docs = result_docs(tmp_path)
    assert len(docs) == 3
    chunks = sum(len(doc["chunks"]) for doc in docs)
    assert chunks >= 20
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
    submits = [c["submits"] for doc in docs for c in doc["chunks"]]
    assert max(submits) <= 1 + FAULT_MAX_RESUBMITS
    assert len(jobs) <= sum(submits), "every job Marketo holds is a submit we counted"
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
        max_resubmits=FAULT_MAX_RESUBMITS,
        jobs_per_chunk=round(len(jobs) / chunks, 2),
        most_submits_of_a_chunk=max(c["submits"] for d in docs for c in d["chunks"]),
        chunks_by_submits=dict(
            sorted(Counter(c["submits"] for d in docs for c in d["chunks"]).items())
        ),
        # aiohttp re-sends an idempotent GET once, unseen, when a reused connection drops.
        drops_the_client_never_saw=causes["dropped connection"] - int(seen.get("network", 0)),
    )


@pytest.mark.parametrize(
    ("late_copies", "files_failed"), [(2, 0), (3, 3)], ids=["within-cap", "past-cap"]
)
async def test_delayed_creates_make_at_most_one_plus_max_resubmits_jobs_per_chunk(
    make_simulator: MakeSimulator,
    tmp_path: Path,
    figures: Record,
    late_copies: int,
    files_failed: int,
) -> None:
    """Item 1: the simulator makes the job, then answers the first `late_copies` creates
    of every chunk only after the read timeout. With the default cap (2) no chunk ever
    makes more than 1 + max_resubmits jobs, and result.json counts every one of them.
    Two late answers per chunk: every file completes, every row lands. Three: every
    chunk stops at three jobs (its rows landed through them) and its file fails naming
    the chunk and the copies Marketo may hold. (The client before this fix retried a
    timed-out create up to six times in one call, and the scheduler without bound.)"""
    sim = await make_simulator(**SIM_KNOBS, late_reply_copies=late_copies, late_reply_seconds=0.6)
    settings = fast_settings(sim.base_url, tmp_path, (LEADS, CARS, MEMBERS), max_chunk_bytes=1000)
    settings = replace(settings, marketo=replace(settings.marketo, request_timeout=0.3))
    cap = settings.limits.max_resubmits
    assert cap == 2
    drop_three_routes(tmp_path)

    daemon = LockedDaemon(settings, once=True)
    async with asyncio.timeout(120):
        await daemon.run()

    docs = result_docs(tmp_path)
    assert len(docs) == 3
    chunks = [c for doc in docs for c in doc["chunks"]]
    sent = [c for c in chunks if c["submits"] > 0]
    jobs = [j for j in sim.jobs() if j["owner"] == CLIENT_ID]
    assert max(c["submits"] for c in chunks) <= 1 + cap, "at most 1 + max_resubmits per chunk"
    assert len(jobs) == sum(c["submits"] for c in chunks), "result.json counts every job"
    assert sum(1 for d in docs if d["status"] == "failed") == files_failed
    if files_failed:
        assert all(c["submits"] == 1 + cap for c in sent)
        for doc in docs:
            assert "chunk 1: 3 creates" in doc["error"]
            assert "Marketo may hold up to 3 copies" in doc["error"]
    else:
        assert all(c["submits"] == 1 + late_copies for c in chunks)
        assert landed(sim) == ROWS, "every row lands"
    figures(
        late_copies_per_chunk=late_copies,
        chunks=len(chunks),
        chunks_sent=len(sent),
        jobs_created=len(jobs),
        extra_jobs_from_unknown_outcomes=len(jobs) - len(sent),
        jobs_per_chunk=round(len(jobs) / len(sent), 2),
        most_submits_of_a_chunk=max(c["submits"] for c in chunks),
        files_failed=files_failed,
        max_resubmits=cap,
    )
