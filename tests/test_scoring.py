"""Scorers on real answers from the sample (baseline vs an SLM's plausible answers)."""

import json

import pytest

from pipeline import calls, scoring


def _first_answer(ingested, system_start: str) -> str:
    for messages, response in zip(ingested.traces["messages"], ingested.traces["response_message"]):
        if json.loads(messages)[0]["content"].startswith(system_start):
            return calls.baseline_answer(response)
    raise AssertionError(system_start)


def test_each_step_of_the_sample_gets_its_scorer(ingested):
    assert scoring.answer_shape(_first_answer(ingested, "You are the intent tagger")) == scoring.LABEL_SET
    assert scoring.answer_shape(_first_answer(ingested, "You extract booking fields")) == scoring.JSON_OBJECT
    assert scoring.answer_shape(_first_answer(ingested, "You are the planning module")) == scoring.FINAL_NUMBER
    traces = ingested.traces
    tool_answer = calls.baseline_answer(traces[traces["finish_reason"] == "tool_calls"]["response_message"].iloc[0])
    assert scoring.answer_shape(tool_answer) == scoring.TOOL_CALL


def test_label_sets_compare_as_sets():
    assert scoring.score_label_set("booking, gym, request_info", "gym, booking, request_info") == 1.0
    assert scoring.score_label_set("booking, gym", "gym") == pytest.approx(2 / 3)
    assert scoring.score_label_set("booking", "spa") == 0.0


def test_json_objects_compare_field_by_field():
    baseline = '{"date": "12 Oct", "adults": "2"}'
    assert scoring.score_json_object(baseline, '{"adults": "2", "date": "12 Oct"}') == 1.0
    assert scoring.score_json_object(baseline, '{"date": "12 Oct", "adults": "3"}') == 0.5
    assert scoring.score_json_object(baseline, "date: 12 Oct") == 0.0
    assert scoring.score_json_object("{}", "{}") == 1.0


def test_tool_calls_compare_names_and_argument_values_in_any_order():
    baseline = calls.render_answer(
        {
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
                {"function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 3}'}},
            ]
        }
    )
    swapped = '<tool_call>[{"name": "get_weather", "arguments": {"city": "rome", "days": "3"}}, ' \
              '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3.0}}]</tool_call>'
    assert scoring.score_tool_calls(baseline, swapped) == 1.0
    one_wrong = swapped.replace("Paris", "Lyon")
    assert scoring.score_tool_calls(baseline, one_wrong) == 0.5
    assert scoring.score_tool_calls(baseline, "It is sunny in Paris.") == 0.0


def test_final_numbers_compare_as_numbers():
    assert scoring.score_final_number("so 6*5=30\n#### 30", "#### 30.0") == 1.0
    assert scoring.score_final_number("#### 1,200", "The answer is 1200") == 1.0
    assert scoring.score_final_number("#### 30", "#### 31") == 0.0


def test_prompts_describe_tools_and_answers_round_trip(ingested):
    traces = ingested.traces
    row = traces[traces["finish_reason"] == "tool_calls"].iloc[0]
    prompt = calls.prompt_messages(row["messages"], row["tools"])
    assert prompt[0]["role"] == "system" and calls.TOOL_CALL_OPEN in prompt[0]["content"]
    tool_name = json.loads(row["tools"])[0]["function"]["name"]
    assert tool_name in prompt[0]["content"]
    answer = calls.baseline_answer(row["response_message"])
    parsed = calls.parse_tool_calls(answer)
    assert [c["name"] for c in parsed] == [
        c["function"]["name"] for c in json.loads(row["response_message"])["tool_calls"]
    ]
