"""Collection when logs land: a sensor that starts trace collection for new or changed files."""

import hashlib
import json

import dagster as dg

from assets.data import daily_calls, raw_traces
from assets.resources import PipelineStore
from pipeline import ingest

# Collection only: a file landing should not start a fine-tuning run; the nightly schedule
# converts everything collected.
collection_job = dg.define_asset_job("trace_collection", selection=dg.AssetSelection.assets(raw_traces))


@dg.sensor(job=collection_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def new_landing_files(context: dg.SensorEvaluationContext, pipeline_store: PipelineStore):
    """Starts collection when files appear in (or change in) the landing folder.

    The cursor holds each file's size and modification time; the run key is the set of changed
    files, so one change starts one run however often the sensor looks.
    """
    try:
        now = ingest.landing_fingerprints(pipeline_store.landing())
    except FileNotFoundError as err:
        return dg.SkipReason(str(err))
    seen = json.loads(context.cursor) if context.cursor else {}
    changed = sorted(path for path, fingerprint in now.items() if seen.get(path) != fingerprint)
    context.update_cursor(json.dumps(now, sort_keys=True))
    if not changed:
        return dg.SkipReason(f"no new or changed files among {len(now)} in the landing folder")
    run_key = hashlib.sha256(json.dumps({p: now[p] for p in changed}, sort_keys=True).encode()).hexdigest()[:16]
    return dg.RunRequest(
        run_key=run_key,
        partition_key=daily_calls.get_last_partition_key(),
        tags={"slm-convert/changed_files": str(len(changed))},
    )
