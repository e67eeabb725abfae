"""Faults and bad input: a damaged table, a missing model, a full disk and an unreadable landing
file each stop the run with one clear error naming the file and the fix, and nothing downstream
runs on partial data."""

import os
import shutil
import subprocess
import sys

import dagster as dg
import pandas as pd
import pytest

from assets import cli, data, models as model_assets
from assets.resources import REPO_ROOT, PipelineStore, RawZoneKeys
from pipeline import evaluate, ingest, models, rawzone, sources
from pipeline.store import DamagedFileError, Store, read_json, read_table, write_json, write_table
from tests.conftest import LANDING


def _resources(landing, out, keys=None) -> dict:
    keys = keys or {}
    return {
        "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(out), model_cache_dir=str(out / "models")),
        "raw_zone_keys": RawZoneKeys(encryption_key=keys.get(rawzone.ENCRYPTION_KEY_ENV, ""),
                                     pseudonym_key=keys.get(rawzone.PSEUDONYM_KEY_ENV, "")),
    }


def _failure(result, step: str) -> str:
    """The line `slm-convert run` prints for the run's first failed step."""
    reason = cli._failure_reason(result)
    assert reason.startswith(f"step {step}: "), reason
    return reason


def test_a_damaged_table_names_the_file_and_the_fix_and_nothing_downstream_runs(tmp_path):
    store = Store(tmp_path / "out")
    write_table(store.table("curated_traces"), pd.DataFrame({"trace_id": [f"t{i}" for i in range(500)], "messages": ["[]"] * 500}))
    path = store.table("curated_traces")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    with pytest.raises(DamagedFileError, match="is damaged and cannot be read"):
        read_table(path)

    result = dg.materialize([data.task_clusters, model_assets.slm_candidates], resources=_resources(tmp_path, store.root),
                            raise_on_error=False)
    assert not result.success
    message = _failure(result, "task_clusters")
    assert f"{path} is damaged and cannot be read" in message and "delete it and run again" in message
    # the stage after it never started, so nothing was written from partial data
    assert not any(e.step_key == "slm_candidates" and e.is_step_start for e in result.all_events)
    assert not result.get_asset_materialization_events()
    assert not store.table("task_clusters").exists() and not store.stats("slm_candidates").exists()

    stats = store.stats("task_clusters")
    write_json(stats, [{"cluster_id": 0}])
    stats.write_text(stats.read_text()[:-4])
    with pytest.raises(DamagedFileError, match=f"{stats} is damaged"):
        read_json(stats)


def test_a_missing_model_is_named_with_the_fix_before_transformers_is_asked(tmp_path, base_model_dir):
    gone = tmp_path / "cache" / "smollm2-135m-instruct"
    with pytest.raises(models.ModelUnavailable, match=f"base model {gone} is missing the folder: run `slm-convert prepare-models`"):
        evaluate.load_adapter_model(gone, None)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(base_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(models.ModelUnavailable, match="is missing its weights"):
        evaluate.load_adapter_model(no_weights, None)
    with pytest.raises(models.ModelUnavailable, match="adapter .* is missing the folder: materialize finetuned_adapters again"):
        evaluate.load_adapter_model(base_model_dir, tmp_path / "adapters" / "cluster-0")


def test_an_unreadable_landing_file_stops_collection_before_anything_is_stored(one_day_landing, tmp_path, monkeypatch, capsys):
    shutil.copy(LANDING / "traces-2026-10-02.jsonl", one_day_landing)
    locked = one_day_landing / "traces-2026-10-02.jsonl"
    real_open = open

    def open_as_another_user(path, *args, **kwargs):
        if str(path) == str(locked):  # what a file of mode 0600 owned by the agent's user gives
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources, "open", open_as_another_user, raising=False)
    keys = rawzone.new_keys()
    out = tmp_path / "out"
    result = dg.materialize([data.raw_traces], resources=_resources(one_day_landing, out, keys), partition_key="2026-10-01",
                            raise_on_error=False)
    assert not result.success
    message = _failure(result, "raw_traces")
    assert f"cannot read landing file {locked} (Permission denied): give the pipeline's user read access" in message
    assert rawzone.part_files(out / "raw", rawzone.TRACES) == []
    # the command line says the same in one line, before Dagster starts
    monkeypatch.setenv("SLM_LANDING_DIR", str(one_day_landing))
    monkeypatch.setenv("SLM_OUTPUT_DIR", str(out))
    capsys.readouterr()
    assert cli.main(["run"]) == 2
    assert capsys.readouterr().err.startswith(f"slm-convert: [Errno 13] cannot read landing file {locked}")

    # with the file readable again, the next run takes both files: nothing was recorded as read
    monkeypatch.undo()
    result = dg.materialize([data.raw_traces], resources=_resources(one_day_landing, out, keys), partition_key="2026-10-01")
    stored = ingest.stored_traces(out / "raw", keys[rawzone.ENCRYPTION_KEY_ENV])
    assert len(stored) == len(ingest.read_calls(ingest.find_landing_files(one_day_landing)).traces)


# A filesystem of a few hundred KB in a private mount namespace: a real ENOSPC, no root needed.
FULL_DISK_SCRIPT = """
set -e
mount -t tmpfs -o size=200k tmpfs "$SLM_OUTPUT_DIR"
"$PYTHON" -m assets.cli run > "$RUN_LOG" 2>&1 && exit 1 || echo "run exit: $?"
tail -n 1 "$RUN_LOG"
echo "parts published: $(find "$SLM_OUTPUT_DIR" -name 'part-*' ! -path '*_staging*' | wc -l)"
echo "curated table: $(ls "$SLM_OUTPUT_DIR/store" 2>/dev/null | wc -l)"
# the same output folder with room: the next run takes everything, once
mount -o remount,size=16m "$SLM_OUTPUT_DIR"
"$PYTHON" -c '
import os
from pathlib import Path
from pipeline import ingest
out = Path(os.environ["SLM_OUTPUT_DIR"])
ingest.collect(Path(os.environ["SLM_LANDING_DIR"]), out / "raw", ingest.IngestOptions(pseudonym_key=os.environ["SLM_PSEUDONYM_KEY"]),
               os.environ["SLM_RAW_ENCRYPTION_KEY"], 30)
print("calls stored:", len(ingest.stored_traces(out / "raw", os.environ["SLM_RAW_ENCRYPTION_KEY"])))
'
"""


def test_a_full_disk_stops_the_run_with_one_clear_line_and_the_next_run_takes_everything(one_day_landing, tmp_path):
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("this kernel allows no private mount namespace (unshare -rm)")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, **rawzone.new_keys(), "PYTHON": sys.executable, "SLM_OUTPUT_DIR": str(out),
           "SLM_LANDING_DIR": str(one_day_landing), "DAGSTER_HOME": str(tmp_path / "dagster_home"),
           "RUN_LOG": str(tmp_path / "run.log")}  # the run's own log, kept out of the checkout
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", FULL_DISK_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "run exit: 1"
    assert lines[1].startswith("The run failed: step raw_traces: [Errno 28] no space left on the device writing ")
    assert "free space, or point SLM_OUTPUT_DIR at a larger disk, and run again" in lines[1]
    assert lines[2:4] == ["parts published: 0", "curated table: 0"]  # nothing half-stored, nothing downstream
    expected = len(ingest.read_calls(ingest.find_landing_files(one_day_landing)).traces)
    assert lines[4] == f"calls stored: {expected}"
