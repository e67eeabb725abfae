"""Langfuse exports, in the shapes of Langfuse's public API and its blob-storage export (its
OpenAPI spec fixes every field; see docs/formats.md):

- a trace with its observations (`GET /api/public/traces/{id}`): `{"id", "timestamp", "name",
  "userId", "sessionId", "metadata", "observations": [...]}`;
- an observation (`GET /api/public/observations` items): `{"id", "traceId", "type", "startTime",
  "endTime", "model", "input", "output", "usageDetails" | "usage", "metadata", "level",
  "statusMessage"}`;
- an API page of either: `{"data": [...], "meta": {...}}`, including the current observations
  API's (`GET /api/public/v2/observations`, cursor in `meta`), whose `input`, `output` and
  `metadata` may come as JSON text;
- a row of the blob-storage export (`observations_v2/` or the legacy `observations/`, JSON lines):
  the same fields in snake_case (`trace_id`, `start_time` as `YYYY-MM-DD HH:MM:SS.ffffff` UTC,
  `provided_model_name`, `usage_details`, `user_id`, `session_id`, `trace_name`), `input` and
  `output` as JSON text,
one per line (JSON lines, as an export script writes them) or as one JSON document.

Each GENERATION observation is one call; spans, events and other observation types are counted
and passed over. A generation's `input` is the chat messages (a list, or `{"messages", "tools"}`,
or a plain prompt string) and its `output` the assistant message (or its text).
"""

from __future__ import annotations

import json
import re
from functools import partial
from typing import Any, Iterator

from pipeline.formats import Outcome, call_row, one_call, parse_time, require, scalar_fields

NAME = "langfuse"
ITEM_PATHS = ("data.item", "item")


def looks_like(record: Any) -> bool:
    if isinstance(record, dict) and isinstance(record.get("data"), list):
        return any(looks_like(item) for item in record["data"][:5])
    return isinstance(record, dict) and (
        isinstance(record.get("observations"), list)
        or ("traceId" in record and "type" in record and "startTime" in record)
        or ("trace_id" in record and "type" in record and "start_time" in record)  # a blob-storage export row
    )


def _api_shape(observation: dict) -> dict:
    """An observation as the public API spells it: a blob-storage export row's snake_case keys in
    camelCase (`start_time` -> `startTime`, `provided_model_name` -> `providedModelName`), and
    `input`, `output` and `metadata` sent as JSON text decoded. A text that is no JSON object or
    list (a plain prompt) stays text."""
    shaped = {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), key): value for key, value in observation.items()}
    for key in ("input", "output", "metadata"):
        value = shaped.get(key)
        if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
            try:
                shaped[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    return shaped


def _messages_and_tools(value: Any) -> tuple[Any, Any]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}], None
    if isinstance(value, dict) and "messages" in value:
        return value.get("messages"), value.get("tools")
    return value, None


def _answer(value: Any) -> Any:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list):  # some integrations log the returned messages as a list
        value = next((m for m in value if isinstance(m, dict)), None)
    if isinstance(value, dict) and "role" not in value and ("content" in value or "tool_calls" in value):
        value = {"role": "assistant", **value}
    return value


def parse_generation(observation: dict, trace: dict) -> dict:
    require(
        observation.get("level") != "ERROR",
        f"generation failed: {observation.get('statusMessage') or 'level ERROR, no status message'}",
    )
    require(observation.get("output") is not None, "generation has no output")
    messages, tools = _messages_and_tools(observation.get("input"))
    usage = observation.get("usageDetails") or observation.get("usage") or {}
    usage = usage if isinstance(usage, dict) else {}
    start = parse_time(observation.get("startTime"), "startTime")
    end = observation.get("endTime")
    latency = (parse_time(end, "endTime") - start).total_seconds() * 1000 if end else None
    metadata = observation.get("metadata") if isinstance(observation.get("metadata"), dict) else {}
    context = {
        **scalar_fields(trace.get("metadata")),
        **scalar_fields({k: trace.get(k) for k in ("userId", "sessionId")}),
        **scalar_fields(metadata),
        **scalar_fields({k: observation.get(k) for k in ("userId", "sessionId")}),
    }
    return call_row(
        trace_id=observation.get("id"),
        called_at=start,
        messages=messages,
        tools=tools,
        response_message=_answer(observation.get("output")),
        model=observation.get("model") or observation.get("providedModelName"),
        response_headers=metadata.get("response_headers"),
        prompt_tokens=usage.get("input", observation.get("promptTokens")),
        completion_tokens=usage.get("output", observation.get("completionTokens")),
        total_tokens=usage.get("total", observation.get("totalTokens")),
        latency_ms=latency,
        agent=metadata.get("agent") or trace.get("name") or observation.get("traceName"),
        context=context,
    )


def _observations(record: dict) -> Iterator[tuple[dict, dict]]:
    """(observation, its trace) pairs of a trace, an observation, or an API page."""
    if isinstance(record.get("data"), list):
        for item in record["data"]:
            if isinstance(item, dict):
                yield from _observations(item)
    elif isinstance(record.get("observations"), list):
        for observation in record["observations"]:
            yield (observation if isinstance(observation, dict) else {}), record
    else:
        yield record, {}


def outcomes(record: Any, source) -> Iterator[Outcome]:
    if not isinstance(record, dict):
        yield Outcome(error=f"line is a JSON {type(record).__name__}, not an object", piece=record)
        return
    for observation, trace in _observations(record):
        observation = _api_shape(observation)
        where = f"observation {observation.get('id')}"
        if observation.get("type") != "GENERATION":
            yield Outcome(skipped=f"{observation.get('type') or 'untyped'} observation", piece=observation)
            continue
        yield from one_call(observation, partial(parse_generation, trace=trace), where)
