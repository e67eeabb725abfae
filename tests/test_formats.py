"""Each log format an agent may already write, read from fixtures written from its public spec."""

import json

import pytest

from pipeline import calls, ingest
from pipeline.formats import otel_genai
from tests.conftest import FORMATS


def _read(*names, **options):
    return ingest.read_calls([FORMATS / name for name in names], ingest.IngestOptions(**options))


def _call(result, trace_id) -> dict:
    rows = result.traces[result.traces["trace_id"] == trace_id]
    assert len(rows) == 1, f"{trace_id} not ingested exactly once"
    return rows.iloc[0].to_dict()


def test_every_fixture_is_detected_as_its_format():
    planned = {f.path.name: f.format for f in ingest.plan(sorted(p for p in FORMATS.iterdir() if p.suffix not in (".md", ".py")))}
    assert {f.path.name: f.layout for f in ingest.plan([FORMATS / "langsmith_runs.parquet"])} == {"langsmith_runs.parquet": "table"}
    assert planned == {
        "batch_2026-10-08_input.jsonl": "openai_batch_input",
        "batch_2026-10-08_output.jsonl": "openai_batch",
        "canonical.jsonl": "canonical",
        "langfuse_observations_page.json": "langfuse",
        "langfuse_traces.jsonl": "langfuse",
        "langsmith_runs.parquet": "langsmith",
        "langfuse_v2_observations_page.json": "langfuse",
        "langfuse_blob_observations_v2.jsonl": "langfuse",
        "openai_chat_multiturn.jsonl": "openai_chat",
        "otel_genai_export.json": "otel_genai",
        "otel_genai_logs.jsonl": "otel_genai",
        "otel_genai_logs_no_content.jsonl": "otel_genai",
        "otel_genai_spans.jsonl": "otel_genai",
    }


def test_openai_chat_keeps_multi_turn_tool_history_and_the_user_field():
    result = _read("openai_chat_multiturn.jsonl")
    call = _call(result, "chatcmpl-mt-0001")
    messages = json.loads(call["messages"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == "get_opening_hours"
    assert messages[3]["tool_call_id"] == "call_s1"
    assert [t["function"]["name"] for t in json.loads(call["tools"])] == ["get_opening_hours", "book_treatment"]
    assert calls.parse_tool_calls(calls.baseline_answer(call["response_message"]))[0]["name"] == "book_treatment"
    assert json.loads(call["origin"]) == {
        "client_ip": "192.0.2.15", "session_id": "sess-mt-1", "tenant_id": "lumen-paris", "user": "guest-4410"
    }
    # no created_at: the response's own `created` time is used
    assert str(_call(result, "chatcmpl-mt-0002")["called_at"]) == "2026-10-12 18:03:20+00:00"


def test_openai_batch_output_is_joined_with_its_input_file():
    result = _read("batch_2026-10-08_input.jsonl", "batch_2026-10-08_output.jsonl")
    tool = _call(result, "chatcmpl-batch-tool-1")
    assert json.loads(tool["messages"])[0]["content"].startswith("What's the weather in Boston")
    assert json.loads(tool["tools"])[0]["function"]["name"] == "get_current_weather"
    assert tool["finish_reason"] == "tool_calls" and tool["prompt_tokens"] == 82
    assert str(tool["called_at"]) == "2026-10-09 00:00:00+00:00"
    intent = _call(result, "chatcmpl-batch-intent-1")
    assert json.loads(intent["response_message"])["content"] == "change_booking, breakfast"
    assert json.loads(intent["origin"])["tenant_id"] == "acme-hotels"
    assert result.stats.batch_input_files == 1
    assert result.stats.skipped == {"batch request to /v1/embeddings": 1}
    reasons = dict(zip(result.quarantine["source_line"], result.quarantine["reason"]))
    assert reasons[4].startswith("batch request failed") and "batch_expired" in reasons[4]
    assert reasons[5].startswith("custom_id not in the batch input file ('unknown-7'")


def test_openai_batch_output_without_its_input_is_quarantined_not_dropped():
    result = _read("batch_2026-10-08_output.jsonl")
    assert result.traces.empty
    assert (result.quarantine["reason"].str.contains("no batch input file to join with")).sum() == 4
    assert result.stats.quarantined == 5  # the failed request keeps its own reason


def test_otel_genai_spans_from_attributes_and_from_events():
    result = _read("otel_genai_spans.jsonl")
    modern = _call(result, "otel-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174")
    messages = json.loads(modern["messages"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "get_current_weather", "arguments": '{"location": "Paris"}'}
    assert json.loads(messages[3]["content"]) == {"temperature_c": 18, "sky": "cloudy"}
    assert json.loads(modern["response_message"])["content"] == "It is 18°C and cloudy in Paris."
    assert json.loads(modern["tools"])[0]["function"]["name"] == "get_current_weather"
    assert (modern["model"], modern["prompt_tokens"], modern["completion_tokens"]) == ("gpt-4.1", 96, 14)
    assert modern["latency_ms"] == 850.0 and modern["agent"] == "concierge-agent"
    assert json.loads(modern["origin"]) == {
        "client.address": "203.0.113.42", "gen_ai.conversation.id": "conv-4471", "user.id": "guest-1138"
    }
    assert modern["session_id"] == "conv-4471"

    legacy = _call(result, "otel-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331")
    assert [m["role"] for m in json.loads(legacy["messages"])] == ["system", "user"]
    assert json.loads(legacy["response_message"]) == {"role": "assistant", "content": "late_checkout"}
    assert legacy["session_id"] == "sess-ev-9"

    assert result.stats.skipped == {"invoke_agent span": 1, "execute_tool span": 1, "non-GenAI span": 1,
                                    otel_genai.SPAN_WITHOUT_CONTENT: 1}
    assert list(result.quarantine["reason"]) == ["span b7ad6b7169203332: span status is ERROR: Request timed out."]


def test_otel_content_sent_as_log_records_by_the_official_openai_instrumentation_makes_one_call_per_span():
    result = _read("otel_genai_logs.jsonl")
    assert result.stats.skipped == {otel_genai.SPAN_WITHOUT_CONTENT: 2}  # the spans: their log records hold the calls
    assert len(result.quarantine) == 0 and len(result.traces) == 2
    spans = [s for line in (FORMATS / "otel_genai_logs.jsonl").read_text().splitlines() if "resourceSpans" in line
             for r in json.loads(line)["resourceSpans"] for scope in r["scopeSpans"] for s in scope["spans"]]
    # each call is named by its span, as a span with content would be
    assert set(result.traces["trace_id"]) == {f"otel-{s['traceId']}-{s['spanId']}" for s in spans}
    intent = result.traces[result.traces["finish_reason"] == "stop"].iloc[0]
    assert json.loads(intent["messages"]) == [
        {"role": "system", "content": "You are the intent tagger of the Harbor Hotels concierge agent."},
        {"role": "user", "content": "I want to change my booking"}]
    assert json.loads(intent["response_message"]) == {"role": "assistant", "content": "booking, change"}
    assert intent["agent"] == "concierge-agent"
    tool = result.traces[result.traces["finish_reason"] == "tool_calls"].iloc[0]
    assert json.loads(tool["response_message"])["tool_calls"][0]["function"]["name"] == "get_opening_hours"


def test_otel_log_records_without_content_are_quarantined_with_the_setting_that_captures_it():
    result = _read("otel_genai_logs_no_content.jsonl")
    assert len(result.traces) == 0 and len(result.quarantine) == 2
    assert all("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true" in r for r in result.quarantine["reason"])


def test_a_pretty_printed_otlp_document_is_streamed_and_adds_nothing_twice():
    result = _read("otel_genai_spans.jsonl", "otel_genai_export.json")
    assert len(result.traces) == 2  # the document holds the same span as the first line
    assert result.stats.repeated == 1


def test_langfuse_traces_and_observation_pages():
    result = _read("langfuse_traces.jsonl", "langfuse_observations_page.json")
    extraction = _call(result, "obs-7d1e0c2a")
    assert json.loads(extraction["messages"])[1]["content"].startswith("Two of us arriving")
    assert (extraction["prompt_tokens"], extraction["completion_tokens"], extraction["latency_ms"]) == (51, 19, 790.0)
    assert json.loads(extraction["origin"]) == {"sessionId": "sess-lf-31", "userId": "guest-2207"}
    assert extraction["agent"] == "concierge"
    tool_call = _call(result, "obs-7d1e0c2b")
    assert json.loads(tool_call["tools"])[0]["function"]["name"] == "book_table"
    assert calls.parse_tool_calls(calls.baseline_answer(tool_call["response_message"])) == [
        {"name": "book_table", "arguments": {"party": 2, "time": "19:30"}}
    ]
    plain = _call(result, "obs-8a2f")
    assert json.loads(plain["messages"]) == [{"role": "user", "content": "Classify: 'my card was charged twice'"}]
    assert json.loads(plain["response_message"]) == {"role": "assistant", "content": "billing_dispute"}
    assert _call(result, "obs-9b00")["session_id"] == "sess-lf-40"
    assert result.stats.skipped == {"SPAN observation": 1, "EVENT observation": 2}
    assert list(result.quarantine["reason"]) == ["observation obs-7d1e0c2c: generation failed: Rate limit reached for gpt-4.1"]


def test_canonical_jsonl_keeps_its_origin_fields_and_normalizes_time():
    result = _read("canonical.jsonl", origin_fields=("session_id", "ip"))
    first = _call(result, "canon-0001")
    assert json.loads(first["origin"]) == {"ip": "198.51.100.7", "session_id": "sess-canon-1"}  # not user_id, not build
    assert (first["feedback"], first["latency_ms"], first["total_tokens"]) == ("correct", 512.0, 36)
    assert str(_call(result, "canon-0002")["called_at"]) == "2026-10-11 05:31:00+00:00"
    assert list(result.quarantine["reason"]) == ["request.messages is empty"]


def test_origin_fields_are_pseudonymized_with_the_key():
    result = _read("openai_chat_multiturn.jsonl", "otel_genai_spans.jsonl", pseudonym_key="k1")
    text = result.traces[["session_id", "origin"]].to_json()
    for logged in ("sess-mt-1", "guest-4410", "192.0.2.15", "lumen-paris", "203.0.113.42", "conv-4471"):
        assert logged not in text
    sessions = result.traces.set_index("trace_id")["session_id"]
    assert sessions["chatcmpl-mt-0001"] == sessions["chatcmpl-mt-0002"]  # one session still groups
    assert sessions.str.startswith("anon-").all()


def test_a_format_can_be_named_in_config_and_a_wrong_name_is_refused(tmp_path):
    renamed = tmp_path / "export.log"
    renamed.write_bytes((FORMATS / "canonical.jsonl").read_bytes())
    planned = ingest.plan([renamed], ingest.IngestOptions(formats={"*.log": "canonical"}))
    assert planned[0].format == "canonical"
    with pytest.raises(ValueError, match="'helicone' .* is not one of: canonical, openai_batch"):
        ingest.plan([renamed], ingest.IngestOptions(formats={"*.log": "helicone"}))


def _router_served_copies(tmp_path) -> dict[str, str]:
    """The fixtures' calls, rewritten as an agent's logs record a call the router's SLM answered
    (response model `slm-router/...`, or its `X-SLM-Served-By: slm` header); file name -> how."""
    written = {}
    chat = [json.loads(line) for line in (FORMATS / "openai_chat_multiturn.jsonl").read_text().splitlines()]
    by_model, by_header, by_fallback = (json.loads(json.dumps(chat[0])) for _ in range(3))
    by_model["response"]["model"] = "slm-router/intent@v0001"
    by_header["response_headers"] = {"X-SLM-Served-By": "slm", "X-SLM-Route": "intent@v0002"}
    by_fallback["response_headers"] = {"X-SLM-Served-By": "fallback"}  # the LLM answered: kept
    for name, record in {"chat_model": by_model, "chat_header": by_header, "chat_fallback": by_fallback}.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({**record, "id": name}) + "\n")
        written[name] = name
    otel = json.loads((FORMATS / "otel_genai_spans.jsonl").read_text().splitlines()[0])
    spans = otel["resourceSpans"][0]["scopeSpans"][0]["spans"]
    chat_span = next(s for s in spans if any(a["key"] == "gen_ai.operation.name" and a["value"]["stringValue"] == "chat"
                                             for a in s["attributes"]))
    chat_span["attributes"].append({"key": "http.response.header.x-slm-served-by",
                                    "value": {"arrayValue": {"values": [{"stringValue": "slm"}]}}})
    (tmp_path / "otel.jsonl").write_text(json.dumps(otel) + "\n")
    written["otel"] = f"otel-{chat_span['traceId']}-{chat_span['spanId']}"
    canonical = json.loads((FORMATS / "canonical.jsonl").read_text().splitlines()[0])
    (tmp_path / "canonical.jsonl").write_text(json.dumps({**canonical, "trace_id": "canonical",
                                                          "answered_by": "slm-router/booking@v0003"}) + "\n")
    written["canonical"] = "canonical"
    return written


def test_calls_the_routers_slm_answered_are_recognized_in_the_agents_own_logs_and_kept_out(tmp_path):
    from pipeline import curate

    ids = _router_served_copies(tmp_path)
    traces = ingest.read_calls(sorted(tmp_path.iterdir())).traces.set_index("trace_id")
    assert traces.loc[ids["chat_model"], "answered_by"] == "slm-router/intent@v0001"
    assert traces.loc[ids["chat_model"], "model"] == "gpt-4.1"  # what the agent asked for
    assert traces.loc[ids["chat_header"], "answered_by"] == "slm-router/intent@v0002"
    assert traces.loc[ids["otel"], "answered_by"] == "slm-router/unknown route"
    reasons = {name: curate.unusable_reason(row["response_message"], row["finish_reason"], row["model"], row["answered_by"])
               for name, row in ((name, traces.loc[i]) for name, i in ids.items())}
    removed = "answered by the router's SLM, not the LLM"
    assert reasons == {"chat_model": removed, "chat_header": removed, "chat_fallback": None, "otel": removed,
                       "canonical": removed}


def test_langfuse_current_api_pages_and_blob_storage_export_rows_are_read_like_the_legacy_api():
    page = _read("langfuse_v2_observations_page.json")
    assert sorted(page.traces["trace_id"]) == ["obs-v2-gen-1", "obs-v2-gen-2"] and page.stats.skipped == {"SPAN observation": 1}
    texts = _call(page, "obs-v2-gen-1")  # input and output sent as JSON text
    assert [m["role"] for m in json.loads(texts["messages"])] == ["system", "user"]
    assert json.loads(texts["response_message"]) == {"role": "assistant", "content": "late_checkout"}
    assert texts["model"] == "gpt-4.1" and texts["prompt_tokens"] == 41 and texts["session_id"] == "sess-v2-8"

    blob = _read("langfuse_blob_observations_v2.jsonl")
    row = _call(blob, "obs-blob-gen-1")
    assert json.loads(row["messages"])[1] == {"role": "user", "content": "two rooms for 3 nights from friday"}
    assert json.loads(json.loads(row["response_message"])["content"]) == {"rooms": "two", "date_from": "friday"}
    assert row["model"] == "gpt-4.1" and row["agent"] == "concierge" and row["completion_tokens"] == 14
    assert str(row["called_at"]) == "2026-10-11 14:02:07.125000+00:00" and row["latency_ms"] == 786.0
    assert json.loads(row["origin"]) == {"sessionId": "sess-blob-2", "userId": "guest-5120"} and row["session_id"] == "sess-blob-2"
    assert list(blob.quarantine["reason"]) == ["observation obs-blob-gen-2: generation failed: upstream 529 overloaded"]
    assert blob.stats.skipped == {"SPAN observation": 1}


def test_langsmith_bulk_export_parquet_rows_make_one_call_per_llm_run():
    result = _read("langsmith_runs.parquet")
    assert result.stats.skipped == {"chain run": 3}
    assert len(result.traces) == 3  # two OpenAI calls traced by wrap_openai, one LangChain chat model call
    intent = result.traces[result.traces["finish_reason"] == "stop"].iloc[0].to_dict()
    assert json.loads(intent["messages"]) == [
        {"role": "system", "content": "You are the intent tagger of the Harbor Hotels concierge agent."},
        {"role": "user", "content": "I want to change my booking"}]
    assert json.loads(intent["response_message"]) == {"role": "assistant", "content": "booking, change"}
    assert intent["model"] == "gpt-4.1" and intent["answered_by"] == "gpt-4.1-2025-04-14" and intent["prompt_tokens"] == 42
    assert intent["session_id"] == "th-77"  # extra.metadata.thread_id, an origin field
    tool = result.traces[result.traces["finish_reason"] == "tool_calls"].iloc[0].to_dict()
    assert json.loads(tool["tools"])[0]["function"]["name"] == "get_opening_hours"
    assert json.loads(tool["response_message"])["tool_calls"][0]["function"]["name"] == "get_opening_hours"
    [failed] = result.quarantine["reason"]
    assert failed.endswith("run failed: InternalServerError('Error code: 500 - upstream overloaded')")


def test_a_damaged_parquet_file_is_quarantined_not_raised(tmp_path):
    data = (FORMATS / "langsmith_runs.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    result = ingest.read_calls([tmp_path / "cut.parquet"])
    assert len(result.traces) == 0 and len(result.quarantine) == 1
    assert "Parquet file is corrupt or truncated" in result.quarantine["reason"][0]
    # an export of no rows holds no calls and nothing wrong
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(FORMATS / "langsmith_runs.parquet").slice(0, 0), tmp_path / "empty.parquet")
    empty = ingest.read_calls([tmp_path / "empty.parquet"])
    assert len(empty.traces) == 0 and len(empty.quarantine) == 0


def test_a_langchain_chat_model_run_is_read_from_its_serialized_messages():
    result = _read("langsmith_runs.parquet")
    langchain = result.traces[result.traces["session_id"] == "th-78"].iloc[0].to_dict()
    assert json.loads(langchain["messages"]) == [
        {"role": "system", "content": "You are the intent tagger of the Harbor Hotels concierge agent."},
        {"role": "user", "content": "the wifi is down"}]
    assert json.loads(langchain["response_message"]) == {"role": "assistant", "content": "wifi, not_working"}


def test_langfuse_blob_export_rows_written_as_parquet_are_read_alike(tmp_path):
    """Langfuse's blob-storage export writes Parquet by default since 2026-07: the same rows, typed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datetime import datetime, timezone

    rows = [json.loads(line) for line in (FORMATS / "langfuse_blob_observations_v2.jsonl").read_text().splitlines()]
    for row in rows:  # typed columns: times are timestamps in Parquet
        for key in ("start_time", "end_time"):
            row[key] = datetime.fromisoformat(row[key]).replace(tzinfo=timezone.utc)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "observations_v2.parquet")
    as_parquet = ingest.read_calls([tmp_path / "observations_v2.parquet"])
    as_lines = _read("langfuse_blob_observations_v2.jsonl")
    columns = ["trace_id", "called_at", "messages", "response_message", "model", "prompt_tokens", "latency_ms", "origin"]
    assert as_parquet.traces[columns].to_dict("records") == as_lines.traces[columns].to_dict("records")
    assert list(as_parquet.quarantine["reason"]) == list(as_lines.quarantine["reason"])
