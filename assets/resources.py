"""Where the pipeline reads and writes, and the keys of the raw zone."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import dagster as dg
from pydantic import PrivateAttr

from pipeline import rawzone
from pipeline.judge import Judge
from pipeline.remote import Mirror, is_remote, local_copy
from pipeline.store import Store, exclusive

REPO_ROOT = Path(__file__).resolve().parents[1]


class PipelineStore(dg.ConfigurableResource):
    """The landing folder of the agent's logs, the output folder, and the model cache.

    The output folder may be a local path or an fsspec URL on object storage (s3://bucket/prefix
    ...); then the stages work on a local copy under `work_dir` that each run pulls when it
    starts and each stage pushes before it reports success (pipeline/remote.py).

    A run holds the output folder alone while it runs (each step alone, where steps run in
    processes of their own): a backfill started while the nightly run works waits for it, and the
    wait is logged with the run that holds the folder. Sensors only look at the landing folder
    and take no lock.
    """

    landing_dir: str
    output_dir: str
    model_cache_dir: str
    work_dir: str = str(REPO_ROOT / ".cache" / "work")  # local copies of output folders on object storage
    _held: ExitStack | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.dagster_run is None:  # a sensor's evaluation, not a run
            return
        self._held = ExitStack()
        holder = f"run {context.dagster_run.run_id} ({context.dagster_run.job_name})"
        self._held.enter_context(exclusive(self.output_path(), holder, context.log.info))
        mirror = self.mirror()
        if mirror:
            mirror.pull(context.log.info)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def output_path(self) -> Path:
        """Where the stages read and write: the output folder, or its local copy."""
        if not is_remote(self.output_dir):
            return Path(self.output_dir)
        return local_copy(self.output_dir, Path(self.work_dir))

    def mirror(self) -> Mirror | None:
        return Mirror(self.output_dir, self.output_path()) if is_remote(self.output_dir) else None

    def publish(self, log=print) -> None:
        """Make what a stage wrote visible beyond this machine (object storage); a no-op for a
        local output folder. Every asset calls it last, so a failed upload fails the stage."""
        mirror = self.mirror()
        if mirror:
            mirror.push(log)

    def publish_folder(self, folder: Path, log=print) -> None:
        """Upload one folder of the output now, mid-stage (a training checkpoint as soon as it is
        saved); a no-op for a local output folder."""
        mirror = self.mirror()
        if mirror:
            mirror.push(log, folder=Path(folder).relative_to(mirror.local).as_posix())

    def store(self) -> Store:
        return Store(self.output_path())

    def landing(self) -> Path:
        return Path(self.landing_dir)

    def model_cache(self) -> Path:
        return Path(self.model_cache_dir)


# Each location is one environment variable, with a default inside the repository.
LOCATIONS = {
    "landing_dir": ("SLM_LANDING_DIR", REPO_ROOT / "data" / "landing"),
    "output_dir": ("SLM_OUTPUT_DIR", REPO_ROOT / "output"),
    "model_cache_dir": ("SLM_MODEL_CACHE", REPO_ROOT / ".cache" / "models"),
    "work_dir": ("SLM_WORK_DIR", REPO_ROOT / ".cache" / "work"),
}


def _from_env(env_var: str, default: str, resolve: bool) -> str | dg.EnvVar:
    """A set variable stays an `EnvVar` (read at run time, shown as such in the Dagster UI)
    unless `resolve` asks for its current value; an unset one gives the default."""
    if not os.environ.get(env_var):
        return default
    return os.environ[env_var] if resolve else dg.EnvVar(env_var)


def pipeline_store_from_env(resolve: bool = False) -> PipelineStore:
    return PipelineStore(
        **{field: _from_env(env_var, str(default), resolve) for field, (env_var, default) in LOCATIONS.items()}
    )


class RawZoneKeys(dg.ConfigurableResource):
    """Keys for the raw zone, from SLM_RAW_ENCRYPTION_KEY and SLM_PSEUDONYM_KEY.

    `make setup` writes a fresh pair to .cache/keys.env for the demo; in production they come
    from your secret store. Empty means not set.
    """

    encryption_key: str = ""
    pseudonym_key: str = ""


def raw_zone_keys_from_env(resolve: bool = False) -> RawZoneKeys:
    return RawZoneKeys(
        encryption_key=_from_env(rawzone.ENCRYPTION_KEY_ENV, "", resolve),
        pseudonym_key=_from_env(rawzone.PSEUDONYM_KEY_ENV, "", resolve),
    )


class JudgeEndpoint(dg.ConfigurableResource):
    """An optional LLM-as-judge for free-text answers in shadow evaluation: any OpenAI-compatible
    chat endpoint (SLM_JUDGE_BASE_URL, SLM_JUDGE_MODEL, key in SLM_JUDGE_API_KEY). Off while
    base_url is empty, the default."""

    base_url: str = ""
    model: str = "gpt-4.1-mini"
    api_key: str = ""

    def judge(self) -> Judge | None:
        return Judge(self.base_url, self.model, self.api_key) if self.base_url else None


def judge_endpoint_from_env(resolve: bool = False) -> JudgeEndpoint:
    return JudgeEndpoint(
        base_url=_from_env("SLM_JUDGE_BASE_URL", "", resolve),
        model=_from_env("SLM_JUDGE_MODEL", "gpt-4.1-mini", resolve),
        api_key=_from_env("SLM_JUDGE_API_KEY", "", resolve),
    )


def resources_from_env(resolve: bool = False) -> dict:
    """Every resource the assets use, configured from the environment."""
    return {
        "pipeline_store": pipeline_store_from_env(resolve),
        "raw_zone_keys": raw_zone_keys_from_env(resolve),
        "judge_endpoint": judge_endpoint_from_env(resolve),
    }
