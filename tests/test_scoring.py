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


def test_an_argument_left_out_equals_its_schema_default():
    tools = json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "default": "celsius"}},
        "required": ["city"]}}}])
    explicit = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]</tool_call>'
    omitted = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'
    other = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}]</tool_call>'
    assert scoring.score_answer(explicit, omitted, tools) == ("tool_call", 1.0)
    assert scoring.score_answer(omitted, explicit, tools)[1] == 1.0
    assert scoring.score_answer(explicit, other, tools)[1] == 0.0
    assert scoring.score_answer(explicit, omitted)[1] == 0.0  # without the schema there is no default
    assert scoring.argument_defaults("not json") == {}


def test_free_text_is_scored_by_embedding_similarity():
    answer = "The hotel pool opens at 7 am and closes at 10 pm."
    paraphrase = scoring.score_free_text(answer, "Our swimming pool is open from seven in the morning until ten at night.")
    unrelated = scoring.score_free_text(answer, "Your invoice for March is attached to this e-mail.")
    assert scoring.score_free_text(answer, answer) > 0.99
    assert paraphrase > 0.6 > 0.3 > unrelated
    assert scoring.score_free_text("", "") == 1.0 and scoring.score_free_text(answer, " ") == 0.0


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


# A chat template that renders tools itself, in the Qwen2.5 / Hermes style (the real ones are not
# on this machine): tool definitions in the system turn, one <tool_call> block per call.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content %}{{ message.content }}{% endif %}"
    "{%- for call in message.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def test_tool_calls_are_read_in_every_format_models_write():
    ours = '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</tool_call>'
    qwen = '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    llama = '{"name": "a", "parameters": {"x": 1}}'
    expected = [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]
    assert calls.parse_tool_calls(ours) == expected == calls.parse_tool_calls(qwen)
    assert calls.parse_tool_calls(llama) == expected[:1]
    assert calls.parse_tool_calls('{"answer": "no tool"}') is None
    assert calls.parse_tool_calls("<tool_call>[{broken</tool_call>") is None
    assert scoring.score_answer(ours, qwen)[1] == 1.0


def test_training_uses_the_models_own_template_for_tools_and_tool_calls(ingested, base_model_dir):
    from transformers import AutoTokenizer

    from pipeline import finetune

    traces = ingested.traces
    row = traces[traces["finish_reason"] == "tool_calls"].iloc[[0]]
    tool_name = json.loads(row["tools"].iloc[0])[0]["function"]["name"]
    smollm = AutoTokenizer.from_pretrained(base_model_dir)
    assert not calls.renders_tools(smollm)  # SmolLM2 learned tools as text in the system message
    tool_aware = AutoTokenizer.from_pretrained(base_model_dir)
    tool_aware.chat_template = TOOL_TEMPLATE
    assert calls.renders_tools(tool_aware)

    for tokenizer, native in ((smollm, False), (tool_aware, True)):
        example = finetune.training_examples(row, native)[0]
        tokenized = finetune.tokenize_examples(tokenizer, [example])[0]
        text = tokenizer.decode(tokenized["input_ids"])
        answer = tokenizer.decode([t for t, m in zip(tokenized["input_ids"], tokenized["completion_mask"]) if m])
        assert f'"name": "{tool_name}"' in text  # the tool's definition is in the prompt
        # the loss covers exactly the answer: the call of the tool, and the end of the turn
        assert answer.startswith(("<tool_call>", "\n<tool_call>")) and answer.rstrip().endswith("<|im_end|>")
        assert calls.parse_tool_calls(answer.replace("<|im_end|>", "")) == calls.parse_tool_calls(
            calls.baseline_answer(row["response_message"].iloc[0]))
        if native:
            assert example["tools"] and "# Tools" in text and calls.TOOLS_INSTRUCTION[:20] not in text
        else:
            assert example["tools"] is None and "You can call these tools" in text


def test_gold_grading_of_the_score_script_accepts_every_logged_answer_marked_right(ingested, labels):
    """tests/score_run.py grades SLM answers against the datasets' gold answers (BFCL's rules
    for tool calls); checked on the logged answers whose labels say they are right."""
    from pipeline.calls import baseline_answer
    from tests.score_run import accuracy_vs_gold

    right = [(labels["records"][i]["gold"], baseline_answer(r)) for i, r in zip(ingested.traces["trace_id"],
             ingested.traces["response_message"]) if labels["records"][i]["teacher_ok"]]
    assert len(right) > 2500 and all(accuracy_vs_gold(gold, answer) == 1.0 for gold, answer in right)
    wrong = [(labels["records"][i]["gold"], baseline_answer(r)) for i, r in zip(ingested.traces["trace_id"],
             ingested.traces["response_message"]) if not labels["records"][i]["teacher_ok"]]
    assert sum(accuracy_vs_gold(gold, answer) == 1.0 for gold, answer in wrong) == 0
