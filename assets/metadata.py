"""Asset metadata shown in the Dagster UI."""

import dagster as dg


def markdown_table(headers: list[str], rows: list[list]) -> dg.MetadataValue:
    """A table the asset's page renders; one row per cluster, usually."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


LISTED = 10  # places named in a failed check's description; the metadata keeps them all


def check_result(found: dict | list, *, what: str, next_step: str, **metadata) -> dg.AssetCheckResult:
    """An asset check's result: passed when nothing was `found`. A failed check says, in its
    description, what was found, how many and where (call ids, fields, clusters or files, never
    personal data) and what resolves it; `slm-convert run` prints that description as its last
    lines, and the UI shows it on the check and in the run's event log."""
    if not found:
        return dg.AssetCheckResult(passed=True, metadata={**metadata, "found": 0})
    places = [f"{key} ({'; '.join(map(str, value)) if isinstance(value, list) else value})" for key, value in found.items()] \
        if isinstance(found, dict) else [str(place) for place in found]
    more = f" and {len(places) - LISTED} more" if len(places) > LISTED else ""
    description = f"{what}: {len(places)}, in {', '.join(places[:LISTED])}{more}. What next: {next_step}"
    return dg.AssetCheckResult(passed=False, description=description,
                               metadata={**metadata, "found": len(places), "where": dg.MetadataValue.json(found),
                                         "next_step": next_step})
