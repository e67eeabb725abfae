"""One logged call seen the way an SLM sees it: prompt messages in, answer text out.

Training, shadow evaluation and (later) the router all go through these functions, so that the
model is trained on exactly the text it is later asked and judged on.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# The `model` the router logs for a call one of its SLMs answered (`slm-router/cluster-2@v0003`):
# curation keeps such calls out, so that no SLM is ever trained or judged on an SLM's answer.
ROUTER_SLM_MODEL_PREFIX = "slm-router/"
# The headers the router puts on every response (pipeline.router_service); `slm` means one of its
# SLMs wrote the answer, whatever model the agent asked for.
SERVED_BY_HEADER, ROUTE_HEADER, SERVED_BY_SLM = "x-slm-served-by", "x-slm-route", "slm"


def _header(headers: dict, name: str) -> str | None:
    """A header's value, its name matched without regard to case; OpenTelemetry records header
    values as lists (`http.response.header.<name>`)."""
    value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    value = value[0] if isinstance(value, list) and value else value
    return value if isinstance(value, str) else None


def answering_model(response_model: Any, response_headers: Any = None) -> str | None:
    """Which model wrote a logged answer: the response's own `model`, or the router's route
    (`slm-router/<route>`) where the logged response headers say an SLM served it."""
    headers = response_headers if isinstance(response_headers, dict) else {}
    if (_header(headers, SERVED_BY_HEADER) or "").lower() == SERVED_BY_SLM:
        return ROUTER_SLM_MODEL_PREFIX + (_header(headers, ROUTE_HEADER) or "unknown route")
    return response_model if isinstance(response_model, str) and response_model else None


def answered_by_router(*models: Any) -> bool:
    """Whether any of a call's model fields (the model asked for, the model that answered) is one
    of the router's SLMs."""
    return any(isinstance(m, str) and m.startswith(ROUTER_SLM_MODEL_PREFIX) for m in models)


# ---------------------------------------------------------------------------------------------
# What every stage may assume of a call's JSON. Collection quarantines a record or call that breaks
# these, and curation sets aside a stored call that does (one stored by an older version): no
# single call can make a stage raise on every later run.

# Levels of JSON a record or call may nest. Logged calls nest a dozen levels (OTLP attributes,
# content parts, tool arguments); every walk over a call recurses as deep as it nests, and Python
# stops near 1,000 frames.
MAX_NESTING = 100


def json_problem(value: Any, limit: int = MAX_NESTING) -> str | None:
    """Why a decoded JSON value cannot pass through the stages, or None: nested deeper than
    `limit` levels, or a string that is not Unicode text (a lone surrogate, which JSON's `\\ud800`
    escape can write and no UTF-8 file or Parquet column can store). Walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and not _is_unicode(item):
                return "a string holds a lone surrogate (not Unicode text)"
        elif isinstance(item, (dict, list)):
            if depth > limit:
                return f"JSON nested deeper than {limit} levels"
            for key, child in (item.items() if isinstance(item, dict) else enumerate(item)):
                stack.append((key, depth))
                stack.append((child, depth + 1))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _argument_texts(message: Any) -> list[str]:
    """The JSON texts of a message's tool-call arguments (and of the legacy `function_call`)."""
    if not isinstance(message, dict):
        return []
    functions = [call.get("function") for call in message.get("tool_calls") or [] if isinstance(call, dict)]
    functions.append(message.get("function_call"))
    return [f["arguments"] for f in functions if isinstance(f, dict) and isinstance(f.get("arguments"), str)]


def call_problem(messages: Any, response_message: Any, tools: Any = None) -> str | None:
    """Why a call cannot pass through the stages (`json_problem` of its parts, and of the JSON
    inside its tool-call arguments), or None."""
    for name, part in (("messages", messages), ("tools", tools), ("answer", response_message)):
        problem = json_problem(part)
        if problem:
            return f"{name}: {problem}"
    return arguments_problem([*(messages if isinstance(messages, list) else []), response_message])


def arguments_problem(messages: list) -> str | None:
    """`json_problem` of the JSON inside the messages' tool-call arguments (the messages
    themselves already checked), or None."""
    for message in messages:
        for text in _argument_texts(message):
            try:
                parsed = json.loads(text)
            except RecursionError:
                return f"tool-call arguments: JSON nested deeper than {MAX_NESTING} levels"
            except ValueError:
                continue  # arguments that are not JSON are kept as text, as logged
            problem = json_problem(parsed)
            if problem:
                return f"tool-call arguments: {problem}"
    return None


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
    """The tool calls written in an answer, or None if it calls no tool (or garbles the call).

    Reads the formats models write: one `<tool_call>` block holding a JSON list (SmolLM2, and
    our rendering of logged answers), one block per call holding an object (Qwen2.5, Hermes),
    or a bare JSON object with "name" and "parameters" (Llama 3.x).
    """
    blocks = _TOOL_CALL_BLOCK.findall(answer)
    if not blocks:
        bare = answer.strip()
        if not (bare.startswith("{") and '"name"' in bare and ('"parameters"' in bare or '"arguments"' in bare)):
            return None
        blocks = [bare]
    calls: list = []
    for block in blocks:
        try:
            parsed = json.loads(block)
        except json.JSONDecodeError:
            return None
        calls += parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) for c in calls):
        return None
    return [{"name": c.get("name"), "arguments": c.get("arguments", c.get("parameters", {}))}
            if "parameters" in c and "arguments" not in c else c for c in calls]


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


@dataclass
class Chat:
    """A call as a model's chat template takes it: messages, and tools where the template
    renders tool definitions itself (else they are described in the system message)."""

    messages: list[dict]
    tools: list[dict] | None = None


def renders_tools(tokenizer) -> bool:
    """Whether the model's own chat template writes tool definitions and tool calls (Qwen2.5,
    Llama 3.x do; SmolLM2's does not, and learned them as text in the system message)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def answer_message(message: dict, native_tools: bool) -> dict:
    """An assistant message as the model should produce it."""
    if native_tools and message.get("tool_calls"):
        return {
            "role": "assistant",
            "content": content_text(message.get("content")).strip(),
            "tool_calls": [{"type": "function", "function": call} for call in _tool_call_list(message["tool_calls"])],
        }
    return {"role": "assistant", "content": render_answer(message)}


def chat_of_call(messages_json: str, tools_json: str | None, native_tools: bool = False) -> Chat:
    """The call's prompt for a model: through its own template's tool support where it has one."""
    if not native_tools:
        return Chat(prompt_messages(messages_json, tools_json))
    messages = []
    for message in json.loads(messages_json):
        role = message.get("role", "user")
        if role == "assistant":
            messages.append(answer_message(message, native_tools=True))
        else:
            messages.append({"role": role, "content": content_text(message.get("content"))})
    tools = json.loads(tools_json) if isinstance(tools_json, str) else None
    return Chat(messages, tools or None)


def solved_call(messages_json: str, tools_json: str | None, response_json: str, native_tools: bool) -> tuple[Chat, dict]:
    """A call's prompt with the answer the LLM gave: an example for an in-context prompt."""
    return chat_of_call(messages_json, tools_json, native_tools), answer_message(json.loads(response_json), native_tools)


def few_shot_prompt(prompt: Chat, examples: list[tuple[Chat, dict]]) -> Chat:
    """The prompt with solved calls as earlier turns: their messages, then the answer given."""
    system = [m for m in prompt.messages[:1] if m["role"] == "system"]
    turns = []
    for example, answer in examples:
        turns += [m for m in example.messages if m["role"] != "system"] + [answer]
    return Chat(system + turns + prompt.messages[len(system) :], prompt.tools)


def render_prompt(tokenizer, chat: Chat) -> str:
    """The prompt text the model continues with its answer."""
    return tokenizer.apply_chat_template(chat.messages, tools=chat.tools, tokenize=False, add_generation_prompt=True)


def baseline_answer(response_json: str) -> str:
    """The logged frontier-model answer, as answer text."""
    return render_answer(json.loads(response_json))


# A system prompt's segments: its lines, and the sentences of long lines.
_SEGMENT_BREAK = re.compile(r"\n+|(?<=[.!?])\s+(?=[A-Z0-9<\"'(\[#*-])")


def system_text(messages: list[dict]) -> str:
    """A call's instructions: its system messages' text."""
    return " ".join(content_text(m.get("content")) for m in messages if m.get("role") == "system")


def instruction_segments(system: str) -> list[str]:
    return [segment.strip() for segment in _SEGMENT_BREAK.split(system) if segment.strip()]


def masked_digits(segment: str) -> str:
    return re.sub(r"\d+", "0", segment)


def segment_key(segment: str) -> str:
    """A segment's identity, digits masked: `Today is 2026-10-01.` and `Today is 2026-11-02.`
    are one segment (log-template miners mask numbers the same way)."""
    return hashlib.sha256(masked_digits(segment).encode()).hexdigest()[:16]


def signature_parts(messages_json: str, tools_json: str | None, max_chars: int = 600,
                    step_segments: frozenset[str] | None = None) -> tuple[str, str, str]:
    """What a call asks for, in three parts: its instructions, its tools, its last request.

    Each part is cut short: the start of a system prompt says what the step is, and the
    embedding model reads at most 256 tokens anyway. With `step_segments` (the `segment_key`s
    that `cluster.step_instruction_segments` found to tell steps apart), the instructions are
    those segments alone: an agent's preamble shared by all its steps, and the values a call fills
    in, say nothing of which step a call is, and would fill the embedding's window first.
    """
    messages = json.loads(messages_json)
    system = system_text(messages)
    if step_segments is not None:
        segments = instruction_segments(system)
        kept = [s for s in segments if segment_key(s) in step_segments]
        system = " ".join(kept) if len(kept) < len(segments) else system
    users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
    tools = json.loads(tools_json) if isinstance(tools_json, str) else []
    names = [t.get("function", {}).get("name", "") for t in tools if isinstance(t, dict)]
    return (
        system[:max_chars] or "no instructions",
        ("tools: " + ", ".join(names)) if names else "no tools",
        users[-1][: max_chars // 2] if users else "no request",
    )


# ---------------------------------------------------------------------------------------------
# Instructions a cluster's calls all carry


INSTRUCTIONS_FILE = "instructions.json"
INSTRUCTIONS_SHARE = 0.9  # share of a cluster's calls that must carry the same instructions to factor them out


@dataclass(frozen=True)
class SharedInstructions:
    """What (nearly) all calls of a cluster carry verbatim besides their request: the system
    prompt, and the tool list where it is fixed. An adapter trained without them has learned them;
    it answers only calls that carry them (any other goes to the LLM as "instructions changed")."""

    system: str | None = None  # the first system message's text
    tools: str | None = None  # the tool list, as canonical JSON

    def __bool__(self) -> bool:
        return self.system is not None or self.tools is not None

    def to_json(self) -> dict:
        return {"system": self.system, "tools": json.loads(self.tools) if self.tools else None}

    @classmethod
    def from_json(cls, value: dict) -> SharedInstructions:
        return cls(value.get("system"), _canonical_tools(json.dumps(value["tools"])) if value.get("tools") else None)


def _canonical_tools(tools_json: str | None) -> str | None:
    tools = json.loads(tools_json) if isinstance(tools_json, str) and tools_json else None
    return json.dumps(tools, sort_keys=True, ensure_ascii=False) if tools else None


def _first_system(messages: list[dict]) -> str | None:
    first = messages[0] if messages else {}
    return content_text(first.get("content")) if first.get("role") == "system" else None


def shared_instructions(messages: list[str], tools: list[str | None]) -> SharedInstructions:
    """The system prompt and the tool list that at least INSTRUCTIONS_SHARE of the calls carry
    verbatim (each part on its own: tool calls share a system prompt, rarely their tools)."""
    from collections import Counter

    if not messages:
        return SharedInstructions()
    enough = INSTRUCTIONS_SHARE * len(messages)
    system, system_count = Counter(_first_system(json.loads(m)) for m in messages).most_common(1)[0]
    tool_list, tools_count = Counter(_canonical_tools(t) for t in tools).most_common(1)[0]
    return SharedInstructions(system if system is not None and system_count >= enough else None,
                              tool_list if tool_list is not None and tools_count >= enough else None)


def without_instructions(messages_json: str, tools_json: str | None,
                         shared: SharedInstructions) -> tuple[str, str | None] | None:
    """The call with the shared instructions taken out (messages JSON, tools JSON), or None when
    it does not carry them verbatim."""
    messages = json.loads(messages_json)
    if shared.system is not None:
        if _first_system(messages) != shared.system:
            return None
        messages = messages[1:]
    if shared.tools is not None:
        if _canonical_tools(tools_json) != shared.tools:
            return None
        tools_json = None
    return json.dumps(messages, ensure_ascii=False), tools_json


def read_instructions(folder) -> SharedInstructions:
    """The instructions an adapter was trained without (none, for adapters trained before)."""
    from pathlib import Path

    path = Path(folder) / INSTRUCTIONS_FILE
    return SharedInstructions.from_json(json.loads(path.read_text())) if path.is_file() else SharedInstructions()


def factor_out(calls, shared: SharedInstructions):
    """(calls, carried): a copy of `calls` (a frame with messages and tools) with the shared
    instructions taken out of every call that carries them, and which calls did (a list of bool);
    the others are left as they are."""
    stripped = [without_instructions(m, t, shared) for m, t in zip(calls["messages"], calls["tools"])]
    carried = [s is not None for s in stripped]
    out = calls.copy()
    out["messages"] = [s[0] if s else m for s, m in zip(stripped, calls["messages"])]
    out["tools"] = [s[1] if s else t for s, t in zip(stripped, calls["tools"])]
    return out, carried


def system_prompt_key(messages_json: str) -> str | None:
    """A short hash of a call's first system message (None without one): the router's lookup key.
    An agent sends each step's system prompt verbatim with every call, so a prompt that only one
    promoted cluster's calls carried names the route without embedding the call."""
    import hashlib

    system = _first_system(json.loads(messages_json))
    return hashlib.sha256(system.encode()).hexdigest()[:16] if system is not None else None


def exclusive_system_prompts(messages: list[str], clusters: list[int], min_calls: int = 5) -> dict[int, list[str]]:
    """cluster -> the system-prompt keys (`system_prompt_key`) that at least `min_calls` calls
    carried, every one of them in that cluster (calls in no cluster count as another cluster)."""
    from collections import defaultdict

    seen: dict[str, set[int]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for messages_json, cluster_id in zip(messages, clusters):
        key = system_prompt_key(messages_json)
        if key is not None:
            seen[key].add(int(cluster_id))
            counts[key] += 1
    exclusive: dict[int, list[str]] = defaultdict(list)
    for key, owners in seen.items():
        if len(owners) == 1 and counts[key] >= min_calls:
            exclusive[next(iter(owners))].append(key)
    return {cluster_id: sorted(keys) for cluster_id, keys in exclusive.items()}
