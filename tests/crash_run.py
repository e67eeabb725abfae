"""Materialize some stages of the graph with the crash tests' small settings, in a process of its
own (so that a failpoint's SIGKILL takes only this process):

    python -m tests.crash_run OUTPUT_DIR LANDING_DIR MODEL_CACHE stage[,stage...] [WORK_DIR]

The raw zone's keys come from the environment; SLM_FAILPOINT names where to die.
"""

import os
import sys
from pathlib import Path

import dagster as dg

from assets.definitions import all_assets
from assets.resources import JudgeEndpoint, PipelineStore, RawZoneKeys
from pipeline import rawzone

DAY = "2026-10-01"
# The raw zone's keys of the tests' small runs (one process-wide pair, so that runs compare).
KEYS = rawzone.new_keys()
# Small but complete: two training steps with a checkpoint after the first (a resume point),
# enough held-out calls per cluster for the promotion gate, a floor of 0 so routes are promoted.
# Generative specialists only: their checkpoints are what a killed run resumes from.
SETTINGS = {
    "ops": {
        "slm_candidates": {"config": {"probe_calls": 1, "probe_shots": 1, "probe_max_new_tokens": 8,
                                      "specialist_kinds": ["generative"]}},
        "finetuned_adapters": {"config": {"max_steps": 2, "save_steps": 1, "batch_size": 1, "max_length": 384,
                                          "min_holdout": 8, "max_holdout": 8,
                                          # a snapshot after each step: a resumed run keeps the killed run's first
                                          "generative_curve_calls": 2, "generative_curve_max_new_tokens": 8}},
        "shadow_eval": {"config": {"max_calls_per_cluster": 6, "max_new_tokens_cap": 8, "quality_floor": 0.0,
                                   "arm_calls": 0, "latency_calls": 1}},
        "promotion_decisions": {"config": {"min_holdout": 3}},
    }
}


# The stages in graph order.
SETTINGS_ORDER = [asset.key.path[-1] for asset in all_assets]


def materialize(out: Path | str, landing: Path, model_cache: Path, stages: list[str], keys: dict,
                work_dir: Path | None = None) -> dg.ExecuteInProcessResult:
    """The stages named (in graph order), with `keys` as the raw zone's keys; `out` may be a URL
    on object storage, worked on in `work_dir`."""
    chosen = [a for a in all_assets if a.key.path[-1] in stages]
    run_config = {"ops": {name: section for name, section in SETTINGS["ops"].items() if name in stages}}
    resources = {
        "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(out), model_cache_dir=str(model_cache),
                                        **({"work_dir": str(work_dir)} if work_dir else {})),
        "raw_zone_keys": RawZoneKeys(encryption_key=keys[rawzone.ENCRYPTION_KEY_ENV], pseudonym_key=keys[rawzone.PSEUDONYM_KEY_ENV]),
        "judge_endpoint": JudgeEndpoint(),
    }
    return dg.materialize(chosen, resources=resources, run_config=run_config,
                          partition_key=DAY if "raw_traces" in stages else None, raise_on_error=False)


if __name__ == "__main__":
    out, landing, cache, stages = sys.argv[1:5]
    work_dir = Path(sys.argv[5]) if len(sys.argv) > 5 else None  # with an object-storage URL as OUTPUT_DIR
    keys = {name: os.environ[name] for name in (rawzone.ENCRYPTION_KEY_ENV, rawzone.PSEUDONYM_KEY_ENV)}
    result = materialize(out if "://" in out else Path(out), Path(landing), Path(cache), stages.split(","), keys, work_dir)
    print("run succeeded" if result.success else "run failed")
    sys.exit(0 if result.success else 1)
