import gzip
import json
import tracemalloc
from datetime import datetime, timezone

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


@pytest.mark.parametrize("lines", [None, 60], ids=["whole-day", "small-file"])  # a small one breaks within the format sniff's 64 KB
@pytest.mark.parametrize("compress", [gzip.compress, _zstd_frames], ids=["gzip", "zstd"])
def test_a_compressed_file_is_read_and_a_truncated_one_quarantined_where_it_breaks(tmp_path, compress, lines):
    day = b"".join((LANDING / "traces-2026-10-03.jsonl").read_bytes().splitlines(keepends=True)[:lines])
    (tmp_path / "day3.jsonl").write_bytes(day)
    packed = compress(day)
    (tmp_path / "day3.jsonl.packed").write_bytes(packed)
    (tmp_path / "day3-cut.jsonl").write_bytes(packed[: len(packed) // 2])  # compressed whatever the name
    plain = ingest.read_calls([tmp_path / "day3.jsonl"])
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


def test_a_sealed_file_is_read_a_token_at_a_time_whether_sealed_per_call_or_whole(tmp_path, monkeypatch):
    from pipeline import rawzone

    key = rawzone.new_encryption_key()
    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, key)
    lines = (LANDING / "traces-2026-10-01.jsonl").read_text().splitlines(keepends=True)[:12]
    per_call, whole = tmp_path / "router-new.jsonl.enc", tmp_path / "router-old.jsonl.enc"
    per_call.write_bytes(b"".join(rawzone.seal(line.encode(), key) + b"\n" for line in lines))  # the router now
    whole.write_bytes(rawzone.seal("".join(lines).encode(), key))  # the router before: one token
    for path in (per_call, whole):
        read = ingest.read_calls([path])
        plain = ingest.read_calls([LANDING / "traces-2026-10-01.jsonl"])
        assert len(read.traces) + len(read.quarantine) == 12
        assert list(read.traces["trace_id"]) == [t for t in plain.traces["trace_id"] if t in set(read.traces["trace_id"])]
    per_call.write_bytes(per_call.read_bytes() + b"gAAAAAnot-a-token\n")  # a damaged token: the calls before it are kept
    damaged = ingest.read_calls([per_call])
    assert len(damaged.traces) + len(damaged.quarantine) == 13
    assert "cannot be decrypted" in damaged.quarantine["reason"].iloc[-1]


def test_the_router_trace_log_and_collection_hold_one_call_in_memory_not_the_file(tmp_path, monkeypatch):
    """Sixty calls of 1 MiB each: the writer holds one call at a time (its JSON and its Fernet
    token: under 24 MiB for a 1 MiB call), collection's reader one sealed token at a time, and the
    raw zone's writer writes parts once its rows hold `max_buffered_bytes` (8 MiB here): under
    48 MiB in all. Measured the same with 40 and 80 calls: the peaks do not grow with the file."""
    from pipeline import rawzone
    from pipeline.router import TraceWriter, trace_record

    key = rawzone.new_encryption_key()
    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, key)
    record = json.loads((LANDING / "traces-2026-10-01.jsonl").read_text().splitlines()[0])
    answer = record["response"]["choices"][0]["message"]
    writer = TraceWriter(tmp_path / "landing", pseudonym_key=None, encryption_key=key)
    mib = 1024 * 1024
    tracemalloc.start()
    for i in range(60):
        request = {"messages": [{"role": "user", "content": f"{i} " + "y" * mib}]}
        writer.write(trace_record(request, answer, trace_id=f"big-{i}", called_at=datetime(2026, 10, 1, tzinfo=timezone.utc),
                                  model="gpt-4.1", finish_reason="stop", usage=None, latency_ms=1.0, origin={},
                                  decision={}, agent=None))
        del request
    writer.close()
    _, writing_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    [written] = writer.written_files
    assert written.stat().st_size > 60 * mib

    writer = rawzone.RawZoneWriter(tmp_path / "raw", "run-1", {rawzone.TRACES: ingest.TRACE_SCHEMA,
                                                               rawzone.QUARANTINE: ingest.QUARANTINE_SCHEMA},
                                   key, max_buffered_bytes=8 * mib)
    from pipeline.ledger import Ledger

    stats = ingest.ingest(ingest.plan([written]), writer, Ledger(":memory:"))
    writer.flush()
    _, reading_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert stats.calls == 60 and writer.parts_written >= 6
    assert writing_peak < 24 * mib and reading_peak < 48 * mib, (writing_peak / mib, reading_peak / mib)


def test_a_link_that_leaves_the_landing_folder_is_refused_and_counted_never_read(tmp_path):
    landing, outside = tmp_path / "landing", tmp_path / "elsewhere"
    (landing / "nested").mkdir(parents=True)
    outside.mkdir()
    good = (LANDING / "traces-2026-10-01.jsonl").read_bytes().splitlines(keepends=True)
    (landing / "day1.jsonl").write_bytes(b"".join(good[:5]))
    (outside / "secret.jsonl").write_bytes(b"".join(good[5:10]))  # readable by the pipeline's user, not landed
    (landing / "nested" / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (landing / "inside.jsonl").symlink_to(landing / "day1.jsonl")  # a link within the folder is read
    result = ingest.collect(landing, tmp_path / "raw", ingest.IngestOptions(), None, 30)
    quarantine = ingest.stored_quarantine(tmp_path / "raw", None)
    refused = quarantine[quarantine["reason"] == ingest.OUTSIDE_LANDING]
    assert list(refused["source_file"]) == [str(landing / "nested" / "link.jsonl")] and list(refused["source_line"]) == [0]
    stored = ingest.stored_traces(tmp_path / "raw", None)
    logged = ingest.read_calls([landing / "day1.jsonl"]).traces
    assert sorted(stored["trace_id"]) == sorted(logged["trace_id"]) and result.stats.repeated == len(logged)
    assert ingest.readable_landing_files(landing)  # the pre-run check does not open the link either


def test_a_document_item_over_the_size_limit_is_refused_without_being_held(tmp_path):
    """A 48 MiB item of a JSON document (the limit is max_record_bytes, 16 MiB): refused with its
    reason, and never made a Python object (before, the format scan alone made its 48 MiB string).
    The parser's own buffer, which tracemalloc does not see, holds at most the limit."""
    lines = [json.loads(line) for line in (LANDING / "traces-2026-10-01.jsonl").read_text().splitlines()[:3]]
    big = json.loads(json.dumps(lines[1]))
    big["request"]["messages"][-1]["content"] = "z" * (48 * 1024 * 1024)
    path = tmp_path / "export.json"
    path.write_text(json.dumps([lines[0], big, lines[2]], indent=1))  # one JSON document, items over many lines
    del big
    tracemalloc.start()
    result = ingest.read_calls([path])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert list(result.traces["trace_id"]) == [lines[0]["id"]]
    [refused] = result.quarantine.to_dict("records")
    assert refused["source_line"] == 2 and refused["reason"] == (
        f"document item 2 (or a value in it) is longer than {16 * 1024 * 1024} bytes; the rest of the document is not read")
    assert peak < 4 * 1024 * 1024, peak / 1024 / 1024  # 0.45 MiB measured: no Python object of the item is made
