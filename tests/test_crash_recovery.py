"""Kill the run (SIGKILL) in the middle of each stage in turn, then materialize the stage again:
what it leaves is the same as an uninterrupted run's, with no duplicate or missing record, and no
half-written file is ever visible.

Each test starts from a copy of one uninterrupted run's output folder (conftest's small run) with
the stage's own outputs removed (the stage's first materialization), runs the stage in a process of its own that a
failpoint (pipeline/failpoints.py) kills in the middle, checks what is visible, runs the stage
again and compares its outputs with the uninterrupted run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.numpy import load_file

from pipeline import failpoints, ingest, rawzone
from pipeline.ledger import Ledger
from pipeline.store import Store, read_table
from tests import crash_run
from tests.conftest import REPO

pytestmark = pytest.mark.slow

KEYS = crash_run.KEYS  # the uninterrupted run's keys

# stage -> (where it dies, what of its outputs is removed so that it runs as the first time)
STAGES = {
    "raw_traces": ("raw_traces:committed", ["raw"]),
    "curated_traces": ("before-rename:curation_removed.parquet",
                       ["store/curated_traces.parquet", "store/curation_removed.parquet", "store/curated_traces.json",
                        "store/scrub_findings.sqlite"]),
    "task_clusters": ("before-rename:task_clusters.parquet",
                      ["store/task_clusters.parquet", "store/task_clusters.json", "store/cluster_identities.json",
                       "store/task_clusters_map.png", "store/task_clusters.md"]),
    "slm_candidates": ("before-rename:slm_candidates.json", ["store/slm_candidates.json", "store/probe_results.json"]),
    "finetuned_adapters": ("finetune:checkpoint-saved", ["adapters", "store/finetuned_adapters.json"]),
    # between clusters: the first one's evaluation is kept, the second one's record not yet written
    "shadow_eval": ("before-rename:cluster-2-generative.json", ["eval"]),
    "promotion_decisions": ("before-rename:promotion_decisions.json", ["store/promotion_decisions.json"]),
    "router_config": ("before-rename:router.yaml", ["registry"]),
}


@pytest.fixture(scope="module")
def uninterrupted(small_run_on_s3) -> dict:
    """The uninterrupted run: conftest's small run of the whole graph (stage by stage, its output
    on object storage), as a local folder."""
    return {"out": small_run_on_s3["reference"], "landing": small_run_on_s3["landing"], "cache": small_run_on_s3["cache"]}


# Fine-tuning killed after a checkpoint is tested on object storage, where the rerun runs on
# another machine's fresh copy (tests/test_object_storage.py): the same resume, and more.
@pytest.mark.parametrize("stage", [s for s in STAGES if s != "finetuned_adapters"])
def test_a_run_killed_in_the_middle_of_a_stage_ends_as_an_uninterrupted_one(stage, uninterrupted, tmp_path):
    failpoint, own_outputs = STAGES[stage]
    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    for name in own_outputs:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    args = [str(out), str(uninterrupted["landing"]), str(uninterrupted["cache"])]

    killed = subprocess.run([sys.executable, "-m", "tests.crash_run", *args, stage], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **KEYS, failpoints.ENV: failpoint}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    _assert_every_visible_file_is_whole(out)
    finished = {p: p.stat().st_mtime_ns for p in (out / "eval" / "clusters").glob("cluster-1-generative.*")} if stage == "shadow_eval" else {}

    rerun = crash_run.materialize(out, uninterrupted["landing"], uninterrupted["cache"], [stage], KEYS)
    assert rerun.success
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]  # leftovers swept
    if stage == "shadow_eval":  # the cluster finished before the kill (answers, record) is kept, not answered again
        assert len(finished) == 2 and all(p.stat().st_mtime_ns == stamp for p, stamp in finished.items())
    SAME_AS_UNINTERRUPTED[stage](Store(out), Store(uninterrupted["out"]))


def _assert_every_visible_file_is_whole(out: Path) -> None:
    """Every file a reader would open (no dot-file, outside staging folders) reads completely."""
    for path in out.rglob("*"):
        hidden = any(part.startswith((".", "_staging")) or part.endswith(".partial") for part in path.relative_to(out).parts)
        if hidden or not path.is_file():
            continue
        if path.suffix == ".parquet":
            read_table(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.name.endswith(".parquet.enc"):
            rawzone.read_part(path, KEYS[rawzone.ENCRYPTION_KEY_ENV])
        elif path.suffix == ".safetensors":
            load_file(path)


# ---------------------------------------------------------------------------------------------
# What "the same" means per stage: equal tables and records; timings aside.

# Keys that hold when or how fast something ran (and the costs priced from measured time): they
# differ between any two runs.
TIMING_WORDS = ("seconds", "latency", "tokens_per_s", "_ms", "mfu", "runtime", "per_second", "wall", "slm_cost", "_ratio")
# What a resumed run reports about itself (the steps and tokens it ran itself, what it reused),
# and where each run's folder is.
BOOKKEEPING = ("resumed_from_step", "tokens", "timed_steps", "texts_reused_from_earlier_runs")


def _is_timing(key: str) -> bool:
    key = key.lower()
    return (key == "at" or key.endswith(("_at", "_dir")) or key in BOOKKEEPING
            or any(word in key for word in TIMING_WORDS))


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not _is_timing(k)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _same_json(path: Path, reference: Path) -> None:
    ours, theirs = _without_timings(json.loads(path.read_text())), _without_timings(json.loads(reference.read_text()))
    if ours != theirs:
        differing = [f"{k}: {_first_difference(ours[k], theirs.get(k))}" for k in ours if ours[k] != theirs.get(k)] \
            if isinstance(ours, dict) else [_first_difference(ours, theirs)]
        raise AssertionError(f"{path.name} differs: {differing}")


def _first_difference(ours, theirs, where=""):
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in ours.keys() | theirs.keys():
            if ours.get(key) != theirs.get(key):
                return _first_difference(ours.get(key), theirs.get(key), f"{where}.{key}")
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where}: {str(ours)[:200]} != {str(theirs)[:200]}"


def _same_table(path: Path, reference: Path) -> None:
    ours, theirs = read_table(path), read_table(reference)
    keep = [c for c in theirs.columns if not _is_timing(c)]
    pd.testing.assert_frame_equal(ours[keep], theirs[keep], check_dtype=False)


def _same_raw(store: Store, reference: Store) -> None:
    key = KEYS[rawzone.ENCRYPTION_KEY_ENV]
    stored = ingest.stored_traces(store.raw, key).drop(columns="ingested_at")
    assert stored["trace_id"].is_unique  # published once, by the run after the crash
    pd.testing.assert_frame_equal(stored, ingest.stored_traces(reference.raw, key).drop(columns="ingested_at"))
    assert sum(Ledger(store.raw / "ledger.sqlite").calls_by_day().values()) == len(stored)
    assert not any((store.raw / rawzone.STAGING).iterdir())


def _same_curated(store: Store, reference: Store) -> None:
    for name in ("curated_traces", "curation_removed"):
        _same_table(store.table(name), reference.table(name))
    _same_json(store.stats("curated_traces"), reference.stats("curated_traces"))


def _same_clusters(store: Store, reference: Store) -> None:
    _same_table(store.table("task_clusters"), reference.table("task_clusters"))
    _same_json(store.stats("task_clusters"), reference.stats("task_clusters"))


def _same_candidates(store: Store, reference: Store) -> None:
    _same_json(store.stats("slm_candidates"), reference.stats("slm_candidates"))


def _same_adapters(store: Store, reference: Store) -> None:
    ours = sorted(p.relative_to(store.adapters) for p in store.adapters.glob("*/adapter/adapter_model.safetensors"))
    assert ours and ours == sorted(p.relative_to(reference.adapters) for p in reference.adapters.glob("*/adapter/adapter_model.safetensors"))
    for adapter in ours:
        weights, expected = load_file(store.adapters / adapter), load_file(reference.adapters / adapter)
        assert weights.keys() == expected.keys()
        for name in weights:  # resumed from its checkpoint, the training ends where it would have
            assert abs(weights[name] - expected[name]).max() <= 1e-6, name
        _same_json(store.adapters / adapter.parent.parent / "training.json", reference.adapters / adapter.parent.parent / "training.json")


def _same_evaluation(store: Store, reference: Store) -> None:
    _same_table(store.evaluation / "predictions.parquet", reference.evaluation / "predictions.parquet")
    _same_json(store.evaluation / "shadow_eval.json", reference.evaluation / "shadow_eval.json")


def _same_decisions(store: Store, reference: Store) -> None:
    _same_json(store.stats("promotion_decisions"), reference.stats("promotion_decisions"))


def _same_routes(store: Store, reference: Store) -> None:
    def served(registry: Path) -> list[dict]:
        router = yaml.safe_load((registry / "router.yaml").read_text())
        routes = []
        for route in router["routes"]:
            hashes = json.loads((registry / route["name"] / route["version"] / "hashes.json").read_text())
            routes.append({**{k: v for k, v in route.items() if k not in ("version", "adapter")},
                           "adapter_files": {k: v for k, v in hashes.items() if k.startswith("adapter/")}})
        return routes

    assert served(store.registry) and served(store.registry) == served(reference.registry)
    versions = [p.name for p in store.registry.glob("*/v[0-9]*")]
    assert len(versions) == len(set((p.parent.name, p.name) for p in store.registry.glob("*/v[0-9]*")))


SAME_AS_UNINTERRUPTED = {
    "raw_traces": _same_raw,
    "curated_traces": _same_curated,
    "task_clusters": _same_clusters,
    "slm_candidates": _same_candidates,
    "finetuned_adapters": _same_adapters,
    "shadow_eval": _same_evaluation,
    "promotion_decisions": _same_decisions,
    "router_config": _same_routes,
}
