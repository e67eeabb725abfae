"""Shared fixtures: the bundled sample, its truth labels, and stage outputs computed once."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import cluster, curate, ingest

REPO = Path(__file__).resolve().parents[1]
LANDING = REPO / "data" / "landing"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = FIXTURES / "formats"  # one small file per supported log format, written from each spec
# The repository's Dagster home turns telemetry off: tests must not reach the network.
os.environ.setdefault("DAGSTER_HOME", str(REPO / ".dagster_home"))


def quiet_dagster_home(path: Path) -> Path:
    """A fresh Dagster home with telemetry off."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return path


def postgres_dagster_home(path: Path) -> Path:
    """A Dagster home whose instance is configs/dagster-postgres.yaml, as a deployment sets it
    up; the `postgres_env` fixture points its DAGSTER_PG_* variables at the test server."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "dagster-postgres.yaml", path / "dagster.yaml")
    return path


@pytest.fixture(scope="session")
def postgres_env():
    """A PostgreSQL server for the session, its connection in the DAGSTER_PG_* variables."""
    from tests.postgres_server import postgres_server

    with postgres_server() as env:
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        yield env
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="session")
def labels() -> dict:
    """The truth the pipeline never reads: steps, canaries, duplicate pairs, malformed count."""
    return json.loads((FIXTURES / "labels.json").read_text())


@pytest.fixture(scope="session")
def ingested() -> ingest.IngestResult:
    return ingest.read_calls(ingest.find_landing_files(LANDING))


@pytest.fixture(scope="session")
def curation(ingested) -> curate.CurationResult:
    return curate.curate(ingested.traces)


@pytest.fixture(scope="session")
def clustering(curation) -> cluster.ClusteringResult:
    return cluster.cluster_calls(curation.curated)


@pytest.fixture
def one_day_landing(tmp_path) -> Path:
    """A landing folder holding the first day of the sample (about 430 lines)."""
    landing = tmp_path / "landing"
    landing.mkdir()
    shutil.copy(LANDING / "traces-2026-10-01.jsonl", landing)
    return landing


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a plain checkpoint (converted once per cache)."""
    from assets.resources import pipeline_store_from_env
    from pipeline import models

    candidates = models.load_candidates(REPO / "configs" / "candidates.yaml")
    bundled = next(c for c in candidates if c.source == "bundled-gguf")
    cache = Path(pipeline_store_from_env(resolve=True).model_cache_dir)
    return models.resolve_model_dir(bundled, cache)
