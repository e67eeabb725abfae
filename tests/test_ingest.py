import gzip
import json
import tracemalloc

import pytest

from pipeline import ingest
from tests.conftest import LANDING


def test_every_line_is_either_a_trace_or_quarantined(ingested):
    lines = sum(1 for f in LANDING.glob("*.jsonl") for _ in open(f, "rb"))
    assert len(ingested.traces) + len(ingested.quarantine) == lines
    assert len(ingested.traces) == 3016


def test_quarantine_holds_exactly_the_malformed_lines(ingested, labels):
    non_empty = ingested.quarantine[ingested.quarantine["reason"] != "empty line"]
    assert len(non_empty) == labels["malformed_lines"]
    assert set(ingested.traces["trace_id"]) == set(labels["records"])
    assert (ingested.quarantine["source_line"] > 0).all()
    reasons = ingest.quarantine_reasons(ingested.quarantine)
    assert reasons == dict(ingested.stats.reasons) == {
        "invalid JSON": 14,
        "empty line": 7,
        "request.messages is empty": 7,
        "id is missing or not a string": 7,
    }


def test_canonical_schema_keeps_tool_calls_usage_and_feedback(ingested):
    traces = ingested.traces.set_index("trace_id")
    tool_calls = traces[traces["finish_reason"] == "tool_calls"]
    assert len(tool_calls) > 0
    message = json.loads(tool_calls["response_message"].iloc[0])
    assert message["tool_calls"][0]["function"]["name"]
    assert tool_calls["tools"].notna().all()
    assert traces["prompt_tokens"].notna().all() and traces["latency_ms"].notna().all()
    assert set(traces["feedback"].dropna()) == {"correct", "incorrect"}
    assert traces["called_at"].is_monotonic_increasing
    assert list(ingested.traces.columns) == ingest.TRACE_SCHEMA.names


def test_bad_input_of_each_kind_is_quarantined_with_its_reason(tmp_path):
    good = (LANDING / "traces-2026-10-01.jsonl").read_bytes().splitlines()[0]
    record = json.loads(good)
    wrong_types = dict(record, id="wrong-types", request=dict(record["request"], messages="hello"))
    no_response = {k: v for k, v in dict(record, id="no-response").items() if k != "response"}
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b"\n".join(
            [
                good,
                good,  # the same call logged twice: counted, not stored twice, not quarantined
                good.replace(b'"latency_ms": ', b'"latency_ms": 1'),  # same id, other content
                b'{"id": "x", "created_at": "yesterday", "request": {"messages": [{"role": "user"}]}}',
                b"\xff\xfe not utf-8",
                b"[1, 2, 3]",
                good[: len(good) // 2],  # truncated JSON
                b'{"id": "y", "created_at": "2026-10-01T00:00:00Z", "request": {"messages": [{"role": "user", "content": "hi"}]}, "response": {"choices": []}}',
                json.dumps(wrong_types).encode(),
                json.dumps(no_response).encode(),
                b"",
            ]
        )
    )
    result = ingest.read_calls([path])
    assert len(result.traces) == 1 and result.repeated == 1
    assert list(result.quarantine["source_line"]) == [3, 4, 5, 6, 7, 8, 9, 10]
    reasons = list(result.quarantine["reason"])
    assert reasons[0].endswith("already ingested with different content")
    assert reasons[1].startswith("created_at is not an ISO-8601 time")
    assert reasons[2].startswith("invalid UTF-8")
    assert reasons[3] == "line is a JSON list, not an object"
    assert reasons[4].startswith("invalid JSON")
    assert reasons[5] == "response has no choices"
    assert reasons[6] == "request.messages is missing or not a list"
    assert reasons[7] == "response is missing or not an object"
    assert result.stats.pieces == 10  # the trailing newline ends line 11, which does not exist


def test_missing_or_empty_landing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="SLM_LANDING_DIR"):
        ingest.find_landing_files(tmp_path / "nope")
    (tmp_path / ".hidden").write_text("editor swap file")
    with pytest.raises(FileNotFoundError, match="holds no files"):
        ingest.find_landing_files(tmp_path)


def test_ingesting_the_same_file_twice_adds_nothing(tmp_path):
    once = ingest.read_calls([LANDING / "traces-2026-10-02.jsonl"])
    copy = tmp_path / "copy-of-day-2.jsonl"
    copy.write_bytes((LANDING / "traces-2026-10-02.jsonl").read_bytes())
    twice = ingest.read_calls([LANDING / "traces-2026-10-02.jsonl", copy])
    assert list(twice.traces["trace_id"]) == list(once.traces["trace_id"])
    assert twice.traces["record_hash"].equals(once.traces["record_hash"])
    assert twice.repeated == len(once.traces)
    # the copy's malformed lines are quarantined again, under the copy's name: nothing is hidden
    assert len(twice.quarantine) == 2 * len(once.quarantine)


def test_record_hash_ignores_key_order_and_whitespace():
    assert ingest.record_hash(json.loads('{"a": 1, "b": [1, 2]}')) == ingest.record_hash(json.loads('{"b":[1,2],"a":1}'))
    assert ingest.record_hash({"a": 1}) != ingest.record_hash({"a": 2})


def _zstd_frames(data: bytes) -> bytes:
    """As the Collector's file exporter writes with `compression: zstd`: each write its own frame."""
    import zstandard

    lines = data.splitlines(keepends=True)
    return b"".join(zstandard.ZstdCompressor().compress(b"".join(lines[i:i + 25])) for i in range(0, len(lines), 25))


@pytest.mark.parametrize("compress", [gzip.compress, _zstd_frames], ids=["gzip", "zstd"])
def test_a_compressed_file_is_read_and_a_truncated_one_quarantined_where_it_breaks(tmp_path, compress):
    day = (LANDING / "traces-2026-10-03.jsonl").read_bytes()
    packed = compress(day)
    (tmp_path / "day3.jsonl.packed").write_bytes(packed)
    (tmp_path / "day3-cut.jsonl").write_bytes(packed[: len(packed) // 2])  # compressed whatever the name
    plain = ingest.read_calls([LANDING / "traces-2026-10-03.jsonl"])
    whole = ingest.read_calls([tmp_path / "day3.jsonl.packed"])
    assert list(whole.traces["trace_id"]) == list(plain.traces["trace_id"])
    assert len(whole.quarantine) == len(plain.quarantine)
    cut = ingest.read_calls([tmp_path / "day3-cut.jsonl"])
    assert 0 < len(cut.traces) < len(plain.traces)
    last = cut.quarantine.iloc[-1]
    assert last["reason"].startswith("compressed stream is corrupt or truncated")
    assert last["source_line"] > len(cut.traces)


def test_a_50_mb_line_is_quarantined_in_bounded_memory_and_the_file_goes_on(tmp_path):
    good = (LANDING / "traces-2026-10-01.jsonl").read_bytes().splitlines()
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(good[0] + b"\n")
        f.write(b'{"id": "huge", "request": {"messages": [{"role": "user", "content": "' + b"x" * (50 * 1024 * 1024) + b'"}]}}\n')
        f.write(good[1] + b"\n")
    tracemalloc.start()
    result = ingest.read_calls([path], ingest.IngestOptions(max_record_bytes=16 * 1024 * 1024))
    peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert len(result.traces) == 2
    assert result.quarantine.to_dict("records")[0] | {"excerpt": ""} == {
        "source_file": str(path), "source_line": 2, "reason": "line longer than 16777216 bytes", "excerpt": ""
    }
    assert peak_mb < 40  # never holds the 50 MB line (16 MB of it at most)


def test_files_that_are_not_logs_are_quarantined_whole_and_empty_files_are_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("remember to rotate the keys\n" * 1000)
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "other.jsonl").write_text('{"event": "login", "user": "a"}\n{"event": "logout"}\n')
    result = ingest.read_calls(ingest.find_landing_files(tmp_path))
    assert result.traces.empty
    reasons = {row["source_file"].rsplit("/", 1)[1]: (row["source_line"], row["reason"]) for row in result.quarantine.to_dict("records")}
    assert reasons["notes.txt"] == (0, "file is not JSON or JSON lines")
    assert reasons["image.png"] == (0, "file is not JSON or JSON lines")
    assert reasons["other.jsonl"][0] == 0 and reasons["other.jsonl"][1].startswith("unrecognised log format")
    assert "empty.jsonl" not in reasons and result.stats.files_read == 4


def test_a_sealed_landing_file_is_decrypted_once_per_collection_and_afresh_when_rewritten(tmp_path, monkeypatch):
    from pipeline import rawzone

    key = rawzone.new_encryption_key()
    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, key)
    lines = (LANDING / "traces-2026-10-01.jsonl").read_text().splitlines(keepends=True)
    sealed = tmp_path / "router.jsonl.enc"
    sealed.write_bytes(rawzone.seal("".join(lines[:5]).encode(), key))
    decrypted = []
    unseal = rawzone.unseal
    monkeypatch.setattr(rawzone, "unseal", lambda path, k: decrypted.append(path) or unseal(path, k))
    first = ingest.read_calls([sealed])
    assert len(first.traces) + len(first.quarantine) == 5 and decrypted == [sealed]
    sealed.write_bytes(rawzone.seal("".join(lines[5:12]).encode(), key))  # the same name, new calls
    second = ingest.read_calls([sealed])
    assert len(second.traces) + len(second.quarantine) == 7 and decrypted == [sealed, sealed]
    assert not set(first.traces["trace_id"]) & set(second.traces["trace_id"])
