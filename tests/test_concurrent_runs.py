"""Two runs at once (a backfill started while the nightly run works) on one output folder: the
second waits for the first, says so, and the store ends as one run would leave it."""

import os
import subprocess
import sys
import time

import pandas as pd

from assets.resources import REPO_ROOT
from pipeline import curate, ingest, rawzone
from pipeline.store import LOCK_HOLDER, Store, exclusive, read_table

# One run of collection and curation, as the nightly job or a backfill of one day starts it.
RUN = """
import os, sys
import dagster as dg
from assets import data
from assets.resources import PipelineStore, RawZoneKeys
result = dg.materialize(
    [data.raw_traces, data.curated_traces],
    resources={
        "pipeline_store": PipelineStore(landing_dir=os.environ["LANDING"], output_dir=os.environ["OUT"], model_cache_dir="/nonexistent"),
        "raw_zone_keys": RawZoneKeys(encryption_key=os.environ["SLM_RAW_ENCRYPTION_KEY"], pseudonym_key=os.environ["SLM_PSEUDONYM_KEY"]),
    },
    partition_key=sys.argv[1],
    raise_on_error=False,
)
print("run succeeded" if result.success else "run failed")
"""


def _start(day: str, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN, day], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def test_a_backfill_started_during_the_nightly_run_waits_and_the_store_stays_whole(one_day_landing, tmp_path):
    out = tmp_path / "out"
    keys = rawzone.new_keys()
    env = {**os.environ, **keys, "LANDING": str(one_day_landing), "OUT": str(out)}
    logs = [open(tmp_path / name, "w+") for name in ("nightly.log", "backfill.log")]
    nightly = _start("2026-10-02", env, logs[0])
    deadline = time.monotonic() + 120
    while not (out / LOCK_HOLDER).exists():  # the nightly run holds the folder
        assert nightly.poll() is None and time.monotonic() < deadline, "the nightly run never took the output folder"
        time.sleep(0.2)
    backfill = _start("2026-10-01", env, logs[1])
    assert nightly.wait(timeout=600) == 0 and backfill.wait(timeout=600) == 0
    nightly_log, backfill_log = (log.seek(0) or log.read() for log in logs)
    assert "run succeeded" in nightly_log and "run succeeded" in backfill_log
    assert f"waiting for the output folder {out}, held by run " in backfill_log

    # every call stored once, and the curated table is what curating them in one go gives
    stored = ingest.stored_traces(out / "raw", keys[rawzone.ENCRYPTION_KEY_ENV])
    logged = ingest.read_calls(ingest.find_landing_files(one_day_landing)).traces
    assert stored["trace_id"].is_unique and sorted(stored["trace_id"]) == sorted(logged["trace_id"])
    expected = curate.curate(stored).curated
    pd.testing.assert_frame_equal(read_table(Store(out).table("curated_traces")), expected.reset_index(drop=True), check_dtype=False)


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom pipeline.store import exclusive\n"
                               "with exclusive(Path(sys.argv[1]), 'a run that will be killed'):\n    print('held', flush=True); time.sleep(600)",
                               str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waits = []
    started = time.monotonic()
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock with the process
    with exclusive(tmp_path, "the next run", waits.append, report_every=0.5):
        pass
    assert time.monotonic() - started < 30
    assert all("held by a run that will be killed" in w for w in waits)
