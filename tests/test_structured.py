"""Structured decoding: each step's generated answers keep to the shape of its logged answers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline import evaluate, structured
from pipeline.calls import baseline_answer, parse_tool_calls, renders_tools

NO_TOOL = "None of the available tools can do that, so I can't run it here."


def _step_calls(curation, labels, step: str) -> pd.DataFrame:
    steps = {i: r["step"] for i, r in labels["records"].items()}
    calls = curation.curated
    return calls[calls["trace_id"].map(steps) == step].sort_values("called_at").reset_index(drop=True)


def _answers(calls: pd.DataFrame) -> list[str]:
    return [baseline_answer(r) for r in calls["response_message"]]


def test_each_step_of_the_sample_is_held_to_the_shape_of_its_answers(curation, labels):
    intents = structured.answer_format(_answers(_step_calls(curation, labels, "classify_intent")))
    assert intents["shape"] == structured.LABELS
    assert intents["ordered"]  # the logged answers list their labels sorted, each once
    assert {"spa", "why", "booking", "wifi"} <= set(intents["labels"])
    fields = structured.answer_format(_answers(_step_calls(curation, labels, "extract_slots")))
    assert fields["shape"] == structured.JSON_KEYS
    properties = fields["schema"]["properties"]
    assert {"date_from", "time_from", "person_name"} <= set(properties)
    assert {p["type"] for p in properties.values()} == {"string"}
    assert fields["schema"]["required"] == []  # some answers are {}: no key is in every one
    tool_answers = _answers(_step_calls(curation, labels, "call_tool"))
    tools = structured.answer_format(tool_answers)
    # a tenth of the logged answers say that no tool fits, always in the same words; an answer makes
    # as many calls as the most the logged answers made, no more
    most = max(len(parse_tool_calls(a) or []) for a in tool_answers)
    assert tools == {"shape": structured.TOOL_CALLS, "texts": [NO_TOOL], "max_calls": most} and most > 1
    assert structured.answers_held_to(tools, "<tool_call>" + json.dumps([{"name": "f", "arguments": {}}] * most) + "</tool_call>")
    assert not structured.answers_held_to(tools, "<tool_call>" + json.dumps([{"name": "f", "arguments": {}}] * (most + 1))
                                          + "</tool_call>")
    assert structured.answer_format(_answers(_step_calls(curation, labels, "solve_math"))) == {"shape": structured.FREE}
    # a model whose template writes tool calls its own way is not held to the project's format
    native = structured.answer_format(_answers(_step_calls(curation, labels, "call_tool")), native_tools=True)
    assert native["shape"] == structured.FREE


def test_a_format_is_recorded_beside_the_adapter_and_an_adapter_without_one_answers_freely(tmp_path):
    assert structured.read_answer_format(tmp_path) == {"shape": structured.FREE}
    written = structured.write_answer_format(tmp_path, ["spa, wifi", "why", "spa"])
    assert written == {"shape": structured.LABELS, "labels": ["spa", "why", "wifi"], "ordered": True}
    assert structured.read_answer_format(tmp_path) == written


def test_a_format_xgrammar_cannot_compile_leaves_that_answer_unconstrained_instead_of_failing(base_model_dir, caplog):
    from transformers import AutoTokenizer

    grammars = structured.AnswerGrammars(AutoTokenizer.from_pretrained(base_model_dir), 49152)
    odd = {"shape": structured.JSON_KEYS, "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}
    assert grammars.for_call(odd, None) is None
    assert "decoded unconstrained" in caplog.text
    # a tool whose schema points nowhere still gets a grammar: any JSON list of named calls
    tools = json.dumps([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}}])
    assert grammars.for_call({"shape": structured.TOOL_CALLS, "texts": []}, tools) is not None


@pytest.fixture(scope="module")
def base_model(base_model_dir):
    return evaluate.load_adapter_model(base_model_dir, None)


def _decode(base_model, calls: pd.DataFrame, found: dict | None, budget: int = 96) -> list[tuple[str, float]]:
    model, tokenizer = base_model
    prompts = evaluate.prompts_of(calls, renders_tools(tokenizer))
    return evaluate.generate_answers(model, tokenizer, prompts, budget, len(prompts),
                                     grammars=evaluate.call_grammars(model, tokenizer, found, calls))


def test_tool_calls_name_only_the_requests_own_tools_with_the_arguments_their_schemas_require(base_model, curation,
                                                                                               labels):
    steps = _step_calls(curation, labels, "call_tool")
    found = structured.answer_format(_answers(steps.iloc[:-40]))
    # the latest calls, with the shortest tool lists among them (a CPU test)
    calls = steps.iloc[-40:].assign(size=lambda f: f["tools"].str.len()).nsmallest(4, "size")
    free = _decode(base_model, calls, None, budget=160)
    constrained = _decode(base_model, calls, found, budget=160)
    # the bare base model does not write the format on its own: without the grammar its answers are prose
    assert not all(structured.answers_held_to(found, answer) for answer, _ in free)
    for (answer, confidence), tools in zip(constrained, calls["tools"]):
        assert 0 < confidence <= 1
        if answer == NO_TOOL:
            continue
        if not answer.endswith("</tool_call>"):
            continue  # cut at the budget mid-call: never served (finish_reason "length")
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in json.loads(tools)}
        written = parse_tool_calls(answer)
        assert written and len(written) <= found["max_calls"], answer
        for call in written:
            assert call["name"] in schemas, answer
            assert set(schemas[call["name"]].get("required", [])) <= set(call["arguments"]), answer
            assert set(call["arguments"]) <= set(schemas[call["name"]]["properties"]), answer
    # the number of calls is bounded by the grammar (xgrammar's maxItems), not by the answer budget
    single = _decode(base_model, calls, {**found, "max_calls": 1}, budget=160)
    finished = [parse_tool_calls(a) for a, _ in single if a.endswith("</tool_call>")]
    assert finished and all(len(written) == 1 for written in finished), single


def test_labels_and_json_fields_come_only_from_the_sets_seen_in_training(base_model, curation, labels):
    for step in ("classify_intent", "extract_slots"):
        steps = _step_calls(curation, labels, step)
        found = structured.answer_format(_answers(steps.iloc[:-6]))
        answers = _decode(base_model, steps.iloc[-6:], found, budget=64)
        if found["shape"] == structured.LABELS:
            # sorted, each label once: every list ends well within the budget
            assert all(structured.answers_held_to(found, a) for a, _ in answers), answers
        else:  # a JSON value may run to the budget; every object that closed holds only keys seen
            closed = [a for a, _ in answers if a.endswith("}")]
            assert closed and all(structured.answers_held_to(found, a) for a in closed), answers


def test_an_answer_the_grammar_forces_token_by_token_is_fully_confident(base_model, curation, labels):
    """Confidence is read over the tokens where the grammar left the model a choice: a request
    without tools, in a step whose only other answer is one fixed text, can only get that text."""
    calls = _step_calls(curation, labels, "call_tool").iloc[:1].assign(tools=None)
    (answer, confidence), = _decode(base_model, calls, {"shape": structured.TOOL_CALLS, "texts": [NO_TOOL]})
    assert (answer, confidence) == (NO_TOOL, 1.0)


def test_a_route_is_served_in_the_format_recorded_beside_its_adapter(base_model_dir, curation, labels, tmp_path):
    """The router reads the adapter's answer format and decodes every answer of the route in it."""
    from pipeline.router import Route, SlmEngine
    from tests.router_setup import untrained_adapter

    steps = _step_calls(curation, labels, "classify_intent")
    adapter = untrained_adapter(base_model_dir, tmp_path / "adapter")
    found = structured.write_answer_format(adapter, _answers(steps.iloc[:-3]))
    route = Route(name="intents", version="v0001", label="intents", centroid=np.zeros(384), min_similarity=1.0,
                  embedding_model="", signature="", base_model_path=str(base_model_dir), adapter_dir=adapter,
                  threshold=0.0, max_new_tokens=48)
    engine = SlmEngine()
    engine.prepare((route,))
    for _, call in steps.iloc[-3:].iterrows():
        answer = engine.answer(route, call["messages"], call["tools"], None, timeout=120)
        assert answer.finish_reason == "length" or structured.answers_held_to(found, answer.text), answer.text
    shutil.rmtree(adapter)
