"""The trace store and the model registry on object storage: a local S3-compatible server (moto)
on loopback stands in for S3 (fixtures `s3` and `small_run_on_s3` in conftest). Each stage runs
from a fresh local copy, as each step's pod of a Kubernetes deployment would, pulls what the
previous stages pushed and pushes what it wrote."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from assets import cli
from pipeline import failpoints, ingest, rawzone
from pipeline.remote import COMMIT_FILES, Mirror, local_copy
from pipeline.router import RouteTable
from tests import crash_run
from tests.conftest import LANDING, REPO, S3_BUCKET

BUCKET = S3_BUCKET


def test_a_local_copy_pushes_changes_with_commit_files_last_and_another_pulls_them(s3, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/mirror"
    first = Mirror(url, tmp_path / "a")
    (first.local / "registry" / "cluster-1" / "v0001").mkdir(parents=True)
    (first.local / "registry" / "cluster-1" / "v0001" / "eval.json").write_text("{}")
    (first.local / "registry" / "router.yaml").write_text("version: 1\n")
    (first.local / "registry" / ".router.yaml.x.tmp").write_text("half")  # temporary: stays local
    (first.local / ".slm-convert.lock").write_text("")
    uploads = []
    real_put = first.fs.put_file
    monkeypatch.setattr(first.fs, "put_file", lambda local, remote, **kw: uploads.append(remote) or real_put(local, remote, **kw))
    assert first.push() == 2
    assert uploads[-1].endswith("registry/router.yaml")  # the commit file after what it names
    assert first.push() == 0  # nothing changed since

    second = Mirror(url, tmp_path / "b")
    assert second.pull() == 2
    assert (second.local / "registry" / "router.yaml").read_text() == "version: 1\n"
    assert not list(second.local.rglob("*.tmp")) and not (second.local / ".slm-convert.lock").exists()

    (second.local / "registry" / "router.yaml").write_text("version: 2\n")  # another machine's change
    (second.local / "registry" / "cluster-1" / "v0001" / "eval.json").unlink()
    assert second.push() == 2
    assert first.pull() == 2
    assert (first.local / "registry" / "router.yaml").read_text() == "version: 2\n"
    assert not (first.local / "registry" / "cluster-1" / "v0001" / "eval.json").exists()
    assert COMMIT_FILES.index("registry/history.jsonl") < COMMIT_FILES.index("registry/router.yaml")


@pytest.mark.slow
def test_the_graph_runs_stage_by_stage_on_object_storage_and_the_router_serves_from_it(s3, small_run_on_s3, tmp_path, monkeypatch):
    url, landing, keys = small_run_on_s3["url"], small_run_on_s3["landing"], crash_run.KEYS
    prefix = url.removeprefix("s3://")
    names = {path.removeprefix(f"{prefix}/") for path in s3.find(prefix)}
    assert {"raw/ledger.sqlite", "store/curated_traces.parquet", "store/task_clusters.parquet", "eval/shadow_eval.json",
            "registry/router.yaml", "registry/history.jsonl", "registry/runs/LATEST"} <= names
    assert any(n.startswith("raw/traces/day=") and n.endswith(".parquet.enc") for n in names)  # sealed there too
    assert not [n for n in names if n.endswith((".tmp", ".lock")) or ".partial" in n or ".checkpoints" in n]

    # a new machine reads the trace store from the bucket
    reader = Mirror(f"{url}/raw", tmp_path / "reader")
    reader.pull()
    assert len(ingest.stored_traces(reader.local, keys[rawzone.ENCRYPTION_KEY_ENV])) == len(
        ingest.read_calls(ingest.find_landing_files(landing)).traces)

    # the router's registry: a local copy of the bucket's, with every adapter the routes name
    registry = Mirror(f"{url}/registry", tmp_path / "router")
    registry.pull()
    table = RouteTable.load(registry.local)
    assert table.routes and all((r.adapter_dir / "adapter_model.safetensors").is_file() for r in table.routes)

    # the command line rolls a route back on the bucket: the router's next pull sees it
    monkeypatch.setenv("SLM_OUTPUT_DIR", url)
    monkeypatch.setenv("SLM_WORK_DIR", str(tmp_path / "operator"))
    route = table.routes[0].name
    assert cli.main(["rollback", route, "--to", "llm"]) == 0
    registry.pull()
    assert route not in {r.name for r in RouteTable.load(registry.local).routes}
    history = [json.loads(line) for line in (registry.local / "history.jsonl").read_text().splitlines()]
    assert history[-1]["action"] == "rollback" and history[-1]["route"] == route
    assert yaml.safe_load((registry.local / "router.yaml").read_text())["version"] == table.version + 1


@pytest.mark.slow
def test_fine_tuning_killed_after_a_checkpoint_resumes_from_it_on_another_machine(s3, small_run_on_s3, tmp_path):
    from pipeline.store import Store
    from tests.test_crash_recovery import _assert_every_visible_file_is_whole, _same_adapters

    # the bucket as the earlier stages left it: the small run without its adapters
    url = f"s3://{BUCKET}/preempted"
    seed = Mirror(url, tmp_path / "seed")
    shutil.copytree(small_run_on_s3["reference"], seed.local)
    (seed.local / ".slm-convert.mirror.json").unlink()  # the reference's own record of its pull
    shutil.rmtree(seed.local / "adapters")
    (seed.local / "store" / "finetuned_adapters.json").unlink()
    seed.push()

    # the fine-tuning pod dies (SIGKILL) right after its first checkpoint
    args = [url, str(small_run_on_s3["landing"]), str(small_run_on_s3["cache"]), "finetuned_adapters", str(tmp_path / "pod-a")]
    killed = subprocess.run([sys.executable, "-m", "tests.crash_run", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **crash_run.KEYS, failpoints.ENV: "finetune:checkpoint-saved"}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    prefix = url.removeprefix("s3://")
    saved = [n for n in s3.find(prefix) if ".checkpoints/checkpoint-" in n and n.endswith("/trainer_state.json")]
    assert saved, "the checkpoint was not uploaded before the pod died"
    left = local_copy(url, tmp_path / "pod-a")  # what the dead pod left on its disk
    assert (left / "store" / "curated_traces.parquet").is_file()
    _assert_every_visible_file_is_whole(left)

    # its next try runs on another machine: it pulls the checkpoint and resumes from it
    rerun = crash_run.materialize(url, small_run_on_s3["landing"], small_run_on_s3["cache"], ["finetuned_adapters"],
                                  crash_run.KEYS, work_dir=tmp_path / "pod-b")
    assert rerun.success
    check = Mirror(url, tmp_path / "check")
    check.pull()
    records = [json.loads(p.read_text()) for p in sorted((check.local / "adapters").glob("*/training.json"))]
    assert any(r["metrics"]["resumed_from_step"] >= 1 for r in records)
    _same_adapters(Store(check.local), Store(small_run_on_s3["reference"]))  # ends where the unbroken run did
    assert not [n for n in s3.find(prefix) if ".checkpoints" in n]  # done: the checkpoints are gone

def test_parts_an_upload_left_without_their_ledger_commit_are_not_data(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    shutil.copy(LANDING / f"traces-{crash_run.DAY}.jsonl", landing)
    keys = rawzone.new_keys()
    raw = tmp_path / "raw"
    options = ingest.IngestOptions(pseudonym_key=keys[rawzone.PSEUDONYM_KEY_ENV])
    ingest.collect(landing, raw, options, keys[rawzone.ENCRYPTION_KEY_ENV], 30)
    calls = len(ingest.stored_traces(raw, keys[rawzone.ENCRYPTION_KEY_ENV]))
    part = rawzone.part_files(raw, rawzone.TRACES)[0]
    orphan = part.with_name(part.name.replace(rawzone.part_run(part), "20991231T000000Z-abcdef"))
    shutil.copy(part, orphan)  # uploaded, but its run's ledger commit never was
    assert len(ingest.stored_traces(raw, keys[rawzone.ENCRYPTION_KEY_ENV])) == calls
    ingest.collect(landing, raw, options, keys[rawzone.ENCRYPTION_KEY_ENV], 30)
    assert not orphan.exists()  # the next collection removes it
    assert len(ingest.stored_traces(raw, keys[rawzone.ENCRYPTION_KEY_ENV])) == calls


def test_a_push_of_many_files_records_its_progress_every_few_seconds_and_a_cut_push_resumes(s3, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/many"
    mirror = Mirror(url, tmp_path / "a")
    for number in range(60):
        (mirror.local / "raw" / f"part-{number:03d}.parquet").parent.mkdir(parents=True, exist_ok=True)
        (mirror.local / "raw" / f"part-{number:03d}.parquet").write_text(str(number))
    saves, uploads = [], []
    real_save, real_put = mirror._save_manifest, mirror.fs.put_file
    monkeypatch.setattr(mirror, "_save_manifest", lambda manifest: saves.append(len(manifest)) or real_save(manifest))

    def put_then_fail(local, remote, **kw):  # the connection drops on the 41st object
        if len(uploads) == 40:
            raise ConnectionError("connection reset")
        uploads.append(remote)
        return real_put(local, remote, **kw)

    monkeypatch.setattr(mirror.fs, "put_file", put_then_fail)
    with pytest.raises(ConnectionError):
        mirror.push()
    assert saves == []  # not once per object
    monkeypatch.setattr(mirror.fs, "put_file", real_put)
    assert mirror.push() == 60 and saves == [60]
    other = Mirror(url, tmp_path / "b")
    assert other.pull() == 60 and (other.local / "raw" / "part-059.parquet").read_text() == "59"
    monkeypatch.setattr("pipeline.remote.MANIFEST_SAVE_SECONDS", 0.0)  # a slow push: recorded on the way
    for number in range(5):
        (mirror.local / "raw" / f"part-{number:03d}.parquet").write_text(f"new {number}")
    saves.clear()
    assert mirror.push() == 5 and saves == [60, 60, 60, 60, 60, 60]


def test_a_bucket_key_that_leads_outside_the_local_copy_is_refused_not_written(s3, tmp_path):
    url = f"s3://{BUCKET}/contained"
    escape = tmp_path / "escape.pth"
    planted = {"registry/x/../../../escape.pth": b"import os", "/registry/abs": b"x", "registry/ok/eval.json": b"{}"}
    for key, payload in planted.items():
        s3.pipe(f"{BUCKET}/contained/{key}", payload)
    mirror = Mirror(url, tmp_path / "copy" / "local")
    messages = []
    mirror.pull(messages.append)
    assert not escape.exists() and (mirror.local / "registry" / "ok" / "eval.json").read_bytes() == b"{}"
    assert [f for f in tmp_path.rglob("*") if f.is_file() and mirror.local not in f.parents] == []
    assert any("registry/x/../../../escape.pth" in m and "refused" in m for m in messages)
    # a symbolic link inside the copy that points elsewhere is no way out either
    (mirror.local / "registry" / "link").symlink_to(tmp_path)
    s3.pipe(f"{BUCKET}/contained/registry/link/escape.pth", b"import os")
    mirror.pull(messages.append)
    assert not escape.exists() and "registry/link/escape.pth" in mirror.refused
