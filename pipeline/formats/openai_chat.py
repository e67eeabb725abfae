"""OpenAI chat-completions request/response pairs, one call per line, as a logging proxy writes:

    {"id", "created_at", "request": {"model", "messages", "tools"?, "user"?},
     "response": {"id", "created", "model", "choices": [{"message", "finish_reason"}], "usage"},
     "latency_ms", "metadata": {"agent", "session_id", "feedback", ...}, "response_headers"?}

Messages may be multi-turn histories with `tool` role messages and earlier assistant
`tool_calls`; they are kept as logged. `created_at` may be missing when the response's `created`
(epoch seconds) says when the call was made.
"""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.formats import Outcome, call_row, one_call, parse_time, require, scalar_fields

NAME = "openai_chat"
ITEM_PATHS = ("item",)  # a JSON array of such records


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("request"), dict) and "response" in record


def parse(record: Any) -> dict:
    require(isinstance(record, dict), f"line is a JSON {type(record).__name__}, not an object")
    require(isinstance(record.get("id"), str) and record["id"] != "", "id is missing or not a string")
    response = record.get("response")
    logged_at = response.get("created") if isinstance(response, dict) and "created_at" not in record else record.get("created_at")
    called_at = parse_time(logged_at, "created_at")
    request = record.get("request")
    require(isinstance(request, dict), "request is missing or not an object")
    require(isinstance(request.get("messages"), list), "request.messages is missing or not a list")
    require(request["messages"] != [], "request.messages is empty")
    require(isinstance(response, dict), "response is missing or not an object")
    choices = response.get("choices")
    require(isinstance(choices, list) and len(choices) > 0, "response has no choices")
    choice = choices[0]
    require(isinstance(choice, dict), "response choice is not an object")
    require(isinstance(choice.get("message"), dict), "response choice has no message")
    metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    # OpenAI's own `user` request field names the end user: it is an origin field like the rest
    context = {**scalar_fields(metadata), **({"user": request["user"]} if isinstance(request.get("user"), str) else {})}
    return call_row(
        trace_id=record.get("id"),
        called_at=called_at,
        messages=request.get("messages"),
        tools=request.get("tools"),
        response_message=choice["message"],
        model=request.get("model"),
        answered_by=response.get("model"),
        # where the logging proxy kept the response's HTTP headers (the router says who served it)
        response_headers=record.get("response_headers") or response.get("headers") or metadata.get("response_headers"),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        total_tokens=usage.get("total_tokens"),
        latency_ms=record.get("latency_ms"),
        agent=metadata.get("agent"),
        feedback=metadata.get("feedback"),
        context=context,
    )


def outcomes(record: Any, source) -> Iterator[Outcome]:
    return one_call(record, parse)
