"""Task-aware comparison of an SLM answer with the logged baseline answer.

The baseline answer's shape picks the scorer: a tool call is compared by function name and
argument values, a JSON object field by field, a label list as a set, a worked answer ending in
`#### <number>` by its final number, and anything else by word overlap. Every scorer returns a
score in [0, 1].
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

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


def score_tool_calls(baseline: str, predicted: str) -> float:
    """Matched calls over the larger count; a call matches on name and argument values.

    Parallel calls are compared as a multiset, so their order does not matter.
    """
    gold = parse_tool_calls(baseline) or []
    pred = parse_tool_calls(predicted)
    if pred is None:
        return 0.0
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
    """Word-overlap F1 (first version; embedding similarity comes with the evaluation issue)."""
    gold, pred = Counter(baseline.lower().split()), Counter(predicted.lower().split())
    overlap = sum((gold & pred).values())
    if not gold and not pred:
        return 1.0
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(pred.values()), overlap / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


SCORERS = {
    TOOL_CALL: score_tool_calls,
    JSON_OBJECT: score_json_object,
    LABEL_SET: score_label_set,
    FINAL_NUMBER: score_final_number,
    FREE_TEXT: score_free_text,
}


def score_answer(baseline: str, predicted: str) -> tuple[str, float]:
    """(scorer used, score) for one SLM answer against the logged baseline answer."""
    shape = answer_shape(baseline)
    return shape, SCORERS[shape](baseline, predicted)
