"""Score a finished run's outputs against the sample's truth labels (never read by the pipeline).

    .venv/bin/python -m tests.score_run [OUTPUT_DIR]     (default: output/)

Prints what the README and the issue notes quote: malformed lines quarantined, canaries left in
anything written after scrubbing, exact re-sends caught, and clustering quality (adjusted Rand
index and purity against the true step of each call).
"""

import json
import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import adjusted_rand_score

from pipeline.store import Store, read_json, read_table
from tests.conftest import FIXTURES, REPO


def score(output_dir: Path) -> dict:
    labels = json.loads((FIXTURES / "labels.json").read_text())
    store = Store(output_dir)
    raw_stats = read_json(store.stats("raw_traces"))
    curated = read_table(store.table("curated_traces"))
    removed = read_table(store.table("curation_removed"))
    assignments = read_table(store.table("task_clusters"))

    # everything written after scrubbing: curated table, eval predictions, registry files
    written = [*curated["messages"], *curated["response_message"]]
    predictions = store.evaluation / "predictions.parquet"
    if predictions.exists():
        frame = read_table(predictions)
        written += [*frame.get("baseline_answer", []), *frame.get("slm_answer", [])]
    written += [p.read_text(errors="replace") for p in store.registry.rglob("*") if p.suffix in {".json", ".yaml", ".md"}]
    text = "\n".join(written)
    canaries_left = [c for c in labels["canaries"] if c in text]

    resends = {copy for _, copy in labels["dups"]["exact"]}
    dropped = set(removed.loc[removed["reason"] == "exact duplicate", "trace_id"])
    steps = assignments["trace_id"].map(lambda i: labels["records"][i]["step"])
    clustered = assignments["cluster_id"] != -1
    purity = (
        pd.crosstab(assignments.loc[clustered, "cluster_id"], steps[clustered]).max(axis=1).sum() / max(clustered.sum(), 1)
    )
    return {
        "quarantined_non_empty_lines": raw_stats["quarantined"] - raw_stats["quarantine_reasons"].get("empty line", 0),
        "labelled_malformed_lines": labels["malformed_lines"],
        "canaries": len(labels["canaries"]),
        "canaries_left_after_scrubbing": len(canaries_left),
        "exact_resends_caught": f"{len(resends & dropped)}/{len(resends)}",
        "removed_as_duplicate_but_not_labelled": len(dropped - resends),
        "adjusted_rand_index": round(adjusted_rand_score(steps, assignments["cluster_id"]), 4),
        "purity": round(float(purity), 4),
        "unclustered_share": round(float((~clustered).mean()), 4),
    }


if __name__ == "__main__":
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "output"
    print(json.dumps(score(output), indent=2))
