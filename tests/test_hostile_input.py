"""Hostile input: one bad line, or one call a router client planted, never stops a run, and no field
of a call escapes scrubbing (issue 30, items 1 and 2)."""

import copy
import io
import json
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings

from pipeline import curate, ingest, rawzone
from pipeline.router import TraceWriter, trace_record
from tests.hostile_records import CANARY_EMAIL, nested, calls_that_pass_collection, good_records, hostile_lines

GOOD = good_records(6)

# what collection says of each hostile case (the start of its quarantine reason)
EXPECTED_REASONS = {
    "time-year-9999": "created_at 9999-12-31 is outside the years 2000-2199",
    "time-epoch-1e20": "created_at is not a time",
    "time-epoch-zero": "created_at 1970-01-01 is outside the years 2000-2199",
    "arguments-nested-700-deep": "tool-call arguments: JSON nested deeper than 100 levels",
    "lone-surrogate": "a string holds a lone surrogate (not Unicode text)",
    "array-nested-15000-deep": "JSON nested too deeply to read",
    "object-nested-12000-deep": "JSON nested too deeply to read",
}


def _write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def _collect(landing, raw_root):
    return ingest.collect(landing, raw_root, ingest.IngestOptions(), None, 30)


def test_hostile_lines_among_good_ones_never_stop_collection_or_curation_on_any_run(tmp_path):
    good = good_records(30)
    hostile = hostile_lines(good[0])
    passing = calls_that_pass_collection(good[1])
    landing, raw = tmp_path / "landing", tmp_path / "raw"
    landing.mkdir()
    lines = [json.dumps(r).encode() for r in good[:15]] + [line for _, line in hostile] + \
            [json.dumps(r).encode() for r in [*good[15:], *passing]]
    _write_lines(landing / "day-1.jsonl", lines)

    first = _collect(landing, raw)
    quarantine = ingest.stored_quarantine(raw, None).sort_values("source_line")
    reasons = dict(zip(quarantine["source_line"], quarantine["reason"]))
    for line_number, (name, _) in enumerate(hostile, start=16):
        if name in EXPECTED_REASONS:
            assert reasons[line_number].startswith(EXPECTED_REASONS[name]), name
    # counts that are not finite are no counts: the call is kept without them
    assert first.stats.calls == 30 + len(passing) + 1 and first.stats.quarantined == len(EXPECTED_REASONS)

    # a later run with more of the same lands, and the run completes again
    _write_lines(landing / "day-2.jsonl", [line for _, line in hostile_lines(good[2])])
    second = _collect(landing, raw)
    # (its call with usage that is not finite reuses a trace id with other content: quarantined too)
    assert second.stats.files_unchanged == 1 and second.stats.quarantined == len(EXPECTED_REASONS) + 1

    stored = ingest.stored_traces(raw, None)
    usage = stored[stored["trace_id"] == "hostile-usage"].iloc[0]
    assert pd.isna(usage["prompt_tokens"]) and pd.isna(usage["latency_ms"])
    result = curate.curate(stored)
    curated_ids = set(result.curated["trace_id"])
    assert {r["id"] for r in [*good, *passing]} <= curated_ids  # every good call curated
    for column in curate.CALL_JSON_COLUMNS:
        assert not result.curated[column].fillna("").str.contains(CANARY_EMAIL, regex=False).any()
    huge = result.curated.set_index("trace_id").loc["hostile-huge-message", "messages"]
    assert huge.count("<EMAIL_ADDRESS_1>") == 2  # the one across a window's edge too


def test_a_router_client_cannot_plant_a_call_that_stops_collection_or_curation(tmp_path, monkeypatch):
    key = rawzone.new_encryption_key()
    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, key)  # collection opens the sealed trace log with it
    writer = TraceWriter(tmp_path / "landing", pseudonym_key=None, encryption_key=key)
    base = good_records(1)[0]
    answer = base["response"]["choices"][0]["message"]
    huge = calls_that_pass_collection(base)[0]["request"]
    deep = {"messages": [{"role": "user", "content": "look it up"}]}
    deep_answer = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps(nested(700, "x"))}}]}
    surrogate_answer = {"role": "assistant", "content": "ok \ud800"}
    served = [("good", base["request"], answer), ("huge", huge, answer), ("deep", deep, deep_answer),
              ("surrogate", base["request"], surrogate_answer)]
    for trace_id, request, message in served:
        writer.write(trace_record(request, message, trace_id=trace_id, called_at=pd.Timestamp("2026-10-01T10:00:00Z"),
                                  model="gpt-4.1", finish_reason="stop", usage=None, latency_ms=5.0, origin={},
                                  decision={}, agent=None))
    writer.close()

    raw = tmp_path / "raw"
    result = ingest.collect(tmp_path / "landing", raw, ingest.IngestOptions(), key, 30)
    assert result.stats.calls == 2 and result.stats.quarantined == 2
    assert sorted(ingest.stored_quarantine(raw, key)["reason"]) == [
        "a string holds a lone surrogate (not Unicode text)", "tool-call arguments: JSON nested deeper than 100 levels"]
    curated = curate.curate(ingest.stored_traces(raw, key)).curated
    assert set(curated["trace_id"]) == {"good", "huge"}


def _stored_call(trace_id: str, messages, response, tools=None) -> dict:
    return {"trace_id": trace_id, "called_at": pd.Timestamp("2026-10-01T10:00:00Z"), "model": "gpt-4.1",
            "answered_by": None, "messages": json.dumps(messages), "tools": json.dumps(tools) if tools else None,
            "response_message": json.dumps(response), "finish_reason": "stop", "feedback": None,
            "agent": None, "step_tag": None}


def test_a_stored_call_no_stage_can_take_is_set_aside_with_its_reason_not_retried_forever():
    # calls an older version collected before these checks existed
    deep_arguments = nested(700, "x")
    deep_content = nested(150, "x")
    answer = {"role": "assistant", "content": "Sure."}
    stored = pd.DataFrame([
        _stored_call("good", [{"role": "user", "content": "Book a table for two."}], answer),
        _stored_call("deep-arguments", [{"role": "user", "content": "Look it up."}], {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps(deep_arguments)}}]}),
        _stored_call("deep-content", [{"role": "user", "content": deep_content}], answer),
    ])
    result = curate.curate(stored)
    assert list(result.curated["trace_id"]) == ["good"]
    reasons = dict(zip(result.removed["trace_id"], result.removed["reason"]))
    assert reasons == {
        "deep-arguments": "cannot be curated: tool-call arguments: JSON nested deeper than 100 levels",
        "deep-content": "cannot be curated: messages: JSON nested deeper than 100 levels",
    }
    assert result.counts()["unusable"] == 2


@pytest.mark.parametrize("processes", [1, 2])
def test_a_text_the_analysis_raises_on_costs_only_the_call_that_holds_it(monkeypatch, processes):
    analyze = curate._find_in_texts

    def failing_on_one_text(texts, *args):
        if any("BOOM" in text for text in texts):
            raise ValueError("the analysis cannot take this text")
        return analyze(texts, *args)

    monkeypatch.setattr(curate, "_find_in_texts", failing_on_one_text)
    monkeypatch.setattr(curate.Scrubber, "MIN_TEXTS_FOR_WORKERS", 1)  # the worker processes' path too
    answer = {"role": "assistant", "content": "Done."}
    stored = pd.DataFrame([_stored_call(f"call-{i}", [{"role": "user", "content": f"Email Ada at ada{i}@example.com."}], answer)
                           for i in range(6)] + [_stored_call("boom", [{"role": "user", "content": "BOOM"}], answer)])
    scrubbed = curate.scrub_calls(stored, curate.Scrubber(processes=processes))
    assert list(scrubbed["unscrubbed"].fillna("")) == [""] * 6 + ["could not be scrubbed (ValueError: the analysis cannot take this text)"]
    assert not scrubbed["messages"].iloc[:6].str.contains("@example.com").any()


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.text(alphabet="ab ", min_size=0, max_size=400), min_size=1, max_size=400))
def test_long_texts_are_analyzed_in_windows_that_hold_every_short_span_whole(words):
    text = " ".join(words) * 3
    windows = curate.text_windows(text)
    assert windows[0][0] == 0 and windows[-1][0] + len(windows[-1][1]) == len(text)
    for (start, window), (next_start, _) in zip(windows, windows[1:]):
        assert text[start:start + len(window)] == window
        assert next_start <= start + len(window) - curate.WINDOW_OVERLAP // 2  # any span this short lies in one window
    assert all(len(window) <= curate.WINDOW_CHARS for _, window in windows)


def test_every_string_a_call_carries_to_a_later_stage_is_scrubbed_and_swept():
    email, key, phone = "ada.lovelace77@gmail.com", "sk-proj-Zq3vXk9PmW2rTy7uLb4nHs8d", "(205) 638-4234"
    inline_image = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"
    messages = [
        {"role": "system", "content": "You help guests."},
        {"role": "user", "name": email, "content": [
            {"type": "text", "text": "See the picture."},
            {"type": "image_url", "image_url": {"url": f"https://files.example.com/a.png?token={key}"}},
            {"type": "image_url", "image_url": {"url": inline_image}},
        ]},
        {"role": "assistant", "content": None, "function_call": {"name": "notify", "arguments": json.dumps({"to": email})}},
        {"role": "function", "name": "notify", "content": {"text": f"sent to {email}"}},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": f"I cannot call {phone}."}]},
    ]
    answer = {"role": "assistant", "content": None, "reasoning_content": f"The guest's phone is {phone}.",
              "audio": {"id": "audio_1", "transcript": f"I will write to {email}."},
              "tool_calls": [{"id": "call_1", "type": "function",
                              "function": {"name": "send_email", "arguments": json.dumps({email: "primary", "body": "Hi"})}}]}
    tools = [{"type": "function", "function": {"name": "send_email", "description": f"Sends mail, copies {email}.",
                                               "parameters": {"type": "object", "properties": {"body": {"type": "string"}}}}}]
    call = _stored_call("every-field", messages, answer, tools) | {"agent": f"concierge of {email}", "step_tag": f"reply {key}"}
    stored = pd.DataFrame([call])

    found = curate.sweep_leaks(stored)["every-field"]  # before scrubbing the sweep, and so the blocking check, sees each
    for field in ("messages[1].name", "messages[1].content[1].image_url.url", "messages[2].function_call.arguments.to",
                  "messages[3].content.text", "messages[4].content[0].refusal", "response.reasoning_content",
                  "response.audio.transcript", "response.tool_calls[0].function.arguments.ada.lovelace77@gmail.com (key)",
                  "tools[0].function.description", "agent", "step_tag"):
        assert any(place.startswith(field + ":") for place in found), field

    result = curate.curate(stored)
    row = result.curated.iloc[0]
    assert curate.sweep_leaks(result.curated) == {}
    for column in ("messages", "tools", "response_message", "agent", "step_tag"):
        for canary in (email, key, phone):
            assert canary not in row[column], (column, canary)
    scrubbed_messages, scrubbed_answer = json.loads(row["messages"]), json.loads(row["response_message"])
    assert [m["role"] for m in scrubbed_messages] == [m["role"] for m in messages]  # structure as logged
    assert scrubbed_messages[1]["content"][2]["image_url"]["url"] == inline_image
    assert scrubbed_messages[2]["function_call"]["name"] == "notify"
    assert scrubbed_answer["tool_calls"][0]["function"]["name"] == "send_email"
    assert json.loads(scrubbed_answer["tool_calls"][0]["function"]["arguments"]) == {"<EMAIL_ADDRESS_1>": "primary", "body": "Hi"}
    assert json.loads(row["tools"])[0]["function"]["description"] == "Sends mail, copies <EMAIL_ADDRESS_1>."


def _damaged(record: dict, path: list, value) -> dict:
    """A copy of `record` with the value at `path` (keys and indexes, as far as they lead) replaced."""
    record = copy.deepcopy(record)
    if isinstance(value, tuple):
        value = nested(value[1], "x")
    node = record
    for step in path[:-1]:
        child = node[step] if isinstance(node, dict) and step in node else node[step % len(node)] if isinstance(node, list) and node else None
        if not isinstance(child, (dict, list)):
            break
        node = child
    if isinstance(node, dict):
        node[path[-1] if isinstance(path[-1], str) else "extra"] = value
    elif node:
        node[path[-1] % len(node) if isinstance(path[-1], int) else 0] = value
    return record


hostile_values = st.one_of(
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 10**400, "\ud800", "x\udfffy", 1e300, -1e300]),
    st.integers(min_value=90, max_value=800).map(lambda depth: ("nested", depth)),  # built in the test: readable when it fails
    st.sampled_from(["9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z"]),
)
record_paths = st.lists(st.one_of(st.sampled_from(["request", "response", "messages", "choices", "message", "content",
                                                   "usage", "created_at", "tool_calls", "function", "arguments",
                                                   "metadata", "latency_ms", "tools"]), st.integers(0, 3)),
                        min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damage=st.lists(st.tuples(record_paths, hostile_values), min_size=1, max_size=4))
def test_generated_hostile_records_among_good_ones_always_finish_keeping_every_good_call(damage):
    good = GOOD[:6]
    hostile = [_damaged(good[i % len(good)], path, value) | {"id": f"hostile-{i}"} for i, (path, value) in enumerate(damage)]
    lines = [json.dumps(r, allow_nan=True).encode() for r in [*good, *hostile]]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "landing.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        collected = ingest.read_calls([path])
    assert len(collected.traces) + len(collected.quarantine) == len(lines)
    assert (collected.quarantine["reason"].str.len() > 0).all()
    result = curate.curate(collected.traces, cache=None)
    assert {r["id"] for r in good} <= set(result.curated["trace_id"])
    kept = set(result.curated["trace_id"]) | set(result.removed["trace_id"])
    assert kept == set(collected.traces["trace_id"])  # every collected call is curated or removed with a reason


def test_input_that_only_looks_dangerous_passes_every_new_limit():
    """Each limit beside its hostile case: nesting just under 100 levels, times at the ends of
    2000-2199, characters outside the basic plane (a surrogate pair in JSON), and a long message
    are all kept and curated."""
    base = good_records(1)[0]

    def variant(name, change):
        record = json.loads(json.dumps(base))
        record["id"] = f"fine-{name}"
        change(record)
        return json.dumps(record).encode()

    def answer_with_arguments(r):
        r["response"]["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": json.dumps(nested(95, "x"))}}]}

    lines = [
        variant("arguments-95-deep", answer_with_arguments),
        variant("first-moment-of-2000", lambda r: r.update(created_at="2000-01-01T00:00:00Z")),
        variant("last-second-of-2199", lambda r: r.update(created_at="2199-12-31T23:59:59Z")),
        variant("epoch-seconds", lambda r: r.update(created_at=946684800)),  # 2000-01-01
        variant("emoji", lambda r: r["request"]["messages"][-1].update(content="thanks \U0001F600 \U00010348")),
        variant("long-message", lambda r: r["request"]["messages"][-1].update(content="word " * 60_000)),
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fine.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")  # json.dumps writes the emoji as a surrogate pair escape
        assert b"\\ud83d\\ude00" in path.read_bytes()
        collected = ingest.read_calls([path])
    assert collected.quarantine.empty and len(collected.traces) == len(lines)
    curated = curate.curate(collected.traces)
    assert set(curated.removed["reason"]) <= {"exact duplicate", "near duplicate"}
    assert "thanks \U0001F600 \U00010348" in curated.curated.set_index("trace_id").loc["fine-emoji", "messages"]


def test_a_sealed_chunk_over_its_limit_is_refused_and_one_at_it_is_read():
    key = rawzone.new_encryption_key()
    token = rawzone.seal(b'{"a": 1}\n', key)
    read = list(rawzone.unsealed_chunks(io.BytesIO(token + b"\n"), "log.enc", key, max_token_bytes=len(token) + 1))
    assert read == [b'{"a": 1}\n']
    with pytest.raises(rawzone.RawZoneKeyError, match="holds a sealed chunk over 20 bytes: not read"):
        list(rawzone.unsealed_chunks(io.BytesIO(token + b"\n"), "log.enc", key, max_token_bytes=20))
