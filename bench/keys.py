"""Benchmark: what keys cost the splitter (issue 20, item 4).

Not a test. Splits the same leads CSV with and without a key rule (email), each in a
fresh child process, in one run, and reports per mode: wall and CPU seconds, CPU
seconds per 100,000 rows, peak RSS (the child's ru_maxrss), rows moved to tail chunks,
and the key sets' size per chunk (the `.keys` files: 8 bytes a distinct key). Two
sources, generated once under bench/.cache/:

- distinct: every email once (the common case: nothing moves);
- repeats: 1 % of rows repeat an earlier row's email, half of them within the last
  20,000 rows (near: moved to a tail chunk), half anywhere before (mostly far: stays).

Rows look like bench/finish.py's (five columns, about 70 bytes, every 50th with a
quoted note over two lines); chunks are Marketo's 9.5 MB.

    .venv/bin/python bench/keys.py                  # 300 MB each: about a minute
    .venv/bin/python bench/keys.py --size-mb 50     # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import constants, splitter  # noqa: E402
from orchestrator.keys import LEAD_NAMESPACE, keys_path  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
HEADER = ["email", "firstName", "lastName", "company", "note"]
REPEAT_EVERY = 100  # 1 % of rows repeat an earlier email
NEAR = 20_000  # rows back a near repeat reaches at most


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=300, help="each source (default 300)")
    parser.add_argument("--runs", type=int, default=1, help="best of N per mode")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # source out keys|none
    return parser.parse_args(argv)


def source_file(size_mb: int, repeats: bool) -> tuple[Path, int]:
    """The cached source and its rows, generated if missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"keys-{'repeats' if repeats else 'distinct'}-{size_mb}mb.csv"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path, int(json.loads(meta.read_text())["rows"])
    rng = random.Random(20)
    rows = 0
    tmp = path.with_suffix(".part")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        while fh.tell() < size_mb * 1_000_000:
            batch = []
            for i in range(rows, rows + 10_000):
                person = i
                if repeats and i and i % REPEAT_EVERY == 0:
                    back = rng.randrange(1, min(i, NEAR) + 1) if rng.random() < 0.5 else None
                    person = i - back if back else rng.randrange(i)
                note = 'said: "call back",\nthen hung up' if i % 50 == 7 else f"ref {i * 7919}"
                batch.append(
                    [f"lead{person}@example.com", f"First{i % 997}", f"Last{i % 1009}", "Co", note]
                )
            writer.writerows(batch)
            rows += len(batch)
    tmp.rename(path)
    meta.write_text(json.dumps({"rows": rows}))
    return path, rows


def child(source: Path, out: Path, mode: str) -> int:
    """One split, in this process; prints what it measured as JSON."""
    rule = splitter.KeyRule(LEAD_NAMESPACE, ("email",)) if mode == "keys" else None
    started, cpu = time.monotonic(), time.process_time()
    chunks, done = [], None
    for event in splitter.split_file(
        source, out, max_bytes=constants.DEFAULT_MAX_CHUNK_BYTES, fmt="csv", keys=rule
    ):
        if isinstance(event, splitter.Chunk):
            chunks.append(event)
        elif isinstance(event, splitter.SplitDone):
            done = event
    assert done is not None
    key_bytes = [keys_path(c.path).stat().st_size for c in chunks if keys_path(c.path).exists()]
    report = {
        "wall": time.monotonic() - started,
        "cpu": time.process_time() - cpu,
        "rows": done.rows,
        "chunks": len(chunks),
        "moved": done.moved,
        "keys_bytes": max(key_bytes, default=0),
        "rows_per_chunk": max(c.rows for c in chunks),
    }
    print(json.dumps(report))
    return 0


def measure(source: Path, mode: str, scratch: Path) -> dict[str, float]:
    out = scratch / f"out-{mode}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(source), str(out), mode],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"child failed: {proc.returncode}")
    shutil.rmtree(out, ignore_errors=True)
    found: dict[str, float] = json.loads(text)
    found["rss_mb"] = usage.ru_maxrss / 1024
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        source, out, mode = args.child
        return child(Path(source), Path(out), mode)
    scratch = Path(tempfile.mkdtemp(prefix="keys-", dir=CACHE))
    print("| source | keys | wall s | CPU s | CPU s per 100k rows | peak RSS MB | moved | chunks |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    try:
        for repeats in (False, True):
            source, rows = source_file(args.size_mb, repeats)
            name = f"{'1 % repeats' if repeats else 'distinct'}, {rows:,} rows"
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.runs):
                for mode in ("none", "keys"):
                    found = measure(source, mode, scratch)
                    if mode not in best or found["cpu"] < best[mode]["cpu"]:
                        best[mode] = found
            for mode in ("none", "keys"):
                m = best[mode]
                print(
                    f"| {name} | {mode} | {m['wall']:.2f} | {m['cpu']:.2f} | "
                    f"{m['cpu'] / m['rows'] * 1e5:.3f} | {m['rss_mb']:.1f} | "
                    f"{int(m['moved']):,} | {int(m['chunks'])} |"
                )
            extra = (best["keys"]["cpu"] - best["none"]["cpu"]) / best["keys"]["rows"] * 1e5
            print(
                f"|  | keys cost | ratio {best['keys']['cpu'] / best['none']['cpu']:.2f} | "
                f"+{extra:.3f} s per 100k rows | key set {best['keys']['keys_bytes'] / 1e6:.2f} MB "
                f"per chunk of {int(best['keys']['rows_per_chunk']):,} rows | | | |"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
