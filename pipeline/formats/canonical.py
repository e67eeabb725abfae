"""slm-convert's own format: one call per line, the fields of the canonical trace table.

Anything the other adapters cannot read can be converted to this; docs/canonical-format.md
describes every field. Required: `trace_id`, `called_at`, `messages`, `response_message`.
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.formats import Outcome, call_row, one_call, parse_time, require, scalar_fields

NAME = "canonical"
ITEM_PATHS = ("item",)
OPTIONAL = (
    "tools", "model", "answered_by", "finish_reason", "prompt_tokens", "completion_tokens", "total_tokens",
    "latency_ms", "agent", "feedback",
)


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and "trace_id" in record and "response_message" in record


def parse(record: Any) -> dict:
    require(isinstance(record, dict), f"line is a JSON {type(record).__name__}, not an object")
    origin = record.get("origin")
    require(origin is None or isinstance(origin, dict), "origin is not an object")
    return call_row(
        trace_id=record.get("trace_id"),
        called_at=parse_time(record.get("called_at"), "called_at"),
        messages=record.get("messages"),
        response_message=record.get("response_message"),
        context=scalar_fields(origin),
        **{name: record.get(name) for name in OPTIONAL},
    )


def outcomes(record: Any, source) -> Iterator[Outcome]:
    return one_call(record, parse)
