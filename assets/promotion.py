"""Step 6 and promotion as assets: shadow_eval -> router_config.

Promotion is gated by a blocking check on shadow_eval: if any evaluated call was also trained
on, router_config does not run and nothing is promoted.
"""


from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pandas as pd

from assets.models import finetuned_adapters
from assets.metadata import markdown_table
from assets.resources import PipelineStore
from pipeline import evaluate, promote, rawzone
from pipeline.calls import baseline_answer
from pipeline.cluster import UNCLUSTERED, cluster_key
from pipeline.store import read_json, read_table, write_json, write_table

GROUP = "promotion"


class ShadowEvalConfig(dg.Config):
    max_calls_per_cluster: int = 16  # latest held-out calls answered per cluster (0: all)
    batch_size: int = 8
    max_new_tokens_cap: int = 160
    quality_floor: float = 0.8  # mean score vs baseline a cluster must reach to be promoted


def _training_records(store) -> list[dict]:
    """The full training record (with train and held-out ids) of each adapter of the last run."""
    adapters = read_json(store.stats("finetuned_adapters"))
    return [read_json(Path(a["adapter_dir"]).parent / "training.json") for a in adapters]


@dg.asset(group_name=GROUP, deps=[finetuned_adapters], kinds={"pytorch"})
def shadow_eval(context: dg.AssetExecutionContext, config: ShadowEvalConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """Each adapter answers its cluster's held-out calls; answers are scored against the logged
    baseline answer, and a confidence threshold is calibrated per cluster."""
    store = pipeline_store.store()
    curated = read_table(store.table("curated_traces")).set_index("trace_id", drop=False)
    settings = evaluate.GenerationSettings(config.batch_size, config.max_new_tokens_cap)
    summaries, predictions = [], []
    for record in _training_records(store):
        key = cluster_key(record["cluster_id"])
        holdout_ids = record["holdout_ids"][-config.max_calls_per_cluster:] if config.max_calls_per_cluster else record["holdout_ids"]
        holdout = curated.loc[holdout_ids].reset_index(drop=True)
        train_answers = [baseline_answer(r) for r in curated.loc[record["train_ids"], "response_message"]]
        context.log.info(f"{key}: answering {len(holdout)} held-out calls")
        model, tokenizer = evaluate.load_adapter_model(Path(record["base_dir"]), Path(record["adapter_dir"]))
        scored, summary = evaluate.evaluate_cluster(
            model, tokenizer, holdout, train_answers, config.quality_floor, settings,
            progress=lambda m, k=key: context.log.info(f"{k}: {m}"),
        )
        summaries.append({"cluster_id": record["cluster_id"], "label": record["label"], "candidate": record["candidate"], **summary})
        predictions.append(scored.assign(cluster_id=record["cluster_id"]))
    report = {"quality_floor": config.quality_floor, "clusters": summaries}
    write_json(store.evaluation / "shadow_eval.json", report)
    write_table(store.evaluation / "predictions.parquet", pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame())
    return dg.MaterializeResult(
        metadata={
            "clusters_evaluated": len(summaries),
            "scores": markdown_table(
                ["cluster", "label", "held out", "score vs baseline", "exact", "threshold", "coverage"],
                [
                    [s["cluster_id"], s["label"], s["holdout_calls"], f"{s['score_vs_baseline']:.3f}",
                     f"{s['exact_agreement']:.3f}", s["confidence_threshold"], f"{s['coverage_at_threshold']:.2f}"]
                    for s in summaries
                ],
            ),
        }
    )


@dg.asset_check(
    asset=shadow_eval,
    blocking=True,
    description="No call that was evaluated was also trained on (gates promotion).",
)
def holdout_never_trained_on(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    store = pipeline_store.store()
    predictions = read_table(store.evaluation / "predictions.parquet")
    trained = {i for r in _training_records(store) for i in r["train_ids"]}
    evaluated = set(predictions["trace_id"]) if len(predictions) else set()
    overlap = sorted(evaluated & trained)
    return dg.AssetCheckResult(passed=not overlap, metadata={"evaluated": len(evaluated), "also_trained": len(overlap)})


class PromotionConfig(dg.Config):
    min_holdout: int = 10  # fewer held-out calls than this are no evidence
    confidence: float = 0.95  # a cluster is promoted when this lower bound of its score clears the floor
    fallback_model: str = "gpt-4.1"  # what the router escalates to
    fallback_base_url: str = "https://api.openai.com/v1"


@dg.asset(group_name=GROUP, deps=[shadow_eval], kinds={"yaml"})
def router_config(context: dg.AssetExecutionContext, config: PromotionConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """A new registry version: the adapters of promoted clusters, the eval report, the router
    YAML (route per promoted cluster, threshold, fallback) and summary.json."""
    store = pipeline_store.store()
    report = read_json(store.evaluation / "shadow_eval.json")
    evaluations = {s["cluster_id"]: s for s in report["clusters"]}
    records = {r["cluster_id"]: r for r in _training_records(store)}
    clusters = read_json(store.stats("task_clusters"))
    choices = {c["cluster_id"]: c for c in read_json(store.stats("slm_candidates"))["choices"]}
    assignments = read_table(store.table("task_clusters"))

    routes, cluster_summaries = [], []
    for cluster in clusters:
        cid = cluster["cluster_id"]
        decision, reason = promote.promotion_decision(
            evaluations.get(cid), report["quality_floor"], config.min_holdout, config.confidence
        )
        if decision == promote.PROMOTED:
            routes.append(
                {
                    "cluster_id": cid,
                    "label": cluster["label"],
                    "base_model": records[cid]["candidate"],
                    "adapter_dir": records[cid]["adapter_dir"],
                    "threshold": evaluations[cid]["confidence_threshold"],
                    "centroid": cluster["centroid"],
                }
            )
        training = records.get(cid, {}).get("metrics")
        cluster_summaries.append(
            {
                "cluster_id": cid,
                "name": cluster_key(cid),
                "label": cluster["label"],
                "size": cluster["size"],
                "share": cluster["share"],
                "member_ids": list(assignments.loc[assignments["cluster_id"] == cid, "trace_id"]),
                "selection": {k: choices[cid][k] for k in ("decision", "candidate", "reason")},
                "training": {k: v for k, v in training.items() if k != "loss_curve"} if training else None,
                "shadow_eval": evaluations.get(cid),
                "promotion": {"decision": decision, "reason": reason},
            }
        )
    unclustered = assignments.loc[assignments["cluster_id"] == UNCLUSTERED, "trace_id"]
    summary = {
        "run_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "landing_dir": pipeline_store.landing_dir,
        "output_dir": pipeline_store.output_dir,
        "counts": {
            "raw_traces": read_json(store.stats("raw_traces")),
            "curated_traces": read_json(store.stats("curated_traces")),
            "task_clusters": {"clusters": len(clusters), "unclustered_calls": int(len(unclustered))},
            "finetuned_adapters": len(records),
            "promoted_routes": len(routes),
        },
        "quality_floor": report["quality_floor"],
        "clusters": cluster_summaries,
        "unclustered_ids": list(unclustered),
        "paths": {
            "raw_traces": str(store.raw / rawzone.TRACES),
            "quarantine": str(store.raw / rawzone.QUARANTINE),
            "curated_traces": str(store.table("curated_traces")),
            "task_clusters": str(store.table("task_clusters")),
            "adapters": str(store.adapters),
            "predictions": str(store.evaluation / "predictions.parquet"),
        },
    }
    fallback = {"model": config.fallback_model, "base_url": config.fallback_base_url, "api_key_env": "SLM_FALLBACK_API_KEY"}
    version_dir = promote.write_registry_version(store.registry, routes, report, fallback, summary)
    context.log.info(f"registry version {version_dir.name}: {len(routes)} promoted route(s)")
    return dg.MaterializeResult(
        metadata={
            "version": version_dir.name,
            "promoted_routes": len(routes),
            "router_config": dg.MetadataValue.path(str(version_dir / "router.yaml")),
            "summary": dg.MetadataValue.path(str(version_dir / "summary.json")),
        }
    )


@dg.asset_check(asset=router_config, description="Every route of the newest router config points at an adapter that exists.")
def routes_point_at_adapters(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    import yaml

    version_dir = promote.latest_version(pipeline_store.store().registry)
    router = yaml.safe_load((version_dir / "router.yaml").read_text())
    missing = [r["name"] for r in router["routes"] if not (version_dir / r["adapter"] / "adapter_config.json").is_file()]
    return dg.AssetCheckResult(passed=not missing, metadata={"routes": len(router["routes"]), "missing": missing})
