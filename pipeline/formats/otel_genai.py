"""OpenTelemetry GenAI spans exported as OTLP/JSON, one span per LLM call.

A record is an OTLP `ExportTraceServiceRequest` (`{"resourceSpans": [{"resource", "scopeSpans":
[{"spans": [...]}]}]}`), one per line as the Collector's file exporter writes, or one document.
A span is an LLM call when its `gen_ai.operation.name` is chat, text_completion or
generate_content; tool, agent and other spans are counted and passed over.

Content is read from either place the GenAI semantic conventions have put it:
- span attributes `gen_ai.input.messages`, `gen_ai.output.messages`, `gen_ai.system_instructions`
  and `gen_ai.tool.definitions` (JSON; messages are `{"role", "parts": [...]}` with text,
  tool_call and tool_call_response parts), or
- span events: `gen_ai.system.message`, `gen_ai.user.message`, `gen_ai.assistant.message`,
  `gen_ai.tool.message` and `gen_ai.choice` (earlier conventions), or `gen_ai.content.prompt` /
  `gen_ai.content.completion` with `gen_ai.prompt` / `gen_ai.completion` attributes.
Model, token usage, finish reasons and the response id come from the `gen_ai.*` attributes; the
agent from `gen_ai.agent.name` or the resource's `service.name`.

The official OpenAI instrumentation (opentelemetry-instrumentation-openai-v2) sends the content as
log records instead, the same events with their fields in the body: an OTLP
`ExportLogsServiceRequest` (`{"resourceLogs": [{"resource", "scopeLogs": [{"logRecords": [...]}]}]}`),
which the Collector's file exporter writes beside the spans. The log records of one span
(`traceId`, `spanId`) make one call, with the id its span would give it; that span, which then
carries no content, is counted and passed over ("chat span without content"). Logged without
content (capture off), the calls are quarantined with the setting that turns it on.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Iterator

from pipeline.formats import MalformedCall, NotACall, Outcome, call_row, json_field, one_call, optional_int, parse_time, require

NAME = "otel_genai"
ITEM_PATHS = ("resourceSpans.item", "resourceLogs.item")
CALL_OPERATIONS = {"chat", "text_completion", "generate_content"}
MESSAGE_EVENTS = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
}
# OTel spells the tool finish reason in the singular; the canonical table uses OpenAI's spelling
FINISH_REASONS = {"tool_call": "tool_calls"}
HEADER_ATTRIBUTE = "http.response.header."  # + the header's name in lower case (HTTP semantic conventions)
CAPTURE_HINT = ("turn on content capture in the instrumentation, e.g. OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true")
# a chat span whose content went to log records (or nowhere, with capture off); its log records make the call
SPAN_WITHOUT_CONTENT = "chat span without content (its log records hold the call, or content capture is off)"


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and (isinstance(record.get("resourceSpans"), list)
                                         or isinstance(record.get("resourceLogs"), list))


def _object(value: Any) -> dict:
    """A part of the record that should be an object: itself, or empty when it is anything else."""
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    """A part of the record that should be a list: itself, or empty when it is anything else."""
    return value if isinstance(value, list) else []


def _finish_reason(value: Any) -> str | None:
    """OpenAI's spelling of a logged finish reason (text; anything else is none)."""
    return FINISH_REASONS.get(value, value) if isinstance(value, str) else None


def any_value(value: Any) -> Any:
    """An OTLP/JSON AnyValue as a plain Python value; a value of the wrong type reads as none."""
    if not isinstance(value, dict):
        return value
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return optional_int(value["intValue"])
    if "doubleValue" in value:
        return value["doubleValue"] if isinstance(value["doubleValue"], (int, float)) else None
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [any_value(v) for v in _list(_object(value["arrayValue"]).get("values"))]
    if "kvlistValue" in value:
        return attributes(_object(value["kvlistValue"]).get("values"))
    return value.get("bytesValue")


def attributes(key_values: Any) -> dict[str, Any]:
    """OTLP key-value pairs as a mapping; pairs whose key is not text are passed over."""
    return {kv["key"]: any_value(kv.get("value")) for kv in _list(key_values)
            if isinstance(kv, dict) and isinstance(kv.get("key"), str)}


def _text(parts: list) -> str:
    return "".join(p.get("content", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


def openai_messages(message: dict) -> list[dict]:
    """One semantic-convention message (`role` + `parts`) as OpenAI chat messages."""
    require(isinstance(message, dict) and isinstance(message.get("role"), str), "a gen_ai message has no role")
    parts = message.get("parts")
    if not isinstance(parts, list):  # already OpenAI-shaped (content / tool_calls)
        return [message]
    role = message["role"]
    if role == "tool":
        return [
            {
                "role": "tool",
                "tool_call_id": p.get("id"),
                "content": p["response"] if isinstance(p.get("response"), str) else json.dumps(p.get("response"), ensure_ascii=False),
            }
            for p in parts
            if isinstance(p, dict) and p.get("type") == "tool_call_response"
        ]
    converted: dict[str, Any] = {"role": role, "content": _text(parts) or None}
    calls = [
        {"id": p.get("id"), "type": "function", "function": {"name": p.get("name"), "arguments": _arguments_text(p.get("arguments"))}}
        for p in parts
        if isinstance(p, dict) and p.get("type") == "tool_call"
    ]
    if calls:
        converted["tool_calls"] = calls
    if converted["content"] is None and not calls:
        converted["content"] = ""
    return [converted]


def openai_tools(definitions: Any) -> list | None:
    if not definitions:
        return None
    require(isinstance(definitions, list), "gen_ai.tool.definitions is not a list")
    return [d if isinstance(d, dict) and "function" in d else {"type": "function", "function": {k: v for k, v in d.items() if k != "type"}} for d in definitions if isinstance(d, dict)]


def _from_attributes(attrs: dict) -> tuple[list, dict | None, str | None]:
    messages: list[dict] = []
    instructions = json_field(attrs.get("gen_ai.system_instructions"), "gen_ai.system_instructions")
    if instructions:
        text = _text(instructions) if isinstance(instructions, list) else str(instructions)
        messages.append({"role": "system", "content": text})
    for message in json_field(attrs.get("gen_ai.input.messages"), "gen_ai.input.messages") or []:
        messages.extend(openai_messages(message))
    outputs = json_field(attrs.get("gen_ai.output.messages"), "gen_ai.output.messages") or []
    first = outputs[0] if isinstance(outputs, list) and outputs else None
    answer = openai_messages(first)[0] if first else None
    return messages, answer, first.get("finish_reason") if isinstance(first, dict) else None


def _from_events(events: list) -> tuple[list, dict | None, str | None]:
    """A span's events."""
    named = [(e.get("name"), attributes(e.get("attributes"))) for e in events if isinstance(e, dict)] if isinstance(events, list) else []
    return _from_named_events(named)


def _from_named_events(named: list[tuple[Any, dict]]) -> tuple[list, dict | None, str | None]:
    """Messages, answer and finish reason from GenAI events, each a name and its fields."""
    messages: list[dict] = []
    answer, finish_reason = None, None
    for name, attrs in named:
        if name in MESSAGE_EVENTS:
            message = {"role": attrs.get("role", MESSAGE_EVENTS[name]), "content": attrs.get("content")}
            if attrs.get("tool_calls"):
                message["tool_calls"] = json_field(attrs["tool_calls"], "tool_calls")
            if attrs.get("id"):
                message["tool_call_id"] = attrs["id"]
            messages.append(message)
        elif name == "gen_ai.choice" and answer is None:
            answer = json_field(attrs.get("message"), "gen_ai.choice message") or {"role": "assistant", "content": attrs.get("content")}
            finish_reason = attrs.get("finish_reason")
        elif name == "gen_ai.content.prompt":
            messages.extend(json_field(attrs.get("gen_ai.prompt"), "gen_ai.prompt") or [])
        elif name == "gen_ai.content.completion" and answer is None:
            completion = json_field(attrs.get("gen_ai.completion"), "gen_ai.completion")
            answer = completion[0] if isinstance(completion, list) and completion else completion
    if isinstance(answer, dict):
        answer = {"role": "assistant", **answer}
    return messages, answer, finish_reason


def _nanos(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise MalformedCall(f"span time is not a number of nanoseconds: {value!r}") from err


def parse_span(span: dict, resource: dict) -> dict:
    attrs = attributes(span.get("attributes"))
    status = span.get("status") if isinstance(span.get("status"), dict) else {}
    require(
        status.get("code") not in (2, "STATUS_CODE_ERROR"),
        f"span status is ERROR: {status.get('message') or 'no message'}",
    )
    messages, answer, finish_reason = _from_attributes(attrs)
    if not messages and answer is None:
        messages, answer, finish_reason = _from_events(span.get("events"))
    if not messages and answer is None:
        raise NotACall(SPAN_WITHOUT_CONTENT)
    require(answer is not None, "span has no completion content")
    start, end = _nanos(span.get("startTimeUnixNano")), span.get("endTimeUnixNano")
    reasons = attrs.get("gen_ai.response.finish_reasons")
    if isinstance(reasons, list) and reasons:
        finish_reason = reasons[0]
    context = {k: v for k, v in {**resource, **attrs}.items() if isinstance(v, (str, int, float, bool)) and not k.startswith("gen_ai.usage")}
    return call_row(
        trace_id=f"otel-{span.get('traceId')}-{span.get('spanId')}" if span.get("spanId") else None,
        called_at=parse_time(start / 1e9, "startTimeUnixNano"),
        messages=messages,
        tools=openai_tools(json_field(attrs.get("gen_ai.tool.definitions"), "gen_ai.tool.definitions")),
        response_message=answer,
        model=attrs.get("gen_ai.request.model") or attrs.get("gen_ai.response.model"),
        answered_by=attrs.get("gen_ai.response.model"),
        # HTTP headers as the semantic conventions record them, where header capture is on
        response_headers={k.removeprefix(HEADER_ATTRIBUTE): v for k, v in attrs.items() if k.startswith(HEADER_ATTRIBUTE)},
        finish_reason=_finish_reason(finish_reason),
        prompt_tokens=attrs.get("gen_ai.usage.input_tokens"),
        completion_tokens=attrs.get("gen_ai.usage.output_tokens"),
        latency_ms=(_nanos(end) - start) / 1e6 if end is not None else None,
        agent=attrs.get("gen_ai.agent.name") or resource.get("service.name"),
        context=context,
    )


def outcomes(record: Any, source) -> Iterator[Outcome]:
    if not looks_like(record):
        yield Outcome(error="record has no resourceSpans or resourceLogs list", piece=record)
        return
    for resource_spans in _list(record.get("resourceSpans")):
        resource_spans = _object(resource_spans)
        resource = attributes(_object(resource_spans.get("resource")).get("attributes"))
        for scope_spans in _list(resource_spans.get("scopeSpans")):
            for span in _list(_object(scope_spans).get("spans")):
                where = f"span {span.get('spanId')}" if isinstance(span, dict) else "span"
                if not isinstance(span, dict):
                    yield Outcome(error="span is not an object", piece=span, where=where)
                    continue
                operation = attributes(span.get("attributes")).get("gen_ai.operation.name")
                if not isinstance(operation, str) or operation not in CALL_OPERATIONS:
                    yield Outcome(skipped=f"{operation if isinstance(operation, str) and operation else 'non-GenAI'} span", piece=span)
                    continue
                yield from one_call(span, partial(parse_span, resource=resource), where)
    for resource_logs in _list(record.get("resourceLogs")):
        yield from _log_calls(_object(resource_logs))


def _log_event(log: dict) -> tuple[Any, dict]:
    """A GenAI event sent as a log record, as the span event it stands for: its name (`eventName`,
    or the `event.name` attribute of older SDKs) and its attributes with its body's fields."""
    attrs = attributes(log.get("attributes"))
    body = any_value(log.get("body"))
    return log.get("eventName") or attrs.get("event.name"), {**attrs, **(body if isinstance(body, dict) else {"content": body})}


def _log_calls(resource_logs: dict) -> Iterator[Outcome]:
    """One call per span whose GenAI events came as log records; other log records are counted."""
    resource = attributes(_object(resource_logs.get("resource")).get("attributes"))
    by_span: dict[tuple[str, str], list[dict]] = {}
    for scope_logs in _list(resource_logs.get("scopeLogs")):
        for log in _list(_object(scope_logs).get("logRecords")):
            if not isinstance(log, dict) or not str(_log_event(log)[0] or "").startswith("gen_ai."):
                yield Outcome(skipped="non-GenAI log record", piece=log)
                continue
            by_span.setdefault((str(log.get("traceId")), str(log.get("spanId"))), []).append(log)
    for (trace_id, span_id), logs in by_span.items():
        yield from one_call(logs, partial(parse_log_records, resource=resource), f"log records of span {span_id}")


def parse_log_records(logs: list[dict], resource: dict) -> dict:
    """One call from the log records of its span."""
    messages, answer, finish_reason = _from_named_events([_log_event(log) for log in logs])
    # with capture off the instrumentation still logs the events, and the answer's tool names
    require(any(m.get("content") for m in messages), f"log records hold no message content ({CAPTURE_HINT})")
    require(answer is not None, "log records hold no gen_ai.choice event (the answer)")
    first = min(_nanos(log.get("timeUnixNano") or log.get("observedTimeUnixNano")) for log in logs)
    trace_id, span_id = logs[0].get("traceId"), logs[0].get("spanId")
    return call_row(
        trace_id=f"otel-{trace_id}-{span_id}" if span_id else None,
        called_at=parse_time(first / 1e9, "timeUnixNano"),
        messages=messages,
        response_message=answer,
        finish_reason=_finish_reason(finish_reason),
        agent=resource.get("service.name"),
        context={k: v for k, v in resource.items() if isinstance(v, (str, int, float, bool))},
    )
