"""Structured decoding: a generative SLM may only write answers of the shape its step's answers have.

The shape is read from a cluster's logged training answers (`answer_format`):

    label_set    every answer is labels from a closed list, joined by ", "  -> only those labels (each
                                                                                 once, in the order the
                                                                                 logged answers keep)
    json_object  every answer is a JSON object                               -> only the keys seen,
                                                                                 values of the types seen
    tool_calls   answers call the request's tools (a few recurring texts     -> only calls of that
                 beside them, such as "no tool fits")                           request's own tools, with
                                                                                 arguments valid under their
                                                                                 schemas, no more calls than
                                                                                 an answer ever made, or
                                                                                 those texts
    free         anything else (reasoning, prose)                            -> unconstrained

It is written beside the adapter (`answer_format.json`) when the adapter is trained, so that the
probe, shadow evaluation and the router decode the same way. Each call's grammar (a tool call's
depends on the request's own tools) is compiled by xgrammar, the library vLLM uses for structured
outputs, so a route decodes alike in-process and on a vLLM server; grammars are cached, since a
cluster's calls share most of them. The confidence is read from the constrained distribution, over
the tokens where the model had a choice (`generate_answers`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from pipeline.calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_tool_calls
from pipeline.scoring import JSON_OBJECT, LABEL_SET, TOOL_CALL, answer_shape, labels_of

log = logging.getLogger(__name__)

FREE, LABELS, JSON_KEYS, TOOL_CALLS = "free", "label_set", "json_object", "tool_calls"
ANSWER_FORMAT_FILE = "answer_format.json"
FORMAT_SHARE = 0.9  # share of a cluster's answers that must have one shape before every answer is held to it
MAX_LABELS = 200
MAX_KEYS = 50
RECURRING_TEXT_MIN = 3  # a text answer given this often (verbatim) is one of a tool step's allowed answers
LABEL_SEPARATOR = ", "
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object",
               type(None): "null"}


def _json_schema(objects: list[dict]) -> dict:
    """An object schema of the keys the answers use, in the order they usually come, each with
    the JSON types its values had; keys present in every answer are required."""
    position: dict[str, list[int]] = {}
    types: dict[str, set[str]] = {}
    for value in objects:
        for index, (key, item) in enumerate(value.items()):
            position.setdefault(key, []).append(index)
            types.setdefault(key, set()).add(_JSON_TYPES.get(type(item), "string"))
    keys = sorted(position, key=lambda k: (sum(position[k]) / len(position[k]), k))
    # an integer field that once held a float is a number field
    properties = {k: {"type": sorted(t - {"integer"} if "number" in t else t)} for k, t in types.items()}
    for schema in properties.values():
        if len(schema["type"]) == 1:
            schema["type"] = schema["type"][0]
    required = [k for k in keys if len(position[k]) == len(objects)]
    return {"type": "object", "properties": {k: properties[k] for k in keys}, "required": required,
            "additionalProperties": False}


def answer_format(answers: list[str], native_tools: bool = False) -> dict:
    """The shape a cluster's answers are held to, read from its logged training answers.
    `native_tools`: the model's chat template writes tool calls its own way (Qwen2.5, Llama 3.x),
    which differs from model to model; only the project's own tool-call format is constrained."""
    if not answers:
        return {"shape": FREE}
    shape_of = [answer_shape(a) for a in answers]
    shapes = Counter(shape_of)
    enough = FORMAT_SHARE * len(answers)
    if shapes[LABEL_SET] >= enough:
        label_sets = [labels_of(a) for a, shape in zip(answers, shape_of) if shape == LABEL_SET]
        labels = sorted({label for found in label_sets for label in found})
        if 0 < len(labels) <= MAX_LABELS:
            # answers that list their labels sorted, each once, are decoded so: no label twice, no
            # endless list (a small model's greedy decoding otherwise repeats one label to the budget)
            ordered = sum(found == sorted(set(found)) for found in label_sets) >= enough
            return {"shape": LABELS, "labels": labels, "ordered": ordered}
    if shapes[JSON_OBJECT] >= enough:
        objects = [json.loads(a) for a, shape in zip(answers, shape_of) if shape == JSON_OBJECT]
        if len({k for o in objects for k in o}) <= MAX_KEYS:
            return {"shape": JSON_KEYS, "schema": _json_schema(objects)}
    texts = Counter(a.strip() for a, shape in zip(answers, shape_of) if shape != TOOL_CALL)
    recurring = sorted(t for t, n in texts.items() if n >= RECURRING_TEXT_MIN and t)
    if not native_tools and shapes[TOOL_CALL] and shapes[TOOL_CALL] + sum(texts[t] for t in recurring) >= enough:
        # no more calls in one answer than the logged answers ever made (a small model's greedy
        # decoding otherwise repeats its call until the answer budget runs out)
        max_calls = max(len(parse_tool_calls(a) or []) for a, shape in zip(answers, shape_of) if shape == TOOL_CALL)
        return {"shape": TOOL_CALLS, "texts": recurring, "max_calls": max_calls}
    return {"shape": FREE}


def write_answer_format(folder: Path, answers: list[str], native_tools: bool = False) -> dict:
    """Record beside an adapter the shape its answers are decoded in; the format written."""
    found = answer_format(answers, native_tools)
    (Path(folder) / ANSWER_FORMAT_FILE).write_text(json.dumps(found, indent=1, ensure_ascii=False) + "\n")
    return found


def read_answer_format(folder: Path | None) -> dict:
    """The format recorded beside an adapter; free where none was (adapters trained before)."""
    path = Path(folder) / ANSWER_FORMAT_FILE if folder is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {"shape": FREE}


def _tool_schema(tools: list[dict], max_calls: int | None = None) -> dict | None:
    """A JSON list of one or more calls (at most `max_calls`), each naming one of `tools` with
    arguments valid under that tool's parameter schema (any object where it has none)."""
    calls = []
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else {}
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        calls.append({"type": "object", "properties": {
            "name": {"const": function["name"]},
            "arguments": parameters if isinstance(parameters, dict) and parameters else {"type": "object"},
        }, "required": ["name", "arguments"], "additionalProperties": False})
    if not calls:
        return None
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return {**schema, "maxItems": max_calls} if max_calls else schema


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # an EBNF string literal escapes as JSON does


def _label_grammar(labels: list[str], ordered: bool) -> str:
    """EBNF of label lists joined by ", ". Ordered: each label at most once, in sorted order (rule
    `from_i` is a list that starts with label i; the next label comes from those after it)."""
    separator = _literal(LABEL_SEPARATOR)
    if not ordered:
        choice = " | ".join(_literal(label) for label in labels)
        return f"root ::= label ({separator} label)*\nlabel ::= {choice}"
    rules = ["root ::= " + " | ".join(f"from_{i}" for i in range(len(labels)))]
    for i, label in enumerate(labels):
        later = " | ".join(f"from_{j}" for j in range(i + 1, len(labels)))
        rules.append(f"from_{i} ::= {_literal(label)}" + (f" ({separator} ({later}))?" if later else ""))
    return "\n".join(rules)


class AnswerGrammars:
    """Each call's grammar under one tokenizer, compiled by xgrammar and cached by what it depends
    on (the format, and for tool calls the request's tools)."""

    def __init__(self, tokenizer, vocab_size: int):
        import xgrammar as xgr

        self._compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size))
        self._cache: dict[str, object] = {}

    def for_calls(self, found: dict, tools: list[str | None]) -> list[object | None]:
        """The compiled grammar of each call (None: unconstrained), `tools` the calls' tools JSON."""
        return [self.for_call(found, t) for t in tools]

    def for_call(self, found: dict, tools_json: str | None):
        shape = found.get("shape", FREE)
        if shape == FREE:
            return None
        key = json.dumps([found, tools_json if shape == TOOL_CALLS else None], sort_keys=True)
        if key not in self._cache:
            try:
                self._cache[key] = self._compile(found, tools_json)
            except Exception as err:  # noqa: BLE001 - one call's odd tool schema must not stop a night's evaluation
                log.warning("no grammar for a %s answer (%s: %s); it is decoded unconstrained", shape,
                            type(err).__name__, err)
                self._cache[key] = None
        return self._cache[key]

    def _compile(self, found: dict, tools_json: str | None):
        import xgrammar as xgr

        shape = found["shape"]
        if shape == LABELS:
            return self._compiler.compile_grammar(_label_grammar(found["labels"], found.get("ordered", False)))
        if shape == JSON_KEYS:
            return self._compiler.compile_json_schema(json.dumps(found["schema"]), any_whitespace=False)
        tools = json.loads(tools_json) if isinstance(tools_json, str) else None
        schema = _tool_schema(tools, found.get("max_calls")) if isinstance(tools, list) else None
        texts = [xgr.Grammar.from_ebnf(f"root ::= {_literal(text)}") for text in found.get("texts", [])]
        if schema is None:  # a request without tools can only get one of the texts
            return self._compiler.compile_grammar(xgr.Grammar.union(*texts)) if texts else None
        try:
            calls = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception:  # noqa: BLE001 - a schema xgrammar cannot take: any JSON list of calls
            calls = xgr.Grammar.from_json_schema(json.dumps({**_tool_schema([{"name": "any"}], found.get("max_calls")), "items": {
                "type": "object", "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
                "required": ["name", "arguments"]}}), any_whitespace=False)
        block = xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {_literal(TOOL_CALL_OPEN)}"), calls,
                                   xgr.Grammar.from_ebnf(f"root ::= {_literal(TOOL_CALL_CLOSE)}"))
        return self._compiler.compile_grammar(xgr.Grammar.union(block, *texts) if texts else block)


def logits_processor(grammars: list):
    """A transformers logits processor that masks each row of a batch to what its grammar allows
    next (rows without one are left alone), or None when no row has a grammar. One per `generate`.
    It also notes, per row and step, the text the grammar forces from there on (xgrammar's
    jump-forward string: `<tool_call>[{"name": "` before a call, the rest of a fixed text), so that
    `forced_steps` can tell which tokens were the model's choice."""
    if not any(g is not None for g in grammars):
        return None
    import torch
    import transformers
    import xgrammar as xgr

    class _Masks(transformers.LogitsProcessor):
        def __init__(self):
            self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
            self.forced_text: list[list[str]] = [[] for _ in grammars]  # per row, per step
            self.bitmask = None
            self.started = False

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            if self.bitmask is None:
                self.bitmask = xgr.allocate_token_bitmask(len(grammars), scores.shape[-1])
            live = []
            for row, matcher in enumerate(self.matchers):
                forced = ""
                if matcher is not None and not matcher.is_terminated():
                    if self.started and not matcher.accept_token(int(input_ids[row, -1])):
                        raise RuntimeError("a token outside the answer's grammar was chosen")
                    if not matcher.is_terminated():  # else its answer has ended: the row is only padded now
                        forced = matcher.find_jump_forward_string()
                        matcher.fill_next_token_bitmask(self.bitmask, row)
                        live.append(row)
                self.forced_text[row].append(forced)
            self.started = True
            if live:
                masked = scores.float() if scores.device.type == "cpu" else scores
                xgr.apply_token_bitmask_inplace(masked, self.bitmask.to(scores.device), indices=live)
                scores = masked.to(scores.dtype)
            return scores

    return _Masks()


def forced_steps(masks, tokenizer, new_tokens, scores: tuple):
    """Per row and step of a constrained generation: whether the token was forced, not chosen:
    the grammar allowed only it, or it spells part of the text the grammar forced there (any
    spelling of a forced text is allowed, so a choice among them says nothing)."""
    import torch

    only_one = torch.stack([torch.isfinite(step).sum(-1) == 1 for step in scores], dim=1)
    forced = only_one.clone()
    for row, texts in enumerate(masks.forced_text):
        for step, text in enumerate(texts[: forced.shape[1]]):
            if text and not forced[row, step]:
                spelled = tokenizer.decode([int(new_tokens[row, step])])
                forced[row, step] = bool(spelled) and text.startswith(spelled)
    return forced


def answers_held_to(found: dict, answer: str) -> bool:
    """Whether an answer has the shape `found` holds it to (for tests and reports)."""
    shape = found.get("shape", FREE)
    if shape == LABELS:
        written = labels_of(answer)
        in_order = written == sorted(set(written)) or not found.get("ordered")
        return bool(written) and set(written) <= set(found["labels"]) and in_order
    if shape == JSON_KEYS:
        return answer_shape(answer) == JSON_OBJECT and set(json.loads(answer)) <= set(found["schema"]["properties"])
    if shape == TOOL_CALLS:
        calls = parse_tool_calls(answer)
        if calls is None:
            return answer.strip() in found.get("texts", [])
        return len(calls) <= (found.get("max_calls") or len(calls))
    return True
