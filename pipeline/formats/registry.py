"""The adapters by name, in detection order, and per-file format detection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import sources
from pipeline.formats import canonical, langfuse, langsmith, openai_batch, openai_chat, otel_genai

ADAPTERS = {m.NAME: m for m in (canonical, openai_batch, openai_chat, otel_genai, langfuse, langsmith)}
# Batch input files hold requests only; they are read through their output file.
COMPANION_FORMATS = {openai_batch.INPUT_NAME: openai_batch.looks_like_input}
DOCUMENT_ITEM_PATHS = ("resourceSpans.item", "resourceLogs.item", "data.item", "item")


def detect(records: list[Any]) -> str | None:
    """The first format that most of a file's first recognisable records look like, or None.

    Records that look like no format at all (`null`, a number, a stray object) do not vote: a
    file of real calls with some junk lines is read, its junk quarantined line by line, rather
    than the whole file quarantined with its calls."""
    checks = {**{name: adapter.looks_like for name, adapter in ADAPTERS.items()}, **COMPANION_FORMATS}
    votes = {name: [looks_like(r) for r in records] for name, looks_like in checks.items()}
    recognisable = sum(1 for matches in zip(*votes.values()) if any(matches))
    for name, matches in votes.items():
        if recognisable and sum(matches) * 2 > recognisable:
            return name
    return None


def detect_file(path: Path) -> tuple[str, str | None, str]:
    """(layout, format or None, why when None; "" when nothing is wrong, as with an empty file) for
    one landing file."""
    try:
        layout = sources.sniff_layout(path)
    except sources.SealedFileError as err:
        return "not-json", None, str(err)
    if layout == "not-json":
        return layout, None, "file is not JSON or JSON lines"
    records = sources.first_records(path, layout, DOCUMENT_ITEM_PATHS)
    if not records and layout == "table":  # a damaged table says why; an export of no rows holds nothing wrong
        return layout, None, next((r.reason for r in sources.read_table(path) if isinstance(r, sources.Rejected)), "")
    if not records:
        return layout, None, "no decodable JSON record in the first lines"
    found = detect(records)
    if found is None:
        keys = sorted(records[0])[:8] if isinstance(records[0], dict) else type(records[0]).__name__
        return layout, None, f"unrecognised log format (first record: {keys}); name the format in the ingest config"
    return layout, found, ""
