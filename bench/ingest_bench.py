"""Collection benchmark: ingest a large landing file into an encrypted raw zone; report calls/s
and peak memory.

    python -m bench.ingest_bench --calls 1000000            # 1M calls, scaled from the sample
    python -m bench.ingest_bench --gigabytes 2               # one 2 GB file

The input is the bundled sample (data/landing) repeated: each copy gets new trace and session
ids, so every call is new to the ledger; malformed lines are repeated as they are (about 1%).
The ingest runs in a fresh child process, so its peak RSS is the collection's alone. Results are
appended to bench/results/ingest.jsonl with the machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import results

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "landing"


def generate(path: Path, calls: int | None, gigabytes: float | None) -> dict:
    """Write the scaled landing file; returns its line and byte counts."""
    lines = [line for f in sorted(SAMPLE.glob("*.jsonl")) for line in f.read_bytes().splitlines(keepends=True)]
    per_copy = sum(1 for line in lines if line.startswith(b'{"id": "chatcmpl-'))
    target_bytes = int(gigabytes * 1024**3) if gigabytes else None
    written = lines_written = copy = 0
    with open(path, "wb") as out:
        while (calls is None or copy * per_copy < calls) and (target_bytes is None or written < target_bytes):
            tag = f"x{copy}-".encode()
            for line in lines:
                line = line.replace(b'"id": "chatcmpl-', b'"id": "chatcmpl-' + tag, 1)
                line = line.replace(b'"session_id": "sess-', b'"session_id": "sess-' + tag, 1)
                out.write(line)
                written += len(line)
                lines_written += 1
            copy += 1
    return {"lines": lines_written, "bytes": written, "sample_copies": copy}


def ingest_once(landing: Path, raw_root: Path) -> dict:
    """The measured part (run in a child process)."""
    from pipeline import ingest, rawzone

    keys = rawzone.new_keys()
    options = ingest.IngestOptions(pseudonym_key=keys[rawzone.PSEUDONYM_KEY_ENV])
    started = time.perf_counter()
    result = ingest.collect(landing, raw_root, options, keys[rawzone.ENCRYPTION_KEY_ENV], retention_days=0)
    seconds = time.perf_counter() - started
    stats = result.stats
    return {
        "seconds": round(seconds, 1),
        "calls": stats.calls,
        "quarantined": stats.quarantined,
        "calls_per_second": round(stats.calls / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "raw_zone_mb": round(sum(p.stat().st_size for p in raw_root.rglob("*") if p.is_file()) / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--calls", type=int, help="about this many calls (whole copies of the sample)")
    size.add_argument("--gigabytes", type=float, help="one landing file of this size")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help="where the input and raw zone go (default: a temp dir)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ingest_once(Path(args.child[0]), Path(args.child[1]))))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        landing = Path(tmp) / "landing"
        landing.mkdir()
        started = time.perf_counter()
        generated = generate(landing / "scaled.jsonl", args.calls, args.gigabytes)
        print(f"generated {generated['lines']} lines, {generated['bytes'] / 2**30:.2f} GiB in {time.perf_counter() - started:.0f}s", flush=True)
        child = subprocess.run(
            [sys.executable, "-m", "bench.ingest_bench", "--calls", "0", "--child", str(landing), str(Path(tmp) / "raw")],
            cwd=REPO, capture_output=True, text=True, check=True,
        )
        measured = json.loads(child.stdout.strip().splitlines()[-1])
    results.record(
        "ingest", {"input_lines": generated["lines"], "input_gib": round(generated["bytes"] / 2**30, 2), **measured}
    )


if __name__ == "__main__":
    main()
