"""The whole asset graph through Dagster: materialization, checks, rerun, registry versions."""

import json

import dagster as dg
import pytest
import yaml

from assets import data, sensors
from assets.definitions import all_assets, all_checks, defs
from assets.resources import PipelineStore, RawZoneKeys
from pipeline import rawzone
from tests import score_run

DAY = "2026-10-01"  # the day of the one-day landing folder: runs are filed under a call day
ASSET_NAMES = {"raw_traces", "curated_traces", "task_clusters", "slm_candidates", "finetuned_adapters", "shadow_eval", "router_config"}

# Tiny settings: the point here is the wiring, not the quality of a one-step adapter.
QUICK = {
    "ops": {
        "slm_candidates": {"config": {"probe_calls": 2, "probe_shots": 1, "probe_max_new_tokens": 8}},
        "finetuned_adapters": {"config": {"max_steps": 1, "batch_size": 2, "max_length": 512, "min_holdout": 4, "max_holdout": 4}},
        "shadow_eval": {"config": {"max_calls_per_cluster": 4, "max_new_tokens_cap": 24, "quality_floor": 0.0}},
        "router_config": {"config": {"min_holdout": 4}},
    }
}


def _resources(landing, tmp_path, base_model_dir) -> dict:
    keys = rawzone.new_keys()
    return {
        "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(tmp_path / "out"), model_cache_dir=str(base_model_dir.parent)),
        "raw_zone_keys": RawZoneKeys(encryption_key=keys[rawzone.ENCRYPTION_KEY_ENV], pseudonym_key=keys[rawzone.PSEUDONYM_KEY_ENV]),
    }


def test_definitions_load_with_every_stage_a_check_and_a_nightly_schedule():
    graph = defs.resolve_asset_graph()
    assert {k.path[-1] for k in graph.get_all_asset_keys()} == ASSET_NAMES
    checked = {c.asset_key.path[-1] for check in all_checks for c in check.check_specs}
    assert checked == ASSET_NAMES
    assert defs.resolve_schedule_def("nightly_conversion").cron_schedule == "0 2 * * *"
    assert defs.resolve_job_def("slm_conversion").partitions_def == data.daily_calls
    assert defs.resolve_sensor_def("new_landing_files").job_name == "trace_collection"


def test_sensor_starts_collection_once_per_new_or_changed_landing_file(one_day_landing, tmp_path):
    resources = {"pipeline_store": PipelineStore(landing_dir=str(one_day_landing), output_dir=str(tmp_path), model_cache_dir=str(tmp_path))}
    context = dg.build_sensor_context(resources=resources)
    first = sensors.new_landing_files(context)
    assert isinstance(first, dg.RunRequest) and first.partition_key == data.daily_calls.get_last_partition_key()
    cursor = json.loads(context.cursor)
    assert list(cursor) == [str(one_day_landing / "traces-2026-10-01.jsonl")]

    quiet = sensors.new_landing_files(dg.build_sensor_context(resources=resources, cursor=json.dumps(cursor)))
    assert isinstance(quiet, dg.SkipReason) and "no new or changed files among 1" in quiet.skip_message

    (one_day_landing / "batch_output.jsonl").write_text("{}\n")
    new = sensors.new_landing_files(dg.build_sensor_context(resources=resources, cursor=json.dumps(cursor)))
    assert isinstance(new, dg.RunRequest) and new.run_key != first.run_key
    assert new.tags["slm-convert/changed_files"] == "1"

    gone = sensors.new_landing_files(dg.build_sensor_context(resources={"pipeline_store": PipelineStore(
        landing_dir=str(tmp_path / "missing"), output_dir=str(tmp_path), model_cache_dir=str(tmp_path))}))
    assert isinstance(gone, dg.SkipReason) and "does not exist" in gone.skip_message


@pytest.mark.slow
def test_whole_graph_materializes_on_a_day_of_logs_and_reruns_without_retraining(one_day_landing, tmp_path, base_model_dir):
    resources = _resources(one_day_landing, tmp_path, base_model_dir)
    result = dg.materialize([*all_assets, *all_checks], resources=resources, run_config=QUICK, partition_key=DAY)
    assert result.success
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == ASSET_NAMES
    checks = result.get_asset_check_evaluations()
    assert len(checks) == len(all_checks) and all(c.passed for c in checks)

    out = tmp_path / "out"
    version = (out / "registry" / "LATEST").read_text().strip()
    assert version == "v0001"
    summary = json.loads((out / "registry" / version / "summary.json").read_text())
    router = yaml.safe_load((out / "registry" / version / "router.yaml").read_text())
    trained = [c for c in summary["clusters"] if c["selection"]["decision"] == "fine-tune"]
    assert len(trained) >= 2
    # with a quality floor of 0 every evaluated cluster is promoted: the promotion path runs
    assert len(router["routes"]) == len(trained) == summary["counts"]["promoted_routes"]
    for route in router["routes"]:
        assert (out / "registry" / version / route["adapter"] / "adapter_model.safetensors").is_file()
        assert 0 <= route["confidence_threshold"] <= 1
    for card in (out / "adapters").glob("*/adapter/README.md"):  # each adapter's model card, ours not PEFT's template
        assert "base_model: smollm2-135m-instruct" in card.read_text() and "More Information Needed" not in card.read_text()
    assert len(list((out / "adapters").glob("*/adapter/README.md"))) == len(trained)
    members = [i for c in summary["clusters"] for i in c["member_ids"]] + summary["unclustered_ids"]
    assert len(members) == len(set(members)) == summary["counts"]["curated_traces"]["curated"]
    assert summary["paths"]["router_config"] == str(out / "registry" / version / "router.yaml")
    # nothing written after scrubbing (tables, predictions, registry files) holds a canary
    assert score_run.score(out)["canaries_left_after_scrubbing"] == 0

    # Same data and settings: a rerun writes a new version but trains nothing again.
    records = sorted((out / "adapters").glob("*/training.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    assert dg.materialize([*all_assets, *all_checks], resources=resources, run_config=QUICK, partition_key=DAY).success
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert (out / "registry" / "LATEST").read_text().strip() == "v0002"


@pytest.mark.slow
def test_pii_check_blocks_everything_downstream(one_day_landing, tmp_path, base_model_dir):
    result = dg.materialize(
        [data.raw_traces, data.curated_traces, data.task_clusters, data.no_known_pii_in_curated_traces],
        resources=_resources(one_day_landing, tmp_path, base_model_dir),
        # scrub names only: e-mails, phone numbers, cards and keys stay in
        run_config={"ops": {"curated_traces": {"config": {"entities": ["PERSON"]}}}},
        partition_key=DAY,
        raise_on_error=False,
    )
    check = next(c for c in result.get_asset_check_evaluations() if c.check_name == "no_known_pii_in_curated_traces")
    assert not check.passed
    assert check.metadata["texts_with_leaks"].value["email address"] > 0
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert "task_clusters" not in materialized
