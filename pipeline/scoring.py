"""Task-aware comparison of an SLM answer with the logged baseline answer.

The baseline answer's shape picks the scorer: a tool call is compared by function name and
argument values, a JSON object field by field, a label list as a set, a worked answer ending in
`#### <number>` by its final number, and anything else by embedding similarity. Every scorer returns a
score in [0, 1].
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import numpy as np

from pipeline.calls import parse_tool_calls

TOOL_CALL, JSON_OBJECT, LABEL_SET, FINAL_NUMBER, FREE_TEXT = (
    "tool_call",
    "json_object",
    "label_set",
    "final_number",
    "free_text",
)

_LABEL_LIST = re.compile(r"^[\w\-/ ]{1,40}(\s*,\s*[\w\-/ ]{1,40})*$")
_FINAL_NUMBER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def answer_shape(answer: str) -> str:
    """What kind of answer this is, judged from its text alone."""
    if parse_tool_calls(answer) is not None:
        return TOOL_CALL
    if _json_object(answer.strip()) is not None:
        return JSON_OBJECT
    if _FINAL_NUMBER.search(answer):
        return FINAL_NUMBER
    if len(answer) <= 200 and _LABEL_LIST.match(answer.strip()):
        return LABEL_SET
    return FREE_TEXT


def _normalize(value: Any) -> Any:
    """Compare values, not spellings: numbers as floats, strings trimmed and lower-cased."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        stripped = value.strip()
        try:
            return float(stripped)
        except ValueError:
            return stripped.lower()
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    return value


def _key(value: Any) -> str:
    return json.dumps(_normalize(value), sort_keys=True)


def labels_of(answer: str) -> list[str]:
    """The labels of a label-set answer, in the order written."""
    return [label.strip() for label in answer.split(",") if label.strip()]


def score_label_set(baseline: str, predicted: str) -> float:
    gold = {x.strip().lower() for x in baseline.split(",") if x.strip()}
    pred = {x.strip().lower() for x in predicted.split(",") if x.strip()}
    if not gold and not pred:
        return 1.0
    overlap = len(gold & pred)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_json_object(baseline: str, predicted: str) -> float:
    gold = _json_object(baseline.strip()) or {}
    pred = _json_object(predicted.strip())
    if pred is None:
        return 0.0
    keys = set(gold) | set(pred)
    if not keys:
        return 1.0
    return sum(k in gold and k in pred and _key(gold[k]) == _key(pred[k]) for k in keys) / len(keys)


def argument_defaults(tools_json: str | None) -> dict[str, dict]:
    """{function name: {argument: default}} from the call's OpenAI tool schemas."""
    try:
        tools = json.loads(tools_json) if tools_json else []
    except (json.JSONDecodeError, TypeError):
        return {}
    defaults = {}
    for tool in tools if isinstance(tools, list) else []:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        properties = (function.get("parameters") or {}).get("properties") or {}
        defaults[function.get("name", "")] = {
            name: spec["default"] for name, spec in properties.items() if isinstance(spec, dict) and "default" in spec
        }
    return defaults


def _with_defaults(call: dict, defaults: dict[str, dict]) -> dict:
    """The call with every argument it left out at its schema default: omitting an optional
    argument and passing its default are the same call."""
    arguments = call.get("arguments") if isinstance(call.get("arguments"), dict) else {}
    return {**call, "arguments": {**defaults.get(call.get("name"), {}), **arguments}}


def score_tool_calls(baseline: str, predicted: str, tools_json: str | None = None) -> float:
    """Matched calls over the larger count; a call matches on name and argument values
    (compared as values: "30" and 30 are equal), arguments left out counting at their schema
    default. Parallel calls are compared as a multiset, so their order does not matter.
    """
    defaults = argument_defaults(tools_json)
    gold = [_with_defaults(c, defaults) for c in parse_tool_calls(baseline) or []]
    pred = parse_tool_calls(predicted)
    if pred is None:
        return 0.0
    pred = [_with_defaults(c, defaults) for c in pred]
    remaining = Counter(_key(c) for c in gold)
    matched = 0
    for call in pred:
        key = _key(call)
        if remaining[key] > 0:
            remaining[key] -= 1
            matched += 1
    return matched / max(len(gold), len(pred), 1)


def _final_number(text: str) -> float | None:
    match = _FINAL_NUMBER.search(text)
    numbers = [match.group(1)] if match else _NUMBER.findall(text)[-1:]
    if not numbers:
        return None
    try:
        return float(numbers[0].replace(",", ""))
    except ValueError:
        return None


def score_final_number(baseline: str, predicted: str) -> float:
    gold, pred = _final_number(baseline), _final_number(predicted)
    return float(gold is not None and pred is not None and abs(gold - pred) < 1e-6)


def score_free_text(baseline: str, predicted: str) -> float:
    """Cosine similarity of the two answers' sentence embeddings (the bundled all-MiniLM-L6-v2,
    the clustering's model), clipped to [0, 1]: a paraphrase scores high, another answer low."""
    from pipeline.cluster import embed_texts  # loads a model: only when free text is scored

    if not baseline.strip() or not predicted.strip():
        return float(baseline.strip() == predicted.strip())
    gold, pred = embed_texts([baseline, predicted])
    return float(np.clip(gold @ pred, 0.0, 1.0))


SCORERS = {
    TOOL_CALL: score_tool_calls,
    JSON_OBJECT: score_json_object,
    LABEL_SET: score_label_set,
    FINAL_NUMBER: score_final_number,
    FREE_TEXT: score_free_text,
}


def score_answer(baseline: str, predicted: str, tools_json: str | None = None) -> tuple[str, float]:
    """(scorer used, score) for one SLM answer against the logged baseline answer; the call's
    tool schemas (JSON) give tool calls their argument defaults."""
    shape = answer_shape(baseline)
    if shape == TOOL_CALL:
        return shape, score_tool_calls(baseline, predicted, tools_json)
    return shape, SCORERS[shape](baseline, predicted)
