"""Hostile records among good ones: what issue 30 found stopping collection or curation on every
later run, each as one logged call (OpenAI request/response lines, as the sample is written).

`good_records` are distinct calls of the bundled sample; `hostile_lines` returns (name, line)
pairs, each a call that collection must quarantine with a reason, or curate without raising.
"""

from __future__ import annotations

import copy
import json

from tests.conftest import LANDING

CANARY_EMAIL = "hostile.canary@example.org"


def good_records(count: int = 30) -> list[dict]:
    """`count` well-formed calls of the sample with distinct requests, earliest first."""
    found, seen = [], set()
    for line in (LANDING / "traces-2026-10-01.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (isinstance(record, dict) and isinstance(record.get("id"), str) and isinstance(record.get("request"), dict)
                and record["request"].get("messages") and isinstance(record.get("response"), dict)):
            continue
        request = json.dumps(record["request"]["messages"], sort_keys=True)
        if request not in seen:
            seen.add(request)
            found.append(record)
        if len(found) == count:
            return found
    raise AssertionError("the sample has fewer distinct calls than asked")


def nested(levels: int, leaf) -> dict:
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def _variant(base: dict, name: str, change) -> dict:
    record = copy.deepcopy(base)
    record["id"] = f"hostile-{name}"
    change(record)
    return record


def _user(record: dict) -> dict:
    return next(m for m in record["request"]["messages"] if m["role"] == "user")


def _tool_answer(arguments: str) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]}


def hostile_lines(base: dict) -> list[tuple[str, bytes]]:
    """(name, JSON line) of each hostile case, built from one good record."""
    def usage_not_finite(r):
        r["response"]["usage"] = {"prompt_tokens": float("nan"), "completion_tokens": float("inf"), "total_tokens": float("-inf")}
        r["latency_ms"] = float("inf")

    records = {
        "usage-nan-and-infinity": _variant(base, "usage", usage_not_finite),
        "time-year-9999": _variant(base, "year-9999", lambda r: r.update(created_at="9999-12-31T23:59:59+14:00")),
        "time-epoch-1e20": _variant(base, "epoch-1e20", lambda r: r.update(created_at=1e20)),
        "time-epoch-zero": _variant(base, "epoch-zero", lambda r: r.update(created_at="1970-01-01T00:00:00Z")),
        "arguments-nested-700-deep": _variant(
            base, "deep-arguments", lambda r: r["response"]["choices"][0].update(message=_tool_answer(json.dumps(nested(700, "x"))))),
    }
    lines = [(name, json.dumps(record, allow_nan=True).encode()) for name, record in records.items()]
    # a lone surrogate is only writable as a JSON escape
    surrogate = json.dumps(_variant(base, "surrogate", lambda r: _user(r).update(content="SURROGATE")))
    lines.append(("lone-surrogate", surrogate.replace("SURROGATE", "hi \\ud800 there").encode()))
    lines.append(("array-nested-15000-deep", b"[" * 15000 + b"]" * 15000))
    lines.append(("object-nested-12000-deep", b'{"a":' * 12000 + b"1" + b"}" * 12000))
    return lines


def calls_that_pass_collection(base: dict) -> list[dict]:
    """Calls collection keeps that curation must still take: a message over spaCy's limit of a
    million characters with an e-mail address at its end and one across a window's edge, and
    content of an unexpected shape."""
    filler = "lorem ipsum dolor sit amet " * 45_000  # 1.2 million characters
    huge = f"{filler[:49_990]} {CANARY_EMAIL} {filler[49_990:]} write to {CANARY_EMAIL}"
    return [
        _variant(base, "huge-message", lambda r: _user(r).update(content=huge)),
        _variant(base, "content-object", lambda r: _user(r).update(content={"text": f"mail me at {CANARY_EMAIL}"})),
    ]
