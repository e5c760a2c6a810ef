"""Benchmark: `marketo-orchestrator split` against GNU split and a csv-module splitter.

Not a test. Generates a CSV of lead records (cached under bench/.cache/), then
times, each in a fresh child process, best of --runs:

- `marketo-orchestrator split FILE --out DIR --max-bytes N` (the product),
- `split -C N FILE` (GNU coreutils, cuts at lines and knows no quoting: the
  speed reference),
- a plain splitter built on the csv module (reader rows -> writer, new chunk
  when the next row would reach the limit).

Peak RSS is the child's own ru_maxrss (os.wait4). The product's chunks are then
checked to reparse to exactly the source records, row by row, streaming.

    /tmp/venv/bin/python bench/split.py --size-mb 500
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
DEFAULT_MAX_BYTES = 9_500_000
VENV_BIN = Path(sys.executable).parent

# Names as a CRM holds them: mostly ASCII, some Latin-1 accents, some wider scripts.
FIRST = [
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Susan",
    "Richard",
    "Jessica",
    "Joseph",
    "Sarah",
    "Thomas",
    "Karen",
    "Chris",
    "Nancy",
    "Daniel",
    "Lisa",
    "Matthew",
    "Betty",
    "José",
    "Zoë",
    "Björn",
    "Chloé",
    "François",
    "Renée",
    "Jürgen",
    "Inés",
    "Søren",
    "Ana",
    "Łukasz",
    "Małgorzata",
    "Ondřej",
    "Αλέξανδρος",
    "Дмитрий",
    "伟",
    "さくら",
    "Nguyễn",
]
LAST = [
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Gonzalez",
    "Wilson",
    "Anderson",
    "Thomas",
    "Taylor",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Perez",
    "Thompson",
    "Müller",
    "Núñez",
    "Østergaard",
    "Lefèvre",
    "Sørensen",
    "García",
    "Dvořák",
    "Wójcik",
    "Παπαδόπουλος",
    "Иванов",
    "王",
    "佐藤",
]
COMPANIES = (
    "Initech",
    "Acme, Inc.",
    "Globex Corporation",
    "Soylent",
    "Umbrella, Ltd.",
    "Hooli",
    'The "Best" Widgets',
    "Vandelay Industries",
    "Müller & Söhne GmbH",
    "Wayne Enterprises",
)
NOTES = (
    "",
    "",
    "",
    "Met at the trade show",
    "Interested in pricing, wants a demo",
    'Said the product is "great", follow up',
    "Call back next week\nprefers mornings",
    "Line one\r\nline two\r\nline three",
    "Café meeting; réunion prévue",
    "Budget approved, Q3",
)
HEADER = ["id", "email", "firstName", "lastName", "company", "city", "leadScore", "notes"]


# --- data --------------------------------------------------------------------------


def source_file(size_mb: int) -> Path:
    """The cached bench file of about size_mb MB; generated once."""
    path = CACHE / f"leads-{size_mb}mb-v1.csv"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"generating {path} ...", file=sys.stderr, flush=True)
        tmp = path.with_suffix(".tmp")
        generate(tmp, size_mb * 1_000_000)
        tmp.rename(path)
    return path


def generate(path: Path, size: int) -> None:
    rng = random.Random(20261123)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(HEADER)
        n = 0
        while fh.tell() < size:
            batch = []
            for _ in range(5000):
                n += 1
                first, last = rng.choice(FIRST), rng.choice(LAST)
                batch.append(
                    (
                        n,
                        f"{first.lower()}.{n}@example.com",
                        first,
                        last,
                        rng.choice(COMPANIES),
                        rng.choice(("Chicago", "München", "São Paulo", "Kraków", "東京")),
                        rng.randint(0, 100),
                        rng.choice(NOTES),
                    )
                )
            writer.writerows(batch)


# --- the csv-module splitter (runs in a child: --csv-module-child) ------------------


def csv_module_split(source: Path, out_dir: Path, max_bytes: int) -> None:
    with source.open(encoding="utf-8", newline="") as fh:
        rows = csv.reader(fh)
        header = encode_row(next(rows))
        index, size, out = 0, 0, None
        for row in rows:
            line = encode_row(row)
            if out is None or size + len(line) >= max_bytes:
                if out is not None:
                    out.close()
                index += 1
                out = (out_dir / f"chunk-{index:05d}.csv").open("wb")
                out.write(header)
                size = len(header)
            out.write(line)
            size += len(line)
        if out is not None:
            out.close()


def encode_row(row: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(row)
    return buf.getvalue().encode()


# --- measuring -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    seconds: float
    max_rss_kb: int
    stdout: bytes


def measure(cmd: Sequence[str], out_dir: Path) -> Run:
    """Run cmd in a fresh child; wall time and that child's own peak RSS.

    A forked child inherits its parent's RSS high-water mark, and exec keeps
    it, so os.wait4's ru_maxrss of a child of this (large) Python process
    reports at least this process's size. GNU time, a small process, forks the
    command itself, so its %M is the command's own peak. Without GNU time the
    ru_maxrss is shown and may be inflated that way.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    os.sync()  # start every tool with no dirty pages of the previous one
    with tempfile.TemporaryDirectory() as scratch:
        rss_file = Path(scratch, "rss")
        argv = [*GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if GNU_TIME else list(cmd)
        with Path(scratch, "out").open("w+b") as sink, Path(scratch, "err").open("w+b") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=sink, stderr=err)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode:
                err.seek(0)
                raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.read().decode()}")
            sink.seek(0)
            output = sink.read()
        rss_kb = int(rss_file.read_text().split()[-1]) if GNU_TIME else usage.ru_maxrss
    return Run(seconds, rss_kb, output)


def gnu_time() -> list[str]:
    """["/usr/bin/time"] when it is GNU time (has -f and -o), else []."""
    path = shutil.which("time") or "/usr/bin/time"
    try:
        probe = subprocess.run(
            [path, "-f", "%M", "-o", os.devnull, "true"], capture_output=True, check=False
        )
    except OSError:
        return []
    return [path] if probe.returncode == 0 else []


GNU_TIME = gnu_time()


def product_command(source: Path, out_dir: Path, max_bytes: int) -> list[str]:
    """The CLI command; until the CLI exists, the clearly marked fallback below."""
    cli = VENV_BIN / "marketo-orchestrator"
    if cli.exists():
        args = ["split", str(source), "--out", str(out_dir), "--max-bytes", str(max_bytes)]
        return [str(cli), *args]
    print("FALLBACK: no marketo-orchestrator command; timing the splitter API", file=sys.stderr)
    return api_command(source, out_dir, max_bytes)


def api_command(source: Path, out_dir: Path, max_bytes: int) -> list[str]:
    """The splitter called from a bare Python child: the splitter without the CLI's startup."""
    code = (
        "import sys; from pathlib import Path; from orchestrator.splitter import split_file; "
        "[print(e) for e in split_file(Path(sys.argv[1]), Path(sys.argv[2]), "
        "max_bytes=int(sys.argv[3]), fmt='csv')]"
    )
    return [sys.executable, "-c", code, str(source), str(out_dir), str(max_bytes)]


PRODUCT = "marketo-orchestrator split"
GNU_SPLIT = "GNU split -C"
CSV_MODULE = "csv-module splitter"


def commands(source: Path, work: Path, max_bytes: int) -> dict[str, tuple[list[str], Path]]:
    """Each tool's command line and the directory it writes its chunks to."""
    me = str(Path(__file__).resolve())
    product, api, gnu, csvmod = (work / name for name in ("product", "api", "gnu", "csvmod"))
    return {
        PRODUCT: (product_command(source, product, max_bytes), product),
        "(splitter API, python -c)": (api_command(source, api, max_bytes), api),
        GNU_SPLIT: (["split", "-C", str(max_bytes), str(source), f"{gnu}/x-"], gnu),
        CSV_MODULE: (
            [sys.executable, me, "--csv-module-child", str(source), str(csvmod), str(max_bytes)],
            csvmod,
        ),
    }


# --- checking the product's chunks ---------------------------------------------------


def chunk_rows(chunks: Sequence[Path], max_bytes: int) -> Iterator[list[str]]:
    for path in chunks:
        if path.stat().st_size >= max_bytes:
            raise SystemExit(f"{path.name} is {path.stat().st_size} bytes, not under {max_bytes}")
        with path.open(encoding="utf-8", newline="") as fh:
            rows = csv.reader(fh)
            if next(rows) != HEADER:
                raise SystemExit(f"{path.name} does not start with the header")
            yield from rows


def verify(source: Path, out_dir: Path, max_bytes: int) -> int:
    """Stream-compare the chunks' records with the source's; returns the row count."""
    chunks = sorted(out_dir.glob("chunk-*.csv"))
    with source.open(encoding="utf-8", newline="") as fh:
        expected = csv.reader(fh)
        next(expected)
        count = 0
        pairs = itertools.zip_longest(expected, chunk_rows(chunks, max_bytes))
        for count, (want, got) in enumerate(pairs, start=1):
            if want != got:
                raise SystemExit(f"record {count} differs: {want!r} != {got!r}")
    return count


# --- main ----------------------------------------------------------------------------


def table(results: dict[str, list[Run]], size: int) -> str:
    best = {name: min(r.seconds for r in runs) for name, runs in results.items()}
    gnu, csvmod = best[GNU_SPLIT], best[CSV_MODULE]
    lines = [
        "| tool | best s | median s | MB/s | x GNU split | csv-module / this | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        secs = best[name]
        lines.append(
            f"| {name} | {secs:.2f} | {statistics.median(r.seconds for r in runs):.2f} "
            f"| {size / secs / 1e6:.0f} | {secs / gnu:.2f} | {csvmod / secs:.1f} "
            f"| {max(r.max_rss_kb for r in runs) / 1024:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--runs", type=int, default=3, help="best of this many per tool")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where chunks are written")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--csv-module-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.csv_module_child:
        src, out, limit = args.csv_module_child
        csv_module_split(Path(src), Path(out), int(limit))
        return 0

    source = source_file(args.size_mb)
    size = source.stat().st_size
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench-split-") as tmp:
        work = Path(tmp)
        cmds = commands(source, work, args.max_bytes)
        print(f"source: {source} ({size / 1e6:.0f} MB), max bytes {args.max_bytes}")
        print("product command:", " ".join(cmds[PRODUCT][0]))
        results: dict[str, list[Run]] = {name: [] for name in cmds}
        for attempt in range(args.runs):
            for name, (cmd, out_dir) in cmds.items():
                if name == CSV_MODULE and attempt:
                    continue  # one run is plenty for a tool this slow
                run = measure(cmd, out_dir)
                results[name].append(run)
                print(f"  {name}: {run.seconds:.2f} s, {run.max_rss_kb / 1024:.1f} MB", flush=True)
            if attempt == 0 and not args.skip_verify:
                rows = verify(source, work / "product", args.max_bytes)
                chunks = len(list((work / "product").glob("chunk-*.csv")))
                print(f"  verified: {rows} records in {chunks} chunks reparse exactly", flush=True)
        print()
        print(table(results, size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
