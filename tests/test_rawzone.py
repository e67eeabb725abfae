"""The raw zone: encrypted owner-only parts by call day, keyed pseudonyms, refusal without keys,
idempotent runs, retention, and runs that fail or crash halfway."""

import shutil
import stat
from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from assets import data
from assets.resources import PipelineStore, RawZoneKeys
from pipeline import ingest, rawzone
from pipeline.ledger import Ledger
from tests.conftest import LANDING

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def keys() -> dict:
    return rawzone.new_keys()


def _materialize_raw(landing, out, keys: dict, config: dict | None = None, partition_key: str = "2026-10-01"):
    return dg.materialize(
        [data.raw_traces],
        resources={
            "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(out), model_cache_dir=str(out / "models")),
            "raw_zone_keys": RawZoneKeys(
                encryption_key=keys.get(rawzone.ENCRYPTION_KEY_ENV, ""), pseudonym_key=keys.get(rawzone.PSEUDONYM_KEY_ENV, "")
            ),
        },
        run_config={"ops": {"raw_traces": {"config": config or {}}}},
        partition_key=partition_key,
        raise_on_error=False,
    )


def _collect(landing, raw_root, key=None, now=NOW, retention_days=30, **options):
    return ingest.collect(landing, raw_root, ingest.IngestOptions(**options), key, retention_days, now=now)


def test_raw_traces_are_stored_encrypted_owner_only_pseudonymized_and_by_call_day(one_day_landing, tmp_path, keys):
    shutil.copy(LANDING / "traces-2026-10-02.jsonl", one_day_landing)
    result = _materialize_raw(one_day_landing, tmp_path / "out", keys)
    assert result.success
    raw = tmp_path / "out" / "raw"
    parts = rawzone.part_files(raw, rawzone.TRACES)
    assert {p.parent.name for p in parts} == {"day=2026-10-01", "day=2026-10-02"}
    for part in [*parts, *rawzone.part_files(raw, rawzone.QUARANTINE)]:
        assert part.name.endswith(".parquet.enc") and stat.S_IMODE(part.stat().st_mode) == 0o600
        payload = part.read_bytes()
        # Fernet tokens are url-safe base64: no "@" can appear, so no e-mail address survives,
        # and the file is not Parquet (which starts with the magic bytes PAR1).
        assert b"@" not in payload and not payload.startswith(b"PAR1")
        with pytest.raises(Exception):
            pq.read_table(part)
    assert stat.S_IMODE((raw / "ledger.sqlite").stat().st_mode) == 0o600
    # each day's partition is reported, the run's own and the other one it filled
    days = {e.partition: e for e in result.get_asset_materialization_events()}
    assert set(days) == {"2026-10-01", "2026-10-02"}

    stored = ingest.stored_traces(raw, keys[rawzone.ENCRYPTION_KEY_ENV])
    logged = ingest.read_calls(ingest.find_landing_files(one_day_landing)).traces
    assert list(stored["trace_id"]) == list(logged["trace_id"])
    assert stored["messages"].equals(logged["messages"])  # the raw zone keeps the text as logged
    # sessions: same grouping, no logged id left, not in the origin column either
    assert not set(stored["session_id"]) & set(logged["session_id"])
    assert stored["session_id"].str.startswith("anon-").all()
    assert not stored["origin"].str.contains("sess-").any()
    pairs = pd.DataFrame({"logged": logged["session_id"], "stored": stored["session_id"]}).drop_duplicates()
    assert pairs["logged"].is_unique and pairs["stored"].is_unique


def test_the_quarantine_check_fails_when_a_run_quarantines_too_much(tmp_path, keys):
    landing = tmp_path / "landing"
    landing.mkdir()
    lines = (LANDING / "traces-2026-10-01.jsonl").read_bytes().splitlines(keepends=True)
    (landing / "mostly-broken.jsonl").write_bytes(b"".join(lines[:20]) + b'{"id": "cut", "request": {\n' * 10)
    result = dg.materialize(
        [data.raw_traces, data.quarantined_share_below_limit],
        resources={
            "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(tmp_path / "out"), model_cache_dir=str(tmp_path)),
            "raw_zone_keys": RawZoneKeys(encryption_key=keys[rawzone.ENCRYPTION_KEY_ENV], pseudonym_key=keys[rawzone.PSEUDONYM_KEY_ENV]),
        },
        run_config={"ops": {"raw_traces": {"config": {"max_quarantined_share": 0.2}}}},
        partition_key="2026-10-01",
    )
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["quarantined_share"].value > 0.2
    (materialization,) = result.get_asset_materialization_events()
    metadata = materialization.materialization.metadata
    assert metadata["quarantine_reasons"].value["invalid JSON"] >= 10


def test_reading_needs_the_right_key(tmp_path, keys):
    rows = [{"source_file": "a", "source_line": 1, "reason": "r", "excerpt": "x"}]
    part = rawzone.write_part(tmp_path / "part-1", rows, ingest.QUARANTINE_SCHEMA, keys[rawzone.ENCRYPTION_KEY_ENV])
    with pytest.raises(rawzone.RawZoneKeyError, match="is encrypted: set SLM_RAW_ENCRYPTION_KEY"):
        rawzone.read_part(part, None)
    other = rawzone.new_keys()[rawzone.ENCRYPTION_KEY_ENV]
    with pytest.raises(rawzone.RawZoneKeyError, match="cannot be decrypted"):
        rawzone.read_part(part, other)
    with pytest.raises(rawzone.RawZoneKeyError, match="not a Fernet key"):
        rawzone.write_part(tmp_path / "part-2", rows, ingest.QUARANTINE_SCHEMA, "too-short")
    assert rawzone.read_part(part, keys[rawzone.ENCRYPTION_KEY_ENV]).to_pylist() == rows


def test_a_rotated_key_keeps_old_data_readable_and_seals_new_data_under_the_new_key(one_day_landing, tmp_path, capsys, monkeypatch):
    old, new = rawzone.new_encryption_key(), rawzone.new_encryption_key()
    raw = tmp_path / "out" / "raw"
    _collect(one_day_landing, raw, old)
    old_parts = {p: p.read_bytes() for p in rawzone.part_files(raw, rawzone.TRACES)}
    # the new key first, the old one after it: the next day is sealed under the new key only
    shutil.copy(LANDING / "traces-2026-10-02.jsonl", one_day_landing)
    _collect(one_day_landing, raw, f"{new}, {old}")
    new_parts = [p for p in rawzone.part_files(raw, rawzone.TRACES) if p not in old_parts]
    assert new_parts and all(rawzone.read_part(p, new).num_rows for p in new_parts)
    with pytest.raises(rawzone.RawZoneKeyError, match="keep the old key after the new one"):
        ingest.stored_traces(raw, new)  # the first day is still under the old key
    both = ingest.stored_traces(raw, f"{new},{old}")
    assert set(both["called_at"].astype(str).str[:10]) == {"2026-10-01", "2026-10-02"}

    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, f"{new},{old}")
    assert rawzone.main(["rotate", str(raw.parent)]) == 0
    assert "re-sealed" in capsys.readouterr().out
    assert all(p.read_bytes() != payload for p, payload in old_parts.items())
    # after the rotation the old key can go: everything reads with the new key alone, unchanged
    assert ingest.stored_traces(raw, new).equals(both)
    with pytest.raises(rawzone.RawZoneKeyError, match="cannot be decrypted"):
        rawzone.read_part(next(iter(old_parts)), old)
    with pytest.raises(rawzone.RawZoneKeyError, match="key 2 of SLM_RAW_ENCRYPTION_KEY is not a Fernet key"):
        rawzone.seal(b"x", f"{new},not-a-key")


def test_without_keys_raw_data_is_refused_unless_the_config_says_so(one_day_landing, tmp_path):
    refused = _materialize_raw(one_day_landing, tmp_path / "refused", {})
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_step_failure)
    assert "SLM_RAW_ENCRYPTION_KEY is not set" in failure.step_failure_data.error.message
    assert not (tmp_path / "refused" / "raw").exists()

    allowed = _materialize_raw(
        one_day_landing, tmp_path / "plain", {}, {"encrypt_raw": False, "pseudonymize_origins": False}
    )
    assert allowed.success
    parts = rawzone.part_files(tmp_path / "plain" / "raw", rawzone.TRACES)
    assert parts and all(p.name.endswith(".parquet") for p in parts)


def test_pseudonyms_are_stable_and_depend_on_the_key():
    sessions = pd.Series(["sess-1", "sess-2", "sess-1", None])
    first = sessions.map(lambda value: rawzone.pseudonym(value, "key-a"))
    assert first[0] == first[2] != first[1] and pd.isna(first[3])
    assert sessions.map(lambda value: rawzone.pseudonym(value, "key-a")).equals(first)
    assert rawzone.pseudonym("sess-1", "key-b") != first[0]


def test_collecting_again_adds_nothing_and_a_grown_file_adds_only_its_new_calls(tmp_path):
    landing, raw = tmp_path / "landing", tmp_path / "raw"
    landing.mkdir()
    lines = (LANDING / "traces-2026-10-01.jsonl").read_bytes().splitlines(keepends=True)
    (landing / "agent.jsonl").write_bytes(b"".join(lines[:200]))
    first = _collect(landing, raw)
    assert first.stats.files_read == 1 and first.stats.calls > 0

    again = _collect(landing, raw)
    assert (again.stats.files_read, again.stats.files_unchanged, again.stats.calls) == (0, 1, 0)

    shutil.copy(landing / "agent.jsonl", landing / "agent-copy.jsonl")  # the same file landed twice
    copy = _collect(landing, raw)
    assert copy.stats.calls == 0 and copy.stats.repeated == first.stats.calls

    with open(landing / "agent.jsonl", "ab") as f:  # a log that grew since
        f.write(b"".join(lines[200:]))
    grown = _collect(landing, raw)
    everything = ingest.read_calls([LANDING / "traces-2026-10-01.jsonl"])
    assert grown.stats.calls == len(everything.traces) - first.stats.calls
    assert grown.stats.quarantined == len(everything.quarantine) - first.stats.quarantined  # old lines not twice
    stored = ingest.stored_traces(raw, None)
    assert stored["trace_id"].is_unique and set(stored["trace_id"]) == set(everything.traces["trace_id"])


def test_retention_deletes_old_raw_parts_and_keeps_them_from_coming_back(one_day_landing, tmp_path):
    raw = tmp_path / "raw"
    _collect(one_day_landing, raw, retention_days=30)
    assert len(ingest.stored_traces(raw, None)) > 0
    kept = _collect(one_day_landing, raw, now=NOW + timedelta(days=29), retention_days=30)
    assert kept.expired_parts == 0 and len(ingest.stored_traces(raw, None)) > 0

    expired = _collect(one_day_landing, raw, now=NOW + timedelta(days=31), retention_days=30)
    assert expired.expired_parts >= 2  # the calls' part and the quarantine's
    assert ingest.stored_traces(raw, None).empty and ingest.stored_quarantine(raw, None).empty
    assert not list((raw / rawzone.TRACES).iterdir())  # empty day folders go too
    # the log file is still in the landing folder, but what expired is not taken in again
    shutil.copy(one_day_landing / "traces-2026-10-01.jsonl", one_day_landing / "re-sent.jsonl")
    later = _collect(one_day_landing, raw, now=NOW + timedelta(days=32), retention_days=30)
    assert later.stats.calls == 0 and later.stats.repeated > 0


def test_a_run_that_fails_halfway_leaves_no_trace_and_the_next_run_takes_everything(one_day_landing, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    real_add = rawzone.RawZoneWriter.add
    seen = {"rows": 0}

    def failing_add(self, kind, partition, row):
        seen["rows"] += 1
        if seen["rows"] > 300:
            raise OSError("disk full")
        real_add(self, kind, partition, row)

    monkeypatch.setattr(rawzone.RawZoneWriter, "add", failing_add)
    monkeypatch.setattr(rawzone.RawZoneWriter, "__init__", _small_parts(rawzone.RawZoneWriter.__init__))
    with pytest.raises(OSError, match="disk full"):
        _collect(one_day_landing, raw)
    assert rawzone.part_files(raw, rawzone.TRACES) == [] and not any((raw / rawzone.STAGING).iterdir())
    monkeypatch.undo()
    after = _collect(one_day_landing, raw)
    assert after.stats.calls == len(ingest.read_calls([one_day_landing / "traces-2026-10-01.jsonl"]).traces)


def _small_parts(init):
    def small(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.rows_per_part = 100  # so that parts are staged before the failure

    return small


def test_a_crash_after_the_ledger_committed_is_finished_by_the_next_run(one_day_landing, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    monkeypatch.setattr(rawzone, "publish", lambda root, run_id: 0)  # the process dies before publishing
    first = _collect(one_day_landing, raw)
    assert rawzone.part_files(raw, rawzone.TRACES) == []
    monkeypatch.undo()
    ledger = Ledger(raw / "ledger.sqlite")
    assert first.run_id in ledger.committed_runs()
    ledger.close()
    second = _collect(one_day_landing, raw)
    assert second.stats.files_unchanged == 1
    assert len(ingest.stored_traces(raw, None)) == first.stats.calls
