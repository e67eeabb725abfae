"""Clustering benchmark: task signatures compared on the sample's true steps, and clustering at scale.

    python -m bench.cluster_bench --compare          # every signature, with and without PCA
    python -m bench.cluster_bench --calls 100000     # the sample's calls repeated to 100k
    python -m bench.cluster_bench --calls 1000000

Both start from the bundled sample, curated the pipeline's way. `--compare` clusters it once per
task signature (`cluster.SIGNATURES`) with PCA to 32 dimensions and without, and scores each run
against the true steps (adjusted Rand index, purity, share unclustered). `--calls N` repeats the
curated calls until there are N (new trace ids, the same texts, so each distinct signature is
still embedded once: the figure is the clustering's own cost at that volume, not embedding
throughput) and reports time, peak memory (RSS of the whole process, models included) and the
same scores. Results are appended to bench/results/clustering.jsonl with machine, date and command.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import pandas as pd

from bench import results

REPO = Path(__file__).resolve().parents[1]


def curated_sample() -> pd.DataFrame:
    from pipeline import curate, ingest

    traces = ingest.read_calls(ingest.find_landing_files(REPO / "data" / "landing")).traces
    return curate.curate(traces).curated


def scaled(curated: pd.DataFrame, calls: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """The curated calls repeated up to `calls`, and each new trace id's original id."""
    copies = -(-calls // len(curated))
    frame = pd.concat([curated] * copies, ignore_index=True).iloc[:calls].copy()
    original = frame["trace_id"].to_numpy()
    frame["trace_id"] = [f"{trace_id}~{i}" for i, trace_id in enumerate(original)]
    return frame, dict(zip(frame["trace_id"], original))


def scores(assignments: pd.DataFrame, labels: dict, original: dict[str, str] | None = None) -> dict:
    from tests.score_run import clustering_quality

    if original:
        assignments = assignments.assign(trace_id=assignments["trace_id"].map(original))
    return clustering_quality(assignments, labels)


def timed_clustering(curated: pd.DataFrame, **settings):
    from pipeline import cluster

    started = time.perf_counter()
    result = cluster.cluster_calls(curated, **settings)
    return result, round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="compare task signatures on the sample")
    parser.add_argument("--calls", type=int, default=0, help="cluster the sample repeated to this many calls")
    args = parser.parse_args()
    if not args.compare and not args.calls:
        parser.error("give --compare or --calls N")

    from pipeline import cluster

    labels = json.loads((REPO / "tests" / "fixtures" / "labels.json").read_text())
    curated = curated_sample()
    cluster.load_embedder(cluster.BUNDLED_EMBEDDER)  # loading the model is not clustering time

    if args.compare:
        for signature in cluster.SIGNATURES:
            for dimensions in (cluster.REDUCED_DIMENSIONS, None):
                result, seconds = timed_clustering(curated, signature=signature, reduced_dimensions=dimensions)
                results.record("clustering", {
                    "signature": signature,
                    "reduced_dimensions": dimensions or "none",
                    "calls": len(curated),
                    "clusters": len(result.clusters),
                    **scores(result.assignments, labels),
                    "seconds": seconds,
                })
    if args.calls:
        frame, original = scaled(curated, args.calls)
        result, seconds = timed_clustering(frame, progress=print)
        results.record("clustering", {
            "signature": cluster.DEFAULT_SIGNATURE,
            "reduced_dimensions": cluster.REDUCED_DIMENSIONS,
            "calls": len(frame),
            "fitted_calls": result.fitted_calls,
            "clusters": len(result.clusters),
            **scores(result.assignments, labels, original),
            "seconds": seconds,
            "calls_per_second": round(len(frame) / seconds),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        })


if __name__ == "__main__":
    main()
