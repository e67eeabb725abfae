"""The code location: the six-step asset graph, its checks, the conversion job and its nightly
schedule, and the collection job that a sensor starts when logs land."""

from __future__ import annotations

import dagster as dg

from assets import data, deployment, models, promotion, sensors
from assets.resources import pipeline_store_from_env, resources_from_env
from pipeline.store import write_owner_only

write_owner_only()  # the processes that load this code location write the pipeline's files

all_assets = [
    data.raw_traces,
    data.curated_traces,
    data.task_clusters,
    models.slm_candidates,
    models.finetuned_adapters,
    promotion.shadow_eval,
    promotion.promotion_decisions,
    promotion.router_config,
]
all_checks = [
    data.quarantined_share_below_limit,
    data.no_known_pii_in_curated_traces,
    data.at_least_one_cluster,
    models.chosen_candidates_available,
    models.adapters_are_complete,
    models.no_known_pii_in_adapters,
    promotion.holdout_never_trained_on,
    promotion.promoted_clusters_clear_the_floor,
    promotion.promoted_adapters_are_servable,
    promotion.promoted_adapters_are_the_evaluated_ones,
    promotion.routes_point_at_adapters,
]

conversion_job = dg.define_asset_job("slm_conversion", selection=dg.AssetSelection.all())

# Each stage's Config class by asset name: `slm-convert run` checks a run config against them
# (value ranges) after Dagster's schema (keys and types).
stage_configs = {
    "raw_traces": data.IngestConfig,
    "curated_traces": data.CurationConfig,
    "task_clusters": data.ClusteringConfig,
    "slm_candidates": models.SelectionConfig,
    "finetuned_adapters": models.FinetuneConfig,
    "shadow_eval": promotion.ShadowEvalConfig,
    "promotion_decisions": promotion.PromotionConfig,
}

# 02:00 UTC every night, after the day's logs have landed, for the newest call day (collection
# takes in every new file whatever the day).
nightly_conversion = dg.build_schedule_from_partitioned_job(conversion_job, name="nightly_conversion", hour_of_day=2)

defs = dg.Definitions(
    # each stage as a Kubernetes job where SLM_K8S_EXECUTOR names an executor config
    executor=deployment.executor_from_env({a.key.path[-1] for a in all_assets},
                                          pipeline_store_from_env(resolve=True).output_dir),
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[conversion_job, sensors.collection_job],
    schedules=[nightly_conversion],
    sensors=[sensors.new_landing_files],
    resources=resources_from_env(),
)
