"""The code location: the six-step asset graph, its checks, one job and its nightly schedule."""

from __future__ import annotations

import dagster as dg

from assets import data, models, promotion
from assets.resources import resources_from_env

all_assets = [
    data.raw_traces,
    data.curated_traces,
    data.task_clusters,
    models.slm_candidates,
    models.finetuned_adapters,
    promotion.shadow_eval,
    promotion.router_config,
]
all_checks = [
    data.quarantined_share_below_limit,
    data.no_known_pii_in_curated_traces,
    data.at_least_one_cluster,
    models.chosen_candidates_available,
    models.adapters_are_complete,
    promotion.holdout_never_trained_on,
    promotion.routes_point_at_adapters,
]

conversion_job = dg.define_asset_job("slm_conversion", selection=dg.AssetSelection.all())

nightly_conversion = dg.ScheduleDefinition(
    name="nightly_conversion",
    job=conversion_job,
    cron_schedule="0 2 * * *",  # 02:00 every night, after the day's logs have landed
    execution_timezone="UTC",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[conversion_job],
    schedules=[nightly_conversion],
    resources=resources_from_env(),
)
