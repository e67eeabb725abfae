"""Step 6 and promotion as assets: shadow_eval -> promotion_decisions -> router_config.

Promotion is gated by blocking checks: if any evaluated call was also trained on (on
shadow_eval), or an adapter to be promoted cannot be served or is not the one evaluated (on
promotion_decisions), router_config does not run and the router keeps what it serves.
"""


import base64
import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
from pydantic import Field
import pandas as pd

from assets.data import curated_traces, task_clusters
from assets.models import finetuned_adapters
from assets.metadata import check_result, markdown_table
from assets.resources import JudgeEndpoint, PipelineStore
from pipeline import encoders, evaluate, incontext, promote, rawzone, structured
from pipeline.calls import exclusive_system_prompts, read_instructions
from pipeline.cluster import UNCLUSTERED, cluster_key
from pipeline.store import read_json, read_table, write_bytes, write_json, write_table

GROUP = "promotion"


class ShadowEvalConfig(dg.Config):
    # latest held-out calls a generative SLM answers per cluster (0: all); sized for a CPU demo,
    # configs/gpu.yaml takes all. Encoder specialists answer every held-out call (seconds on a CPU).
    max_calls_per_cluster: int = Field(24, ge=0)
    calibration_share: float = Field(0.5, gt=0, lt=1)  # the earlier part of them, where the threshold is chosen
    batch_size: int = Field(32, ge=1)  # calls answered together; 32 was fastest on the 2-core CPU (bench/README.md)
    max_new_tokens_cap: int = Field(160, ge=1)
    quality_floor: float = Field(0.8, ge=0, le=1)  # mean score vs baseline a cluster must reach to be promoted
    # the calibrated threshold keeps answers whose lower bound at this confidence clears the floor on the
    # calibration calls (promotion's own test, asked of the other split); 0: whose mean does
    threshold_confidence: float = Field(0.95, ge=0, lt=1)
    latency_calls: int = Field(2, ge=0)  # test calls answered one at a time as well, for the batch-1 latency
    arm_calls: int = Field(4, ge=0)  # latest test calls the base model answers too (zero-shot, in-context); 0: none
    # retrieved training calls in the in-context arm's prompt (where the base SLM with retrieved examples
    # is not measured as a kind of its own, in_context in specialist_kinds); 0: no such arm
    shots: int = Field(2, ge=0)
    llm_input_price_per_million_tokens: float = Field(2.0, ge=0)  # USD; the baseline's list price (gpt-4.1)
    llm_output_price_per_million_tokens: float = Field(8.0, ge=0)
    slm_hardware_price_per_hour: float = Field(0.10, ge=0)  # USD per hour of the machine that serves the SLM


def _training_records(store) -> list[dict]:
    """The full training record (with train and held-out ids) of each adapter of the last run."""
    adapters = read_json(store.stats("finetuned_adapters"))
    # each kind's record beside its folder, in the cluster's folder under adapters/
    return [read_json(Path(a["adapter_dir"]).parent / a.get("record_file", "training.json")) for a in adapters]


def _records_by_candidate(store) -> dict[tuple[int, str], dict]:
    """Each training record of the last run by (cluster, kind of specialist)."""
    return {(r["cluster_id"], r.get("kind", encoders.GENERATIVE)): r for r in _training_records(store)}


def _evaluations_by_candidate(store) -> dict[tuple[int, str], dict]:
    """Each shadow-evaluation summary of the last run by (cluster, kind of specialist)."""
    return {(s["cluster_id"], s["kind"]): s for s in read_json(store.evaluation / "shadow_eval.json")["clusters"]}


def _candidate_key(record: dict) -> str:
    """How one kind of specialist measured for a cluster is named in kept evaluations and logs."""
    return f"{cluster_key(record['cluster_id'])}-{record.get('kind', encoders.GENERATIVE)}"


def _adapter_hash(adapter_dir: Path) -> str:
    """One hash over an adapter folder's files: what was evaluated is what gets promoted."""
    return hashlib.sha256(json.dumps(promote.file_hashes(adapter_dir), sort_keys=True).encode()).hexdigest()


# Each cluster's evaluation is kept as soon as it is finished (eval/clusters/), under a
# fingerprint of everything its figures depend on: a run killed halfway (a preempted GPU node)
# or a nightly rerun with the same adapters and calls answers only what changed.
EVALUATION_VERSION = 3  # raise it when what an evaluation computes changes: kept ones are redone


def _evaluation_fingerprint(record: dict, adapter_hash: str, holdout_ids: list[str], config: "ShadowEvalConfig",
                            judge_endpoint: JudgeEndpoint) -> str:
    what = {"version": EVALUATION_VERSION, "candidate": record["candidate"], "adapter": adapter_hash,
            "holdout": list(holdout_ids), "train": sorted(record["train_ids"]), "config": config.model_dump(),
            "judge": [judge_endpoint.base_url, judge_endpoint.model],
            "hardware": evaluate.hardware()}  # latencies are measured on it
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _kept_evaluation(folder: Path, key: str, fingerprint: str) -> tuple[pd.DataFrame, dict] | None:
    """A cluster's kept evaluation with this fingerprint, if there is one."""
    record, table = folder / f"{key}.json", folder / f"{key}.{fingerprint}.parquet"
    if not (record.is_file() and table.is_file()):
        return None
    kept = read_json(record)
    return (read_table(table), kept["summary"]) if kept.get("fingerprint") == fingerprint else None


def _keep_evaluation(folder: Path, key: str, fingerprint: str, scored: pd.DataFrame, summary: dict) -> tuple[pd.DataFrame, dict]:
    """Keep a cluster's evaluation (its answers first, then the record naming them) and return it as
    kept, so that a fresh evaluation and a reused one go on identically."""
    for stale in folder.glob(f"{key}.*.parquet"):
        stale.unlink()
    write_table(folder / f"{key}.{fingerprint}.parquet", scored)
    write_json(folder / f"{key}.json", {"fingerprint": fingerprint, "summary": summary})
    return _kept_evaluation(folder, key, fingerprint)


@dg.asset(group_name=GROUP, deps=[finetuned_adapters], kinds={"pytorch"})
def shadow_eval(context: dg.AssetExecutionContext, config: ShadowEvalConfig, pipeline_store: PipelineStore,
                judge_endpoint: JudgeEndpoint) -> dg.MaterializeResult:
    """Each adapter answers its cluster's latest held-out calls; answers are scored against the
    logged baseline answer and the agent's feedback, a confidence threshold is calibrated on the
    earlier held-out calls and judged on the later ones."""
    store = pipeline_store.store()
    curated = read_table(store.table("curated_traces")).set_index("trace_id", drop=False)
    settings = evaluate.GenerationSettings(config.batch_size, config.max_new_tokens_cap, config.latency_calls,
                                           config.arm_calls, config.shots)
    prices = evaluate.Prices(config.llm_input_price_per_million_tokens, config.llm_output_price_per_million_tokens,
                             config.slm_hardware_price_per_hour)
    kept_folder = store.evaluation / "clusters"
    kept_folder.mkdir(parents=True, exist_ok=True)
    threshold_confidence = config.threshold_confidence or None  # 0: calibrated by the kept answers' mean
    summaries, predictions, kept_names = [], [], set()
    records = _training_records(store)
    # a cluster whose base SLM with retrieved examples is a kind of its own needs no such arm beside its adapter
    in_context = {r["cluster_id"] for r in records if r.get("kind") == encoders.IN_CONTEXT}
    for record in records:
        key = _candidate_key(record)
        kind = record.get("kind", encoders.GENERATIVE)
        every_call = kind in encoders.ENCODER_KINDS or not config.max_calls_per_cluster
        holdout_ids = record["holdout_ids"] if every_call else record["holdout_ids"][-config.max_calls_per_cluster:]
        adapter_hash = _adapter_hash(Path(record["adapter_dir"]))
        fingerprint = _evaluation_fingerprint(record, adapter_hash, holdout_ids, config, judge_endpoint)
        kept = _kept_evaluation(kept_folder, key, fingerprint)
        if kept:
            context.log.info(f"{key}: evaluated before with the same adapter, calls, settings and hardware; kept")
            scored, summary = kept
        else:
            holdout = curated.loc[holdout_ids].reset_index(drop=True)
            context.log.info(f"{key}: answering {len(holdout)} held-out calls ({kind})")
            if kind in encoders.ENCODER_KINDS:
                scored, summary = evaluate.evaluate_specialist(
                    encoders.Specialist(Path(record["adapter_dir"])), holdout, config.quality_floor, settings,
                    config.calibration_share, prices, threshold_confidence=threshold_confidence)
            else:  # a generator: the base SLM with its LoRA adapter, or bare with its example bank
                folder = Path(record["adapter_dir"])
                # the answer budget, and the in-context arm's examples
                train = curated.loc[record["train_ids"]].reset_index(drop=True)
                bank = incontext.ExampleBank.load(folder) if kind == encoders.IN_CONTEXT else None
                model, tokenizer = evaluate.load_adapter_model(Path(record["base_dir"]), None if bank else folder)
                arms = dataclasses.replace(settings, shots=0) if record["cluster_id"] in in_context else settings
                scored, summary = evaluate.evaluate_cluster(
                    model, tokenizer, holdout, train, config.quality_floor, arms, config.calibration_share, prices,
                    progress=lambda m, k=key: context.log.info(f"{k}: {m}"), judge=judge_endpoint.judge(),
                    threshold_confidence=threshold_confidence, answer_format=structured.read_answer_format(folder),
                    instructions=read_instructions(folder), examples=bank,
                )
            scored, summary = _keep_evaluation(kept_folder, key, fingerprint, scored, summary)
            pipeline_store.publish_folder(kept_folder, context.log.info)  # a pod lost later keeps it
        kept_names |= {f"{key}.json", f"{key}.{fingerprint}.parquet"}
        summaries.append({"cluster_id": record["cluster_id"], "label": record["label"], "candidate": record["candidate"],
                          "adapter_hash": adapter_hash, **summary, "kind": kind})
        predictions.append(scored.assign(cluster_id=record["cluster_id"], kind=kind))
    for leftover in kept_folder.iterdir():  # clusters of earlier runs that this run does not have
        if leftover.name not in kept_names:
            leftover.unlink()
    report = {"quality_floor": config.quality_floor, "calibration_share": config.calibration_share, "clusters": summaries}
    scored_all = pd.concat(predictions, ignore_index=True) if predictions else pd.DataFrame()
    write_json(store.evaluation / "shadow_eval.json", report)
    write_table(store.evaluation / "predictions.parquet", scored_all)
    metadata = {
        "clusters_evaluated": len(summaries),
        "scores": markdown_table(
            ["cluster", "kind", "label", "calibration / test calls", "score vs baseline", "exact", "threshold", "coverage",
             "score at threshold", "feedback: baseline / SLM accuracy"],
            [
                [s["cluster_id"], s["kind"], s["label"], f"{s['calibration_calls']} / {s['test_calls']}", f"{s['score_vs_baseline']:.3f}",
                 f"{s['exact_agreement']:.3f}", _rounded(s["confidence_threshold"]), f"{s['coverage_at_threshold']:.2f}",
                 _rounded(s["score_at_threshold"]),
                 f"{s['feedback']['baseline_accuracy']:.2f} / {s['feedback']['slm_accuracy_lower_bound']:.2f} "
                 f"({s['feedback']['calls_with_feedback']} calls)" if s["feedback"] else "no feedback"]
                for s in summaries
            ],
        ),
        "arms": markdown_table(
            ["cluster", "test calls", "base SLM zero-shot", "base SLM in-context", "fine-tuned"],
            [[s["cluster_id"], s["arms"]["calls"], s["arms"]["base_zero_shot"],
              s["arms"].get("base_in_context", "measured as a kind of its own"), s["arms"]["fine_tuned"]]
             for s in summaries if "arms" in s],
        ),
        "cost_and_speed": markdown_table(
            ["cluster", "kind", "SLM p50/p95 ms (batch 1)", f"SLM p50/p95 ms (batch {config.batch_size})", "LLM logged p50/p95 ms",
             "SLM $/1k calls", "LLM $/1k calls", "LLM/SLM cost"],
            [[s["cluster_id"], s["kind"], _p50_p95(c["slm_latency_ms_batch_1"]), _p50_p95(c[f"slm_latency_ms_batch_{config.batch_size}"]),
              _p50_p95(c["llm_logged_latency_ms"]), c["slm_cost_per_1000_calls"], c["llm_cost_per_1000_calls"],
              c["cost_ratio_llm_to_slm"]] for s in summaries for c in [s["cost_and_speed"]]],
        ),
    }
    if len(scored_all):
        png = evaluate.coverage_quality_png(scored_all, {(s["cluster_id"], s["kind"]): s for s in summaries},
                                            {s["cluster_id"]: s["label"] for s in summaries}, config.quality_floor)
        write_bytes(store.evaluation / "coverage_quality.png", png)
        metadata["coverage_quality"] = dg.MetadataValue.md(f"![coverage and quality](data:image/png;base64,{base64.b64encode(png).decode()})")
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(metadata=metadata)


def _p50_p95(latency: dict | None) -> str:
    return "–" if latency is None else f"{latency['p50']:.0f} / {latency['p95']:.0f}"


def _rounded(value) -> str:
    return "–" if value is None else f"{value:.3f}"


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
    return check_result(
        overlap,
        what="held-out calls that a specialist was also trained on",
        next_step="the held-out split and the training records disagree (one of them is stale): materialize "
                  "finetuned_adapters and shadow_eval again (`slm-convert run` does); if it fails again, report these call ids.",
        evaluated=len(evaluated),
    )


class PromotionConfig(dg.Config):
    min_holdout: int = Field(10, ge=1)  # fewer held-out test calls than this are no evidence
    confidence: float = Field(0.95, ge=0.5, lt=1)  # a cluster is promoted when this lower bound of its score clears the floor
    max_lora_rank: int = Field(promote.SERVING_MAX_RANK, ge=1)  # the serving stack's limit (vLLM --max-lora-rank)
    allow_extra_modules: bool = False  # full weights (modules_to_save, lm_head) beside LoRA
    fallback_model: str = "gpt-4.1"  # what the router escalates to
    fallback_base_url: str = "https://api.openai.com/v1"


@dg.asset(group_name=GROUP, deps=[shadow_eval], kinds={"python"})
def promotion_decisions(config: PromotionConfig, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """Per cluster: promoted or stays on the LLM, with the evidence (score on the test calls it
    would answer and its lower confidence bound against the floor). The blocking checks on this
    asset gate the router config."""
    store = pipeline_store.store()
    report = read_json(store.evaluation / "shadow_eval.json")
    records = _records_by_candidate(store)
    decisions = []
    for cluster in read_json(store.stats("task_clusters")):
        cid = cluster["cluster_id"]
        measured = [s for s in report["clusters"] if s["cluster_id"] == cid]  # its candidates, primary kind first
        chosen, decision, reason, candidates = promote.choose_candidate(
            measured, report["quality_floor"], config.min_holdout, config.confidence)
        record = records.get((cid, chosen["kind"])) if chosen else None
        decisions.append({"cluster_id": cid, "decision": decision, "reason": reason,
                          "kind": record.get("kind", encoders.GENERATIVE) if record else None,
                          "adapter_dir": record["adapter_dir"] if record else None,
                          "base_dir": record["base_dir"] if record else None,
                          "candidates": candidates})
    write_json(store.stats("promotion_decisions"), {
        "evidence": {"min_holdout": config.min_holdout, "confidence": config.confidence},
        "serving": {"max_lora_rank": config.max_lora_rank, "allow_extra_modules": config.allow_extra_modules},
        "fallback": {"model": config.fallback_model, "base_url": config.fallback_base_url, "api_key_env": "SLM_FALLBACK_API_KEY"},
        "decisions": decisions,
    })
    promoted = [d for d in decisions if d["decision"] == promote.PROMOTED]
    pipeline_store.publish()
    return dg.MaterializeResult(metadata={
        "promoted": len(promoted),
        "decisions": markdown_table(["cluster", "decision", "reason"],
                                    [[d["cluster_id"], d["decision"], d["reason"]] for d in decisions]),
    })


def _promoted(store) -> tuple[dict, list[dict]]:
    decisions = read_json(store.stats("promotion_decisions"))
    return decisions, [d for d in decisions["decisions"] if d["decision"] == promote.PROMOTED]


@dg.asset_check(asset=promotion_decisions, blocking=True,
                description="Every cluster to be promoted clears the quality floor with the configured confidence on the "
                            "current shadow evaluation (not a stale or edited one).")
def promoted_clusters_clear_the_floor(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    store = pipeline_store.store()
    decisions, promoted = _promoted(store)
    report = read_json(store.evaluation / "shadow_eval.json")
    evaluations = _evaluations_by_candidate(store)
    evidence = decisions["evidence"]
    unproven = [cluster_key(d["cluster_id"]) for d in promoted
                if promote.promotion_decision(evaluations.get((d["cluster_id"], d["kind"])), report["quality_floor"],
                                              evidence["min_holdout"], evidence["confidence"])[0] != promote.PROMOTED]
    return check_result(
        unproven,
        what="clusters to be promoted that the current shadow evaluation does not clear at the floor",
        next_step="the decisions are older than the shadow evaluation, or it was edited: materialize shadow_eval and "
                  "promotion_decisions again (`slm-convert run` does).",
        promoted=len(promoted),
    )


@dg.asset_check(asset=promotion_decisions, blocking=True,
                description="Every adapter to be promoted can be served: PEFT LoRA that loads, trained on the route's base "
                            "model, rank within the serving limit, no full weights unless allowed, chat template present; "
                            "an encoder specialist with its model, tokenizer, labels and the instructions it serves.")
def promoted_adapters_are_servable(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    decisions, promoted = _promoted(pipeline_store.store())
    limits = decisions["serving"]
    problems = {cluster_key(d["cluster_id"]): found for d in promoted
                if (found := promote.specialist_problems(d.get("kind", encoders.GENERATIVE), Path(d["adapter_dir"]),
                                                         d["base_dir"], limits["max_lora_rank"],
                                                         limits["allow_extra_modules"]))}
    return check_result(
        problems,
        what="specialists to be promoted that cannot be served",
        next_step="fix what each problem names: retrain with a LoRA rank within `promotion_decisions.max_lora_rank` "
                  "(or raise that limit to what your server allows), set `allow_extra_modules` if full weights are "
                  "meant, or materialize finetuned_adapters again where files are missing.",
        promoted=len(promoted),
    )


@dg.asset_check(asset=promotion_decisions, blocking=True,
                description="Every adapter to be promoted is byte for byte the one that was shadow-evaluated.")
def promoted_adapters_are_the_evaluated_ones(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    store = pipeline_store.store()
    _, promoted = _promoted(store)
    evaluated = {key: s["adapter_hash"] for key, s in _evaluations_by_candidate(store).items()}
    changed = [cluster_key(d["cluster_id"]) for d in promoted
               if evaluated.get((d["cluster_id"], d["kind"])) != _adapter_hash(Path(d["adapter_dir"]))]
    return check_result(
        changed,
        what="specialists to be promoted whose files changed after shadow evaluation",
        next_step="something wrote to these specialists' folders after they were evaluated: materialize shadow_eval and "
                  "promotion_decisions again (`slm-convert run` does) so that what is promoted is what was measured.",
        promoted=len(promoted),
    )


@dg.asset(group_name=GROUP, deps=[promotion_decisions, curated_traces, task_clusters], kinds={"yaml"})
def router_config(context: dg.AssetExecutionContext, pipeline_store: PipelineStore) -> dg.MaterializeResult:
    """The registry after this run: a new version of each promoted route, router.yaml replaced in
    one rename (routes not promoted this run keep what they serve), and the run's summary."""
    store = pipeline_store.store()
    report = read_json(store.evaluation / "shadow_eval.json")
    evaluations = _evaluations_by_candidate(store)
    records = _records_by_candidate(store)
    decisions_file = read_json(store.stats("promotion_decisions"))
    decisions = {d["cluster_id"]: d for d in decisions_file["decisions"]}
    clusters = read_json(store.stats("task_clusters"))
    choices = {c["cluster_id"]: c for c in read_json(store.stats("slm_candidates"))["choices"]}
    assignments = read_table(store.table("task_clusters"))
    curated = read_table(store.table("curated_traces"))[["trace_id", "messages"]].merge(assignments, on="trace_id")
    system_prompts = exclusive_system_prompts(list(curated["messages"]), list(curated["cluster_id"]))
    run = promote.next_run(store.registry)

    promoted, cluster_summaries = [], []
    for cluster in clusters:
        cid = cluster["cluster_id"]
        decision = decisions[cid]
        # the candidate promotion chose, or (none passing) the cluster's primary kind, reported as such
        kind = decision.get("kind") or choices.get(cid, {}).get("kind")
        record, evaluation = records.get((cid, kind)), evaluations.get((cid, kind))
        if decision["decision"] == promote.PROMOTED:
            route = {"name": cluster_key(cid), "label": cluster["label"], "kind": record.get("kind", encoders.GENERATIVE),
                     "base_model": record["candidate"],
                     "base_model_path": record["base_dir"], "adapter_dir": record["adapter_dir"],
                     "threshold": evaluation["confidence_threshold"], "centroid": cluster["centroid"],
                     "min_similarity": cluster["match_min_similarity"],
                     "match_embedding": cluster.get("match_embedding"), "system_prompts": system_prompts.get(cid, []),
                     "training": record.get("metrics", {}).get("settings"), "run": run}
            promoted.append((route, evaluation))
        training = (record or {}).get("metrics")
        cluster_summaries.append(
            {
                "cluster_id": cid,
                "name": cluster_key(cid),
                "label": cluster["label"],
                "size": cluster["size"],
                "share": cluster["share"],
                "member_ids": list(assignments.loc[assignments["cluster_id"] == cid, "trace_id"]),
                "selection": {k: choices[cid].get(k) for k in ("decision", "kind", "kinds_measured", "candidate", "generator",
                                                                 "reason")},
                "training": {k: v for k, v in training.items() if k != "loss_curve"} if training else None,
                "shadow_eval": evaluation,
                "promotion": {"decision": decision["decision"], "reason": decision["reason"],
                              "candidates": decision.get("candidates", [])},
            }
        )
    router = promote.promote_routes(store.registry, promoted, decisions_file["fallback"], run)
    shares = {cluster_key(c["cluster_id"]): c["share"] for c in clusters}
    routed = promote.routed_share(store.registry, router, shares)
    unclustered = assignments.loc[assignments["cluster_id"] == UNCLUSTERED, "trace_id"]
    summary = {
        "run_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "landing_dir": pipeline_store.landing_dir,
        "output_dir": pipeline_store.output_dir,
        "counts": {
            "raw_traces": read_json(store.stats("raw_traces")),
            "curated_traces": read_json(store.stats("curated_traces")),
            "task_clusters": {"clusters": len(clusters), "unclustered_calls": int(len(unclustered))},
            "finetuned_adapters": len(records),  # every candidate built, of every kind
            "promoted_routes": len(promoted),
            "served_routes": len(router["routes"]),
            "share_of_calls_to_slms": routed,
        },
        "quality_floor": report["quality_floor"],
        "clusters": cluster_summaries,
        "unclustered_ids": list(unclustered),
        "router": {"version": router["version"], "routes": {r["name"]: r["version"] for r in router["routes"]}},
        "serving": promote.vllm_serving_commands(store.registry, router),
        "paths": {
            "raw_traces": str(store.raw / rawzone.TRACES),
            "quarantine": str(store.raw / rawzone.QUARANTINE),
            "curated_traces": str(store.table("curated_traces")),
            "task_clusters": str(store.table("task_clusters")),
            "adapters": str(store.adapters),
            "predictions": str(store.evaluation / "predictions.parquet"),
            "coverage_quality_plot": str(store.evaluation / "coverage_quality.png"),
        },
    }
    plot_path = store.evaluation / "coverage_quality.png"
    plot_png = plot_path.read_bytes() if plot_path.exists() else None
    curves = {f"{cluster_key(r['cluster_id'])} {r.get('kind', encoders.GENERATIVE)}": r["metrics"]["learning_curve"]
              for r in records.values() if r.get("metrics", {}).get("learning_curve")}
    curves_png = evaluate.learning_curves_png(curves, report["quality_floor"]) if curves else None
    run_dir = promote.write_run_report(store.registry, run, report, summary, plot_png, curves_png)
    summary = read_json(run_dir / "summary.json")
    image = f"data:image/png;base64,{base64.b64encode(plot_png).decode()}" if plot_png else None
    context.log.info(f"run {run_dir.name}: {len(promoted)} route(s) promoted, the router serves {len(router['routes'])}")
    pipeline_store.publish(context.log.info)
    return dg.MaterializeResult(
        metadata={
            "run": run_dir.name,
            "promoted_routes": len(promoted),
            "served_routes": len(router["routes"]),
            "share_of_calls_to_slms": routed,
            "router_config_version": router["version"],
            "router_config": dg.MetadataValue.path(str(store.registry / promote.ROUTER_CONFIG)),
            "summary": dg.MetadataValue.path(str(run_dir / "summary.json")),
            "report": dg.MetadataValue.md(promote.run_report_markdown(summary, image)),
            "report_html": dg.MetadataValue.path(str(run_dir / "report.html")),
            "serve_with_vllm": dg.MetadataValue.md(f"```\n{summary['serving']}\n```"),
        }
    )


@dg.asset_check(asset=router_config, description="Every route of the router config points at an adapter (or an encoder "
                                                 "specialist) that exists.")
def routes_point_at_adapters(pipeline_store: PipelineStore) -> dg.AssetCheckResult:
    registry = pipeline_store.store().registry
    router = promote.read_router_config(registry)
    missing = [r["name"] for r in router["routes"]
               if promote.missing_files(r.get("kind", encoders.GENERATIVE), registry / r["adapter"])]
    return dg.AssetCheckResult(passed=not missing, metadata={"routes": len(router["routes"]), "missing": missing})
