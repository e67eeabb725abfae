"""Clustering benchmark: task signatures compared on the sample's true steps, and clustering at scale.

    python -m bench.cluster_bench --compare          # every signature, with and without PCA
    python -m bench.cluster_bench --calls 100000     # the sample's calls repeated to 100k
    python -m bench.cluster_bench --calls 1000000
    python -m bench.cluster_bench --production       # steps behind a shared agent preamble

Both start from the bundled sample, curated the pipeline's way. `--compare` clusters it once per
task signature (`cluster.SIGNATURES`) with PCA to 32 dimensions and without, and scores each run
against the true steps (adjusted Rand index, purity, share unclustered). `--calls N` repeats the
curated calls until there are N (new trace ids, the same texts, so each distinct signature is
still embedded once: the figure is the clustering's own cost at that volume, not embedding
throughput) and reports time, peak memory (RSS of the whole process, models included) and the
same scores. `--production` rewrites the sample's calls as production agents write prompts
(tests/production_prompts.py: one agent preamble of 300 to 2,000 tokens before every step's
instruction, filled-in variables, retrieved excerpts, history, a fifth step reading the intent
step's messages with another label set) and scores clustering against the true steps with the
signatures reading only the instructions that tell steps apart (`step_instruction_segments`) and,
for comparison, reading the whole prompt as before. Results are appended to
bench/results/clustering.jsonl with machine, date and command.
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


def production(curated: pd.DataFrame, labels: dict) -> None:
    from sklearn.metrics import adjusted_rand_score

    from pipeline import cluster
    from tests.production_prompts import TRUE_STEP, production_calls

    steps = {i: r["step"] for i, r in labels["records"].items()}
    finds_steps = cluster.step_instruction_segments
    for tokens in (300, 1000, 2000):
        calls = production_calls(curated, steps, per_step=150, preamble_tokens=tokens, history_share=0.3)
        for reads in ("step instructions", "whole prompt"):
            cluster.step_instruction_segments = finds_steps if reads == "step instructions" else (lambda *_: None)
            result, seconds = timed_clustering(calls, use_step_tags=False)
            results.record("clustering", {
                "workload": f"production-style prompts: {tokens}-token preamble, variables, excerpts, 30% with history, "
                            "5 steps (two over the same messages)",
                "signature_reads": reads,
                "calls": len(calls),
                "clusters": len(result.clusters),
                "adjusted_rand_index": round(adjusted_rand_score(calls[TRUE_STEP], result.assignments["cluster_id"]), 4),
                "seconds": seconds,
            })
    cluster.step_instruction_segments = finds_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="compare task signatures on the sample")
    parser.add_argument("--calls", type=int, default=0, help="cluster the sample repeated to this many calls")
    parser.add_argument("--production", action="store_true", help="production-style prompts built from the sample")
    args = parser.parse_args()
    if not args.compare and not args.calls and not args.production:
        parser.error("give --compare, --calls N or --production")

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
    if args.production:
        production(curated, labels)
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
