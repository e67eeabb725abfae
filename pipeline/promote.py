"""Promotion: clusters whose SLM matched the baseline go to the router; the rest stay on the LLM.

Each run writes a new numbered version of the model registry:

    registry/v0003/
        routes/cluster-2/adapter/   LoRA adapter and tokenizer
        eval_report.json            shadow-evaluation figures of every cluster
        router.yaml                 what the router serves, per route, and the fallback
        summary.json                counts per stage, clusters, decisions and paths
    registry/LATEST                 the name of the newest version

A version folder is written under a temporary name and renamed when complete, so the router
never reads half a version.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from statistics import NormalDist

import yaml

from pipeline.cluster import cluster_key
from pipeline.store import write_bytes, write_json

PROMOTED, NOT_PROMOTED = "promoted", "stays on LLM"


def quality_lower_bound(mean_score: float, calls: int, confidence: float) -> float:
    """One-sided lower confidence bound of a mean score in [0, 1] over `calls` calls.

    Wilson's score bound, treating each score as a success or failure: of all variables in
    [0, 1] with a given mean, the 0/1 one has the largest variance, so partial scores only make
    the true bound tighter than this one. A handful of lucky calls gives a low bound.
    """
    if calls <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    p = min(max(mean_score, 0.0), 1.0)
    spread = z * math.sqrt(p * (1 - p) / calls + z * z / (4 * calls * calls))
    return max(0.0, (p + z * z / (2 * calls) - spread) / (1 + z * z / calls))


def promotion_decision(
    evaluation: dict | None, quality_floor: float, min_holdout: int, confidence: float = 0.95
) -> tuple[str, str]:
    """(decision, reason) for one cluster from its shadow-evaluation summary.

    Non-inferiority: the SLM's score against the baseline on the calls it would answer (those
    at or above its confidence threshold) must be at least `quality_floor` (1 - the margin
    tolerated against the baseline) with `confidence`, not only on average.
    """
    if evaluation is None:
        return NOT_PROMOTED, "not fine-tuned"
    if evaluation["holdout_calls"] < min_holdout:
        return NOT_PROMOTED, f"only {evaluation['holdout_calls']} held-out calls (< {min_holdout})"
    if evaluation["confidence_threshold"] is None:
        score = evaluation["score_vs_baseline"]
        return NOT_PROMOTED, f"shadow score {score:.3f}: no confidence threshold keeps the answered calls at the floor"
    answered = evaluation["answered_at_threshold"]
    score = evaluation["score_at_threshold"]
    bound = quality_lower_bound(score, answered, confidence)
    stated = f"score {score:.3f} on the {answered} calls it would answer, {confidence:.0%} lower bound {bound:.3f}"
    if bound < quality_floor:
        return NOT_PROMOTED, f"{stated} is below the floor {quality_floor:.3f}"
    return PROMOTED, f"{stated} meets the floor {quality_floor:.3f}"


def next_version(registry: Path) -> str:
    existing = [int(p.name[1:]) for p in registry.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit()]
    return f"v{max(existing, default=0) + 1:04d}"


def write_registry_version(
    registry: Path,
    routes: list[dict],
    eval_report: dict,
    fallback: dict,
    summary: dict,
) -> Path:
    """Write one complete registry version and point LATEST at it. Returns its folder.

    `routes` are the promoted clusters: cluster_id, label, base_model, adapter_dir, threshold,
    centroid.
    """
    registry.mkdir(parents=True, exist_ok=True)
    version = next_version(registry)
    staging = registry / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    router_routes = []
    for route in routes:
        key = cluster_key(route["cluster_id"])
        target = staging / "routes" / key / "adapter"
        shutil.copytree(route["adapter_dir"], target)
        router_routes.append(
            {
                "name": key,
                "label": route["label"],
                "base_model": route["base_model"],
                "adapter": str(Path("routes") / key / "adapter"),
                "confidence_threshold": route["threshold"],
                "centroid": route["centroid"],
            }
        )
    router = {
        "version": version,
        "fallback": fallback,
        # The router matches a request to the route whose centroid is nearest, then answers with
        # the SLM only if its confidence meets the route's threshold; otherwise it escalates.
        "routes": router_routes,
    }
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / "router.yaml", "w") as f:
        yaml.safe_dump(router, f, sort_keys=False, width=120)
    write_json(staging / "eval_report.json", eval_report)
    final = registry / version
    summary = {
        **summary,
        "registry_version": version,
        "paths": {
            **summary.get("paths", {}),
            "router_config": str(final / "router.yaml"),
            "eval_report": str(final / "eval_report.json"),
            "summary": str(final / "summary.json"),
        },
    }
    write_json(staging / "summary.json", summary)
    staging.rename(final)
    write_bytes(registry / "LATEST", f"{version}\n".encode())
    return final


def latest_version(registry: Path) -> Path:
    """The folder of the newest registry version."""
    latest = registry / "LATEST"
    if not latest.exists():
        raise FileNotFoundError(f"No registry version under {registry}: run `slm-convert run` first")
    return registry / latest.read_text().strip()


def format_summary(summary: dict) -> str:
    """The run's outcome for a person: what was found, chosen, scored and promoted."""
    counts = summary["counts"]
    raw, curated = counts["raw_traces"], counts["curated_traces"]
    lines = [
        f"Calls collected: {raw['calls']} new from {raw['files_read']} files ({raw['quarantined']} lines quarantined, "
        f"{raw['repeated_records']} already collected, {raw['files_unchanged']} files unchanged since the last run)",
        f"Curated: {curated['curated']} calls ({curated['exact_duplicates']} exact and {curated['near_duplicates']} near "
        f"duplicates and {curated['unusable']} unusable removed; {curated['kept_out_of_training']} kept out of training "
        f"for negative feedback; {sum(curated['pii_findings'].values())} personal-data spans replaced)",
        f"Task clusters: {counts['task_clusters']['clusters']} "
        f"({counts['task_clusters']['unclustered_calls']} calls unclustered, kept on the LLM)",
        "",
        f"{'cluster':<11} {'calls':>6}  {'label':<34} {'model':<24} {'score':>6} {'floor':>6}  decision",
    ]
    for c in summary["clusters"]:
        evaluation = c["shadow_eval"]
        score = f"{evaluation['score_vs_baseline']:.3f}" if evaluation else "-"
        lines.append(
            f"{c['name']:<11} {c['size']:>6}  {c['label'][:34]:<34} {(c['selection']['candidate'] or 'LLM'):<24} "
            f"{score:>6} {summary['quality_floor']:>6.2f}  {c['promotion']['decision']}: {c['promotion']['reason']}"
        )
        if c["selection"]["decision"] != "fine-tune":
            lines.append(f"{'':<11} {'':>6}  selection: {c['selection']['reason']}")
    lines += [
        "",
        f"Promoted routes: {counts['promoted_routes']} of {len(summary['clusters'])} clusters "
        f"(registry {summary['registry_version']})",
        f"Router config: {summary['paths']['router_config']}",
        f"Summary:       {summary['paths']['summary']}",
    ]
    return "\n".join(lines)
