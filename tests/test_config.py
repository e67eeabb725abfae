"""Configs are checked before anything runs: unknown keys, wrong types and values out of range
are refused, each named by its key's path, all at once."""

import subprocess
import sys

import pytest
import yaml

from assets import run_config
from assets.definitions import all_assets, defs, stage_configs
from assets.resources import REPO_ROOT
from pipeline import models

JOB = defs.resolve_job_def("slm_conversion")


def _problems(config: dict) -> list[str]:
    return run_config.problems(JOB, config, stage_configs)


def test_every_stage_with_settings_has_its_config_class_listed():
    with_config = {
        asset.key.path[-1]: set(asset.op.config_schema.config_type.fields)
        for asset in all_assets
        if hasattr(asset.op.config_schema.config_type, "fields")
    }
    assert {name: set(cls.model_fields) for name, cls in stage_configs.items()} == with_config


def test_the_shipped_configs_are_valid():
    assert _problems({}) == []
    # every run config in configs/ (the others there are candidates and a Dagster instance)
    run_configs = {path.name: config for path in sorted((REPO_ROOT / "configs").glob("*.yaml"))
                   if "ops" in (config := yaml.safe_load(path.read_text()))}
    assert {"gpu.yaml", "cpu-long.yaml"} <= set(run_configs)
    for name, config in run_configs.items():
        assert _problems(config) == [], name


def test_typos_wrong_types_and_out_of_range_values_are_all_named_by_path():
    found = _problems({"ops": {
        "promotion_decision": {"config": {}},
        "finetuned_adapters": {"config": {"max_step": 200, "batch_size": "eight", "quantization": "8bit"}},
        "shadow_eval": {"config": {"quality_floor": 1.5, "calibration_share": 0}},
        "raw_traces": {"config": {"raw_retention_days": -1}},
    }})
    assert sorted(found) == sorted([
        "ops: unknown key 'promotion_decision' (did you mean 'promotion_decisions'?)",
        "ops.finetuned_adapters.config: unknown key 'max_step' (did you mean 'max_steps'?)",
        'ops.finetuned_adapters.config.batch_size: Invalid scalar. Value "eight" of type "<class \'str\'>" is not valid for expected type "Int".',
        "ops.finetuned_adapters.config.quantization: Value not in enum type Literal['none', '4bit'] got 8bit",
        "ops.shadow_eval.config.quality_floor: Input should be less than or equal to 1 (got 1.5)",
        "ops.shadow_eval.config.calibration_share: Input should be greater than 0 (got 0)",
        "ops.raw_traces.config.raw_retention_days: Input should be greater than or equal to 0 (got -1)",
    ])


def test_settings_that_contradict_each_other_are_refused():
    found = _problems({"ops": {"finetuned_adapters": {"config": {"min_holdout": 50, "max_holdout": 20}}}})
    assert len(found) == 1 and "max_holdout (20) is below min_holdout (50)" in found[0]


def test_the_cli_refuses_a_bad_config_before_anything_runs(tmp_path):
    bad = tmp_path / "nightly.yaml"
    bad.write_text("ops:\n  task_clusters:\n    config:\n      min_cluster_sise: 20\n      signature: words\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("ops:\n  shadow_eval: [1,\n")
    env = {"SLM_OUTPUT_DIR": str(tmp_path / "out"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    for config, expected in [
        (bad, ["has 2 problem(s)", "ops.task_clusters.config: unknown key 'min_cluster_sise' (did you mean 'min_cluster_size'?)",
               "ops.task_clusters.config.signature: Value not in enum type"]),
        (broken, [f"run config {broken} is not valid YAML", 'line 3, column 1']),
        (tmp_path / "missing.yaml", ["missing.yaml does not exist"]),
    ]:
        done = subprocess.run([sys.executable, "-m", "assets.cli", "run", "--config", str(config)], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("slm-convert: run config "), done.stderr  # the refusal alone, no warnings before it
        for text in expected:
            assert text in done.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_candidate_list_with_bad_entries_is_refused_with_every_key_named():
    with pytest.raises(ValueError) as refused:
        models.load_candidates_from_dicts(
            [{"name": "tiny", "source": "hubb", "params_millions": "135", "context_length": -1, "licence": "MIT", "size": 1},
             {"name": "other", "licence": "MIT", "source": "local", "params_millions": 1}],
            source="my-candidates.yaml",
        )
    assert str(refused.value).splitlines() == [
        "my-candidates.yaml has 5 problem(s):",
        "  candidates[0].source: Input should be 'bundled-gguf', 'hub' or 'local' (got 'hubb')",
        "  candidates[0].params_millions: Input should be a valid integer (got '135')",
        "  candidates[0].context_length: Input should be greater than 0 (got -1)",
        "  candidates[0].size: unknown key (got 1)",
        "  candidates[1].context_length: Field required",
    ]
    with pytest.raises(ValueError, match="names must be unique; repeated: tiny"):
        entry = {"name": "tiny", "source": "local", "params_millions": 1, "context_length": 8, "licence": "MIT"}
        models.load_candidates_from_dicts([entry, entry])
    assert len(models.load_candidates(REPO_ROOT / "configs" / "candidates.yaml")) == 9
