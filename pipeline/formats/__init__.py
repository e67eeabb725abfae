"""Log formats: each adapter turns one decoded record of its format into canonical calls.

A record may hold one call (a chat-completion log line), several (an OTLP export with many
spans, a Langfuse trace with its generations) or none that are LLM calls (an HTTP span). An
adapter yields one `Outcome` per call-sized piece: a canonical row, a quarantine reason, or a
note that the piece is not an LLM call (counted, never stored).

Adapters, in detection order:
    canonical        slm-convert's own JSON lines (docs/canonical-format.md)
    openai_batch     OpenAI Batch API output files, joined with their input files
    openai_chat      chat-completions request/response pairs, as a logging proxy writes them
    otel_genai       OpenTelemetry GenAI spans exported as OTLP/JSON
    langfuse         Langfuse public-API exports of traces and observations, blob-storage export rows
    langsmith        LangSmith runs: the bulk export's Parquet rows, or API objects
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

import orjson

from pipeline.calls import answering_model, call_problem


class MalformedCall(ValueError):
    """A piece of a record that is not a usable LLM call; the message is the quarantine reason."""


class NotACall(Exception):
    """A piece that turns out, once read, to hold no call of its own (a span whose content went to
    log records); the message says what it is, and it is counted, never quarantined."""


@dataclass(frozen=True)
class Outcome:
    row: dict | None = None  # a canonical call (see call_row)
    error: str | None = None  # why this piece is quarantined
    skipped: str | None = None  # what this piece is, when it is not an LLM call
    piece: Any = None  # the logged piece the row came from; its hash makes the record hash
    where: str = ""  # which piece of the record (a span id, an observation id) for quarantine


def json_text(value: Any, sort_keys: bool = False) -> str:
    """Compact JSON text (orjson for speed; json for the integers over 64 bits orjson refuses)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys)


def json_field(value: Any, name: str) -> Any:
    """A structured field that a log may hold as JSON text (OTel attributes, LangSmith's exported
    inputs and outputs) or as JSON already; text that is not JSON makes the piece malformed."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise MalformedCall(f"{name} is not valid JSON ({err.msg})") from err
    return value


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise MalformedCall(reason)


# The times a call may have been made at. Outside them a time is a logging bug (epoch 0, a
# milliseconds field read as seconds, year 9999), and pandas, which the later stages read the
# table with, holds no time after 2262.
EARLIEST_CALL, LATEST_CALL = datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2200, 1, 1, tzinfo=timezone.utc)


def parse_time(value: Any, field: str) -> datetime:
    """An ISO-8601 string, or epoch seconds, as an aware UTC time between EARLIEST_CALL and
    LATEST_CALL."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            parsed = datetime.fromtimestamp(value, tz=timezone.utc)
        else:
            require(isinstance(value, str) and value.strip() != "", f"missing {field}")
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            parsed = (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError, OSError) as err:  # OverflowError, OSError: beyond what the platform's time holds
        kind = "an ISO-8601 time" if isinstance(value, str) else "a time"
        raise MalformedCall(f"{field} is not {kind}: {str(value)[:40]!r}") from err
    require(EARLIEST_CALL <= parsed < LATEST_CALL, f"{field} {parsed:%Y-%m-%d} is outside the years 2000-2199")
    return parsed


def optional_int(value: Any) -> int | None:
    """A count, where the log has one: digits, or a finite number (JSON logs may say `Infinity`
    or `NaN`, found by tests/test_properties.py)."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def scalar_fields(mapping: Any) -> dict[str, Any]:
    """The scalar (string, number, bool) fields of a mapping: the candidates for origin fields."""
    if not isinstance(mapping, dict):
        return {}
    return {str(k): v for k, v in mapping.items() if isinstance(v, (str, int, float, bool)) and v != ""}


def call_row(
    *,
    trace_id: Any,
    called_at: datetime,
    messages: Any,
    response_message: Any,
    tools: Any = None,
    model: Any = None,
    answered_by: Any = None,
    response_headers: Any = None,
    finish_reason: Any = None,
    prompt_tokens: Any = None,
    completion_tokens: Any = None,
    total_tokens: Any = None,
    latency_ms: Any = None,
    agent: Any = None,
    feedback: Any = None,
    context: dict[str, Any] | None = None,
) -> dict:
    """One canonical call, checked the same way whatever format it came from.

    `messages` are OpenAI chat messages (roles system/user/assistant/tool, assistant
    `tool_calls`), `response_message` is the assistant message answered. `model` is the model the
    agent asked for; `answered_by` the model the response names and `response_headers` the
    response's HTTP headers, where the log has them: together they say whether the router's SLM
    wrote the answer (`calls.answering_model`), which curation must keep out. `context` holds the
    record's scalar metadata; the collection step keeps only the configured origin fields of it,
    pseudonymized.
    """
    require(isinstance(trace_id, str) and trace_id != "", "id is missing or not a string")
    require(isinstance(messages, list) and len(messages) > 0, "request.messages is empty")
    require(
        all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages),
        "a request message has no role",
    )
    require(tools is None or isinstance(tools, list), "request.tools is not a list")
    require(isinstance(response_message, dict), "response has no assistant message")
    problem = call_problem(messages, response_message, tools)
    require(problem is None, problem or "")
    prompt_tokens, completion_tokens = optional_int(prompt_tokens), optional_int(completion_tokens)
    total = optional_int(total_tokens)
    if total is None and prompt_tokens is not None and completion_tokens is not None:
        total = prompt_tokens + completion_tokens
    return {
        "trace_id": trace_id,
        "called_at": called_at,
        "agent": agent if isinstance(agent, str) else None,
        "model": model if isinstance(model, str) else None,
        "answered_by": answering_model(answered_by, response_headers),
        "messages": json_text(messages),
        "tools": json_text(tools) if tools else None,
        "response_message": json_text(response_message),
        "finish_reason": finish_reason if isinstance(finish_reason, str) else None,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
        "latency_ms": float(latency_ms) if isinstance(latency_ms, (int, float)) and not isinstance(latency_ms, bool) and math.isfinite(latency_ms) and latency_ms >= 0 else None,
        "feedback": feedback if isinstance(feedback, str) else None,
        "context": context or {},
    }


def one_call(piece: Any, build, where: str = "") -> Iterator[Outcome]:
    """Run `build(piece)` and turn its row, its MalformedCall or its NotACall into one Outcome."""
    try:
        yield Outcome(row=build(piece), piece=piece, where=where)
    except MalformedCall as err:
        yield Outcome(error=str(err), piece=piece, where=where)
    except NotACall as err:
        yield Outcome(skipped=str(err), piece=piece)

