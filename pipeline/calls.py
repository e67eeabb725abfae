"""One logged call seen the way an SLM sees it: prompt messages in, answer text out.

Training, shadow evaluation and (later) the router all go through these functions, so that the
model is trained on exactly the text it is later asked and judged on.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.S)

# Small models' chat templates rarely know about tools, so tools are described in the system
# message and calls are written as one JSON list between tags, the convention SmolLM2 was
# trained with.
TOOLS_INSTRUCTION = (
    "\n\nYou can call these tools (JSON schemas):\n{tools}\n"
    "To call tools, answer with " + TOOL_CALL_OPEN
    + '[{{"name": <tool name>, "arguments": <object>}}, ...]' + TOOL_CALL_CLOSE + "."
)


def _compact_tools(tools: list[dict]) -> str:
    described = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        described.append(
            {k: function[k] for k in ("name", "description", "parameters") if k in function}
        )
    return json.dumps(described, ensure_ascii=False, separators=(",", ":"))


def _tool_call_list(tool_calls: list[dict]) -> list[dict]:
    calls = []
    for call in tool_calls:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append({"name": function.get("name"), "arguments": arguments})
    return calls


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def render_answer(message: dict) -> str:
    """The text an SLM must produce to give this assistant message."""
    text = content_text(message.get("content")).strip()
    if message.get("tool_calls"):
        block = TOOL_CALL_OPEN + json.dumps(
            _tool_call_list(message["tool_calls"]), ensure_ascii=False
        ) + TOOL_CALL_CLOSE
        return f"{text}\n{block}" if text else block
    return text


def parse_tool_calls(answer: str) -> list[dict] | None:
    """The tool calls written in an answer, or None if it calls no tool (or garbles the call)."""
    match = _TOOL_CALL_BLOCK.search(answer)
    if not match:
        return None
    try:
        calls = json.loads(match.group(1))
    except json.JSONDecodeError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        return None
    return calls


def prompt_messages(messages_json: str, tools_json: str | None) -> list[dict]:
    """The chat messages an SLM gets for a call: plain role/content pairs, tools in the system."""
    messages = json.loads(messages_json)
    tools = json.loads(tools_json) if isinstance(tools_json, str) else None
    prompt = []
    for message in messages:
        role = message.get("role", "user")
        content = render_answer(message) if role == "assistant" else content_text(message.get("content"))
        prompt.append({"role": role, "content": content})
    if tools:
        instruction = TOOLS_INSTRUCTION.format(tools=_compact_tools(tools))
        if prompt and prompt[0]["role"] == "system":
            prompt[0] = {"role": "system", "content": prompt[0]["content"] + instruction}
        else:
            prompt.insert(0, {"role": "system", "content": instruction.strip()})
    return prompt


def baseline_answer(response_json: str) -> str:
    """The logged frontier-model answer, as answer text."""
    return render_answer(json.loads(response_json))


def signature_parts(messages_json: str, tools_json: str | None, max_chars: int = 600) -> tuple[str, str, str]:
    """What a call asks for, in three parts: its instructions, its tools, its last request.

    Each part is cut short: the start of a system prompt says what the step is, and the
    embedding model reads at most 256 tokens anyway.
    """
    messages = json.loads(messages_json)
    system = " ".join(
        content_text(m.get("content")) for m in messages if m.get("role") == "system"
    )
    users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
    tools = json.loads(tools_json) if isinstance(tools_json, str) else []
    names = [t.get("function", {}).get("name", "") for t in tools if isinstance(t, dict)]
    return (
        system[:max_chars] or "no instructions",
        ("tools: " + ", ".join(names)) if names else "no tools",
        users[-1][: max_chars // 2] if users else "no request",
    )
