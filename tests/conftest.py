"""Shared fixtures: the bundled sample, its truth labels, and stage outputs computed once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pipeline import cluster, curate, ingest

REPO = Path(__file__).resolve().parents[1]
LANDING = REPO / "data" / "landing"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = FIXTURES / "formats"  # one small file per supported log format, written from each spec
# The repository's Dagster home turns telemetry off: tests must not reach the network.
os.environ.setdefault("DAGSTER_HOME", str(REPO / ".dagster_home"))


def _free_disk() -> str:
    """Free space where the suite writes (temporary folders, and the repository's caches)."""
    places = {"temporary folders": Path(tempfile.gettempdir()), "repository": REPO}
    return ", ".join(f"{shutil.disk_usage(path).free / 2**30:.1f} GiB free for {label} ({path})"
                     for label, path in places.items())


def pytest_report_header(config) -> str:
    return f"disk: {_free_disk()}"


def _untracked_files() -> set[str] | None:
    """Files in the checkout that git neither tracks nor ignores; None outside a git checkout."""
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    return set(listed.stdout.splitlines()) if listed.returncode == 0 else None


_UNTRACKED_AT_START = pytest.StashKey[set[str] | None]()
_LEFT_IN_CHECKOUT = pytest.StashKey[list[str]]()


def pytest_sessionstart(session) -> None:
    session.config.stash[_UNTRACKED_AT_START] = _untracked_files()


def pytest_sessionfinish(session, exitstatus) -> None:
    # Tests write under temporary folders only: a file a test leaves in the checkout ends up
    # committed (a run log once was). Such a file fails the run, and the summary names it.
    before, after = session.config.stash.get(_UNTRACKED_AT_START, None), _untracked_files()
    if before is not None and after is not None and (left := sorted(after - before)):
        session.config.stash[_LEFT_IN_CHECKOUT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if left := config.stash.get(_LEFT_IN_CHECKOUT, []):
        terminalreporter.write_line(f"FAILED: tests left files in the checkout (write them under tmp_path): {', '.join(left)}", red=True)
    # Said again at the end: on a disk that filled up, tests error out everywhere with OSError and
    # this is the line that explains it.
    terminalreporter.write_line(f"disk at the end: {_free_disk()}")


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


class SampleEmbeddings:
    """While open (`with`), the real embedder encodes each text once: the texts' vectors are kept
    across uses. The clustering tests cluster the sample's calls again and again (subsets, other
    settings), and embedding them is most of the time (about 50 s for the sample on 2 cores)."""

    def __init__(self) -> None:
        self.vectors: dict[tuple, object] = {}
        self._open = 0  # opened again inside itself (a session fixture set up in a module's): wrapped once

    def __enter__(self):
        import numpy as np

        self._open += 1
        if self._open > 1:
            return self
        model = cluster.load_embedder(cluster.BUNDLED_EMBEDDER)  # the instance embed_texts uses
        self._model, encode = model, model.encode

        def encode_each_text_once(texts, **options):
            # the vectors depend on these options; batch size and progress bars do not change them
            key = tuple(sorted((k, v) for k, v in options.items() if k not in ("batch_size", "show_progress_bar")))
            missing = [t for t in dict.fromkeys(texts) if (t, key) not in self.vectors]
            if missing:
                self.vectors.update({(t, key): v for t, v in zip(missing, encode(missing, **options))})
            return np.stack([self.vectors[(t, key)] for t in texts]) if texts else encode(texts, **options)

        model.encode = encode_each_text_once
        return self

    def __exit__(self, *exc) -> None:
        self._open -= 1
        if not self._open:
            del self._model.encode  # back to the class's own method


@pytest.fixture(scope="session")
def sample_embeddings() -> SampleEmbeddings:
    return SampleEmbeddings()


@pytest.fixture(scope="session")
def clustering(curation, sample_embeddings) -> cluster.ClusteringResult:
    with sample_embeddings:
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


S3_BUCKET = "slm-convert-test"


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free loopback port, its address in AWS_ENDPOINT_URL (read by s3fs
    through botocore, as for MinIO or any S3-compatible store); yields the bucket's filesystem."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(S3_BUCKET)
    yield fs
    server.stop()
    for name, value in saved.items():
        os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)


@pytest.fixture(scope="session")
def small_run_on_s3(s3, tmp_path_factory, base_model_dir) -> dict:
    """The whole graph with tests/crash_run.py's small settings on a day of logs, its output
    folder on S3, each stage from a fresh local copy (as each stage's pod of a Kubernetes
    deployment). `reference` is a local copy of the bucket pulled right after the run, before
    any test changes it: the uninterrupted run that the crash tests compare with."""
    from pipeline.remote import Mirror
    from tests import crash_run

    root = tmp_path_factory.mktemp("small-run")
    landing = root / "landing"
    landing.mkdir()
    shutil.copy(LANDING / f"traces-{crash_run.DAY}.jsonl", landing)
    url = f"s3://{S3_BUCKET}/small-run"
    for position, stage in enumerate(crash_run.SETTINGS_ORDER):
        result = crash_run.materialize(url, landing, base_model_dir.parent, [stage], crash_run.KEYS,
                                       work_dir=root / f"pod-{position}")
        assert result.success, f"{stage} failed on object storage"
    reference = Mirror(url, root / "reference")
    reference.pull()
    return {"url": url, "landing": landing, "cache": base_model_dir.parent, "reference": reference.local, "root": root}
