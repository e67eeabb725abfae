"""The Kubernetes deployment's configuration (deploy/k8s/): the instance file and the executor
file validate against dagster-k8s's schemas, a typo is named, the code location runs every stage
as a Kubernetes job when SLM_K8S_EXECUTOR names the file, and the Kubernetes Job that dagster-k8s
builds for the fine-tuning step asks for a GPU node while the other stages' do not."""

import os
import subprocess
import sys

import yaml
from dagster._config import process_config  # the schema check Dagster runs on a launcher's config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

from assets.definitions import all_assets
from assets.deployment import k8s_executor_problems
from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
STEPS = {a.key.path[-1] for a in all_assets}
EXECUTOR = yaml.safe_load((K8S / "executor.yaml").read_text())
BUCKET = "s3://slm-convert/prod"


def test_the_instance_file_validates_with_its_k8s_run_launcher(monkeypatch):
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "x")
    config, _ = dagster_instance_config(str(K8S))
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    launcher = config["run_launcher"]["config"]
    assert process_config(K8sRunLauncher.config_type(), launcher).success
    typo = process_config(K8sRunLauncher.config_type(), {**launcher, "job_namspace": "x"})
    assert not typo.success and 'unexpected config entry "job_namspace"' in typo.errors[0].message


def test_the_executor_file_validates_and_a_typo_or_a_local_output_folder_is_named():
    assert k8s_executor_problems(EXECUTOR, STEPS, BUCKET) == []
    problems = k8s_executor_problems({**EXECUTOR, "max_concurent": 1}, STEPS, BUCKET)
    assert len(problems) == 1 and 'unexpected config entry "max_concurent"' in problems[0]
    wrong_step = {**EXECUTOR, "per_step_k8s_config": {"finetune": EXECUTOR["per_step_k8s_config"]["finetuned_adapters"]}}
    assert k8s_executor_problems(wrong_step, STEPS, BUCKET) == [
        f"per_step_k8s_config names steps that do not exist: finetune (steps: {', '.join(sorted(STEPS))})"]
    assert "must be on object storage" in k8s_executor_problems(EXECUTOR, STEPS, "/data/output")[0]


def _code_location(**env) -> subprocess.CompletedProcess:
    script = "from assets.definitions import defs; print(defs.resolve_job_def('slm_conversion').executor_def.name)"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_code_location_runs_each_stage_as_a_kubernetes_job_when_told():
    loaded = _code_location(SLM_K8S_EXECUTOR=str(K8S / "executor.yaml"), SLM_OUTPUT_DIR=BUCKET)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().splitlines()[-1] == "slm_k8s_job_executor"
    refused = _code_location(SLM_K8S_EXECUTOR=str(K8S / "executor.yaml"), SLM_OUTPUT_DIR="/data/output")
    assert refused.returncode != 0 and "the output folder must be on object storage" in refused.stderr


def _step_job(step: str):
    """The Kubernetes Job dagster-k8s builds for one step from the executor file's pod settings."""
    pod = EXECUTOR["per_step_k8s_config"].get(step, EXECUTOR["step_k8s_config"])
    return construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(job_image="registry.example/slm-convert:1", dagster_home="/opt/dagster/home",
                                       instance_config_map="dagster-instance", env_secrets=EXECUTOR["env_secrets"]),
        args=["dagster", "api", "execute_step"], job_name=f"dagster-step-{step.replace('_', '-')}",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(pod),
    )


def test_fine_tuning_and_evaluation_run_on_a_gpu_node_and_the_other_stages_do_not():
    for step in ("finetuned_adapters", "shadow_eval"):
        spec = _step_job(step).spec.template.spec
        assert spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
        assert spec.node_selector == {"nvidia.com/gpu.present": "true"}
        assert spec.tolerations[0].key == "nvidia.com/gpu" and spec.tolerations[0].effect == "NoSchedule"
    for step in STEPS - {"finetuned_adapters", "shadow_eval"}:
        spec = _step_job(step).spec.template.spec
        assert "nvidia.com/gpu" not in (spec.containers[0].resources.limits or {}) and not spec.node_selector
    assert [e.secret_ref.name for e in _step_job("curated_traces").spec.template.spec.containers[0].env_from] == EXECUTOR["env_secrets"]
