"""The raw zone: encrypted at rest, owner-only files, keyed session pseudonyms, refusal without keys."""

import stat

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from assets import data
from assets.resources import PipelineStore, RawZoneKeys
from pipeline import ingest, rawzone


@pytest.fixture
def keys() -> dict:
    return rawzone.new_keys()


def _materialize_raw(landing, out, keys: dict, config: dict | None = None):
    return dg.materialize(
        [data.raw_traces],
        resources={
            "pipeline_store": PipelineStore(landing_dir=str(landing), output_dir=str(out), model_cache_dir=str(out / "models")),
            "raw_zone_keys": RawZoneKeys(
                encryption_key=keys.get(rawzone.ENCRYPTION_KEY_ENV, ""), pseudonym_key=keys.get(rawzone.PSEUDONYM_KEY_ENV, "")
            ),
        },
        run_config={"ops": {"raw_traces": {"config": config or {}}}},
        raise_on_error=False,
    )


def test_raw_traces_are_stored_encrypted_owner_only_and_pseudonymized(one_day_landing, tmp_path, keys, labels):
    result = _materialize_raw(one_day_landing, tmp_path / "out", keys)
    assert result.success
    plain_path = tmp_path / "out" / "store" / "raw_traces.parquet"
    sealed = rawzone.encrypted_path(plain_path)
    assert sealed.is_file() and not plain_path.exists()
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    assert stat.S_IMODE(rawzone.encrypted_path(tmp_path / "out" / "store" / "quarantine.parquet").stat().st_mode) == 0o600

    payload = sealed.read_bytes()
    # Fernet tokens are url-safe base64: no "@" can appear, so no e-mail address survives,
    # and the file is not Parquet (which starts with the magic bytes PAR1).
    assert b"@" not in payload and not payload.startswith(b"PAR1")
    with pytest.raises(Exception):
        pq.read_table(sealed)

    stored = rawzone.read_raw_table(plain_path, keys[rawzone.ENCRYPTION_KEY_ENV])
    logged = ingest.ingest(ingest.find_log_files(one_day_landing)).traces
    assert list(stored["trace_id"]) == list(logged["trace_id"])
    assert stored["messages"].equals(logged["messages"])  # the raw zone keeps the text as logged
    # sessions: same grouping, no logged id left
    assert not set(stored["session_id"]) & set(logged["session_id"])
    assert stored["session_id"].str.startswith("anon-").all()
    pairs = pd.DataFrame({"logged": logged["session_id"], "stored": stored["session_id"]}).drop_duplicates()
    assert pairs["logged"].is_unique and pairs["stored"].is_unique


def test_reading_needs_the_right_key(tmp_path, keys):
    frame = pd.DataFrame({"source_file": ["a"], "source_line": [1], "reason": ["r"], "excerpt": ["x"]})
    path = tmp_path / "quarantine.parquet"
    rawzone.write_raw_table(path, frame, ingest.QUARANTINE_SCHEMA, keys[rawzone.ENCRYPTION_KEY_ENV])
    with pytest.raises(rawzone.RawZoneKeyError, match="is encrypted: set SLM_RAW_ENCRYPTION_KEY"):
        rawzone.read_raw_table(path, None)
    other = rawzone.new_keys()[rawzone.ENCRYPTION_KEY_ENV]
    with pytest.raises(rawzone.RawZoneKeyError, match="cannot be decrypted"):
        rawzone.read_raw_table(path, other)
    with pytest.raises(rawzone.RawZoneKeyError, match="not a Fernet key"):
        rawzone.write_raw_table(path, frame, ingest.QUARANTINE_SCHEMA, "too-short")
    assert rawzone.read_raw_table(path, keys[rawzone.ENCRYPTION_KEY_ENV]).equals(frame)


def test_without_keys_raw_data_is_refused_unless_the_config_says_so(one_day_landing, tmp_path):
    refused = _materialize_raw(one_day_landing, tmp_path / "refused", {})
    assert not refused.success
    failure = next(e for e in refused.all_events if e.is_step_failure)
    assert "SLM_RAW_ENCRYPTION_KEY is not set" in failure.step_failure_data.error.message
    assert not (tmp_path / "refused" / "store").exists()

    allowed = _materialize_raw(
        one_day_landing, tmp_path / "plain", {}, {"encrypt_raw": False, "pseudonymize_origins": False}
    )
    assert allowed.success
    assert (tmp_path / "plain" / "store" / "raw_traces.parquet").is_file()


def test_pseudonyms_are_stable_and_depend_on_the_key():
    sessions = pd.Series(["sess-1", "sess-2", "sess-1", None])
    first = rawzone.pseudonymize(sessions, "key-a")
    assert first[0] == first[2] != first[1] and pd.isna(first[3])
    assert rawzone.pseudonymize(sessions, "key-a").equals(first)
    assert rawzone.pseudonymize(sessions, "key-b")[0] != first[0]
