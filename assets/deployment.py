"""Where the conversion job's steps run: in the run's own process (the default), or each stage as
a Kubernetes job of its own (dagster-k8s), set by SLM_K8S_EXECUTOR=<executor config file>
(deploy/k8s/executor.yaml). The file is checked when the definitions load, so a typo stops the
code location with the key's path instead of failing the nightly run."""

import os
from pathlib import Path

import dagster as dg
import yaml

from pipeline.remote import is_remote

K8S_EXECUTOR_ENV = "SLM_K8S_EXECUTOR"


def k8s_executor_problems(config: dict, step_keys: set[str], output_dir: str) -> list[str]:
    """What is wrong with a k8s_job_executor config for this graph; empty when it can run."""
    from dagster_k8s import k8s_job_executor

    @dg.op
    def noop():
        pass

    probe = dg.GraphDefinition(name="k8s_executor_check", node_defs=[noop]).to_job(executor_def=k8s_job_executor)
    problems = []
    try:
        dg.validate_run_config(probe, {"execution": {"config": config}})
    except dg.DagsterInvalidConfigError as err:
        problems += [e.message for e in err.errors]
    unknown = sorted(set((config or {}).get("per_step_k8s_config") or {}) - step_keys)
    if unknown:
        problems.append(f"per_step_k8s_config names steps that do not exist: {', '.join(unknown)} "
                        f"(steps: {', '.join(sorted(step_keys))})")
    if not is_remote(output_dir):
        problems.append(f"SLM_OUTPUT_DIR is {output_dir!r}: each stage's pod has a disk of its own, so the output "
                        "folder must be on object storage (e.g. s3://bucket/slm-convert)")
    return problems


def executor_from_env(step_keys: set[str], output_dir: str) -> dg.ExecutorDefinition | None:
    """The k8s_job_executor configured from SLM_K8S_EXECUTOR's file, or None (steps in process)."""
    path = os.environ.get(K8S_EXECUTOR_ENV)
    if not path:
        return None
    from dagster_k8s import k8s_job_executor

    config = yaml.safe_load(Path(path).read_text()) or {}
    problems = k8s_executor_problems(config, step_keys, output_dir)
    if problems:
        raise dg.DagsterInvariantViolationError(f"{K8S_EXECUTOR_ENV}={path}: " + "; ".join(problems))
    return k8s_job_executor.configured(config, name="slm_k8s_job_executor")
