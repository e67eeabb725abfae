"""LangSmith runs, as its bulk export writes them (Parquet, one run per row, the fields of the Run
data format) or as its API returns them (`GET /api/v1/runs/{id}`, JSON lines):

    {"id", "trace_id", "parent_run_id", "name", "run_type", "start_time", "end_time", "status",
     "error", "inputs", "outputs", "extra", "tags", "prompt_tokens"?, "completion_tokens"?, ...}

Each `llm` run is one call; chain, tool, retriever and other runs are counted and passed over, and
a failed run is quarantined with its error. `inputs`, `outputs` and `extra` may be JSON or JSON
text. Two shapes of content are read:
- the OpenAI client traced by `langsmith.wrappers.wrap_openai`: `inputs` is the request
  (`{"messages", "model", "tools"?}`), `outputs` the chat completion (`{"choices": [{"message",
  "finish_reason"}], "usage_metadata" | "usage"}`);
- LangChain chat models: `inputs` is `{"messages": [[...]]}` of serialized messages
  (`{"lc": 1, "type": "constructor", "id": [..., "HumanMessage"], "kwargs": {"content", ...}}`
  or `{"type": "human", "content"}`), `outputs` is `{"generations": [[{"message", "text",
  "generation_info"}]]}`.
The model comes from `extra.metadata.ls_model_name` or the request; session fields such as
`thread_id` from `extra.metadata` (origin fields); the agent from the root run's `session_name`.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from pipeline.formats import MalformedCall, Outcome, call_row, json_field, one_call, parse_time, require, scalar_fields

NAME = "langsmith"
ITEM_PATHS = ("item",)
# LangChain's message classes (and their short `type`s) as chat roles
ROLES = {"SystemMessage": "system", "HumanMessage": "user", "AIMessage": "assistant", "ToolMessage": "tool",
         "system": "system", "human": "user", "ai": "assistant", "tool": "tool",
         "SystemMessageChunk": "system", "HumanMessageChunk": "user", "AIMessageChunk": "assistant"}


def looks_like(record: Any) -> bool:
    return isinstance(record, dict) and "run_type" in record and "inputs" in record and "start_time" in record


def _object(value: Any) -> dict:
    """A field that should hold an object: itself, or empty when the log holds anything else."""
    return value if isinstance(value, dict) else {}


def _message(value: Any) -> dict | None:
    """A chat message in OpenAI's shape, from OpenAI's or LangChain's (serialized or plain)."""
    if not isinstance(value, dict):
        return None
    if "role" in value:
        return value
    if value.get("lc") == 1 and isinstance(value.get("kwargs"), dict):
        path = value.get("id")
        kind, fields = path[-1] if isinstance(path, list) and path else None, value["kwargs"]
    else:
        kind, fields = value.get("type"), value
    role = ROLES.get(kind) if isinstance(kind, str) else None
    if role is None:
        return None
    message = {"role": role, "content": fields.get("content")}
    if role == "assistant" and isinstance(fields.get("tool_calls"), list) and fields["tool_calls"]:
        message["tool_calls"] = [
            call if "function" in call else {"id": call.get("id"), "type": "function", "function": {
                "name": call.get("name"), "arguments": json.dumps(call.get("args", {}), ensure_ascii=False)}}
            for call in fields["tool_calls"] if isinstance(call, dict)]
    if role == "tool" and fields.get("tool_call_id"):
        message["tool_call_id"] = fields["tool_call_id"]
    return message


def _prompt(inputs: Any) -> tuple[list, Any]:
    require(isinstance(inputs, dict), "run inputs are not an object")
    messages = inputs.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], list):  # LangChain: one list per prompt
        messages = messages[0]
    if not isinstance(messages, list) and isinstance(inputs.get("prompts"), list) and inputs["prompts"]:
        messages = [{"role": "user", "content": inputs["prompts"][0]}]
    require(isinstance(messages, list) and messages, "run inputs hold no messages")
    converted = [_message(m) for m in messages]
    require(all(m is not None for m in converted), "a run input message has no role or message type")
    return converted, inputs.get("tools")


def _answer(outputs: Any) -> tuple[dict, str | None, dict]:
    """The answer, its finish reason and its token usage."""
    require(isinstance(outputs, dict), "run has no outputs")
    if isinstance(outputs.get("choices"), list) and outputs["choices"]:  # an OpenAI chat completion
        choice = _object(outputs["choices"][0])
        message = {k: v for k, v in _object(choice.get("message")).items() if v is not None}
        return message, choice.get("finish_reason"), _object(outputs.get("usage_metadata") or outputs.get("usage"))
    generations = outputs.get("generations")
    if isinstance(generations, list) and generations:
        first = generations[0][0] if isinstance(generations[0], list) and generations[0] else generations[0]
        require(isinstance(first, dict), "run outputs hold no generation")
        message = _message(first.get("message")) or {"role": "assistant", "content": first.get("text")}
        usage = (_object(_object(first.get("message")).get("kwargs")).get("usage_metadata")
                 or _object(outputs.get("llm_output")).get("token_usage"))
        return message, _object(first.get("generation_info")).get("finish_reason"), _object(usage)
    raise MalformedCall("run outputs are neither a chat completion nor generations")


def parse_run(run: dict) -> dict:
    error = run.get("error")
    require(not error, f"run failed: {(str(error).strip().splitlines() or [''])[0]}")
    inputs, outputs = json_field(run.get("inputs"), "inputs"), json_field(run.get("outputs"), "outputs")
    messages, tools = _prompt(inputs)
    answer, finish_reason, usage = _answer(outputs)
    metadata = _object(_object(json_field(run.get("extra"), "extra")).get("metadata"))
    start = parse_time(run.get("start_time"), "start_time")
    end = run.get("end_time")
    return call_row(
        trace_id=str(run["id"]) if run.get("id") else None,
        called_at=start,
        messages=messages,
        tools=tools,
        response_message={"role": "assistant", **answer},
        model=metadata.get("ls_model_name") or inputs.get("model"),
        answered_by=outputs.get("model"),
        finish_reason=finish_reason,
        prompt_tokens=run.get("prompt_tokens") or usage.get("input_tokens") or usage.get("prompt_tokens"),
        completion_tokens=run.get("completion_tokens") or usage.get("output_tokens") or usage.get("completion_tokens"),
        total_tokens=run.get("total_tokens") or usage.get("total_tokens"),
        latency_ms=(parse_time(end, "end_time") - start).total_seconds() * 1000 if end else None,
        agent=metadata.get("agent") or run.get("session_name"),
        context=scalar_fields(metadata),
    )


def outcomes(record: Any, source) -> Iterator[Outcome]:
    if not isinstance(record, dict):
        yield Outcome(error=f"record is a {type(record).__name__}, not a run", piece=record)
        return
    if record.get("run_type") != "llm":
        yield Outcome(skipped=f"{record.get('run_type') or 'untyped'} run", piece=record)
        return
    yield from one_call(record, parse_run, f"run {record.get('id')}")
