"""Where benchmarks record what they measured: one JSON line per run, with date, machine, command."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM, Python {platform.python_version()}"


def record(name: str, measured: dict) -> dict:
    """Append one result to bench/results/<name>.jsonl and print it."""
    entry = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python -m {sys.modules['__main__'].__spec__.name} " + " ".join(sys.argv[1:]),
        "machine": machine(),
        **measured,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry, indent=2))
    return entry
