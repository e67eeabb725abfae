"""Asset metadata shown in the Dagster UI."""

import dagster as dg


def markdown_table(headers: list[str], rows: list[list]) -> dg.MetadataValue:
    """A table the asset's page renders; one row per cluster, usually."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))
