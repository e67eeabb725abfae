"""The base SLM with retrieved examples (`pipeline.incontext`): its example bank, and how
promotion chooses among the kinds of specialist measured for one cluster."""

from __future__ import annotations

import json
from json import dumps as json_dumps

import pandas as pd
import pytest

from pipeline import curate, encoders, incontext, promote
from pipeline.calls import baseline_answer


def _call(request: str, answer: str = "ok") -> dict:
    return {"messages": json_dumps([{"role": "system", "content": "Help."}, {"role": "user", "content": request}]),
            "tools": None, "response_message": json_dumps({"role": "assistant", "content": answer})}


def test_the_examples_shown_are_the_training_calls_most_like_the_call():
    bank = incontext.ExampleBank.of_calls(pd.DataFrame([_call("book a room in Paris"), _call("cancel my booking please"),
                                                        _call("what is the weather")]), shots=2)
    calls = pd.DataFrame([_call("please cancel the booking"), _call("weather forecast for Rome")])
    assert [picks[0] for picks in bank.nearest(list(calls["messages"]), [None, None])] == [1, 2]
    prompt = bank.prompts([calls["messages"][0]], [None], native_tools=False)[0]
    # one system message, the two examples as solved turns, the call last
    assert [m["role"] for m in prompt.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert prompt.messages[1]["content"] == "cancel my booking please"
    assert prompt.messages[-1]["content"] == "please cancel the booking"


def test_a_bank_written_and_read_back_prompts_alike_and_is_checked_before_serving(curation, labels, tmp_path,
                                                                                   base_model_dir):
    steps = {i: r["step"] for i, r in labels["records"].items()}
    tools = curation.curated[curation.curated["trace_id"].map(steps) == "call_tool"].sort_values("called_at")
    train, calls = tools.iloc[:60], tools.iloc[60:64]
    found = incontext.write_bank(tmp_path / "bank", train, [baseline_answer(r) for r in train["response_message"]],
                                 native_tools=False, shots=2, base_model="smollm2-135m-instruct", task="call tool")
    assert found["shape"] == "tool_calls"  # the bank's answers are decoded as calls of the request's own tools
    loaded = incontext.ExampleBank.load(tmp_path / "bank")
    assert len(loaded) == 60 and loaded.shots == 2
    in_memory = incontext.ExampleBank.of_calls(train, shots=2)
    arguments = list(calls["messages"]), list(calls["tools"])
    assert loaded.prompts(*arguments, native_tools=False) == in_memory.prompts(*arguments, native_tools=False)
    assert "with retrieved examples" in (tmp_path / "bank" / incontext.CARD_FILE).read_text()
    # the leak check reads all that curation scrubbed: messages, tool schemas (by pattern) and answers
    texts = incontext.scrubbed_texts(tmp_path / "bank")
    assert len(texts) == 3 * len(train) and set(texts) == set(train["messages"]) | set(train["tools"]) | set(train["response_message"])

    assert promote.specialist_problems(encoders.IN_CONTEXT, tmp_path / "bank", str(base_model_dir)) == []
    assert promote.missing_files(encoders.IN_CONTEXT, tmp_path / "bank") == []
    assert incontext.servability_problems(tmp_path / "bank", str(tmp_path / "no-model")) == [
        f"base model {tmp_path / 'no-model'} not found"]
    (tmp_path / "bank" / incontext.EXAMPLES_FILE).unlink()
    assert promote.missing_files(encoders.IN_CONTEXT, tmp_path / "bank") == [incontext.EXAMPLES_FILE]


def _evaluation(kind: str, score: float, answered: int, cost: float) -> dict:
    return {"kind": kind, "test_calls": 100, "calibration_calls": 100, "score_vs_baseline": score,
            "confidence_threshold": 0.5, "answered_at_threshold": answered, "score_at_threshold": score,
            "coverage_at_threshold": answered / 100, "cost_and_speed": {"slm_cost_per_1000_calls": cost}}


def test_the_cheapest_kind_that_passes_is_promoted_and_every_kind_measured_is_reported():
    adapter = _evaluation(encoders.GENERATIVE, 0.95, 60, cost=0.05)
    in_context = _evaluation(encoders.IN_CONTEXT, 0.97, 80, cost=0.12)  # longer prompts: dearer to serve
    chosen, decision, reason, measured = promote.choose_candidate([adapter, in_context], 0.8, 10)
    assert (chosen["kind"], decision) == (encoders.GENERATIVE, promote.PROMOTED)
    assert "cheapest to serve of the 2 kinds that pass" in reason
    assert [(m["kind"], m["decision"], m.get("chosen", False)) for m in measured] == [
        (encoders.GENERATIVE, promote.PROMOTED, True), (encoders.IN_CONTEXT, promote.PROMOTED, False)]

    failing = _evaluation(encoders.GENERATIVE, 0.5, 60, cost=0.05)
    chosen, decision, _, measured = promote.choose_candidate([failing, in_context], 0.8, 10)
    assert (chosen["kind"], decision) == (encoders.IN_CONTEXT, promote.PROMOTED)
    assert measured[0]["decision"] == promote.NOT_PROMOTED and "below the floor" in measured[0]["reason"]

    # none passes: the cluster's primary kind is reported with its own reason
    chosen, decision, reason, _ = promote.choose_candidate([failing, _evaluation(encoders.IN_CONTEXT, 0.4, 50, 0.1)],
                                                           0.8, 10)
    assert (chosen["kind"], decision) == (encoders.GENERATIVE, promote.NOT_PROMOTED) and "below the floor" in reason
    assert promote.choose_candidate([], 0.8, 10)[1:3] == (promote.NOT_PROMOTED, "not fine-tuned")


def test_the_run_summary_shows_each_kind_measured_beside_the_one_chosen():
    summary_cluster = {
        "name": "cluster-0", "label": "call a tool", "size": 500, "share": 0.2,
        "selection": {"decision": "fine-tune", "kind": encoders.GENERATIVE, "candidate": "smollm2-135m-instruct",
                      "reason": "tool calls"},
        "shadow_eval": {**_evaluation(encoders.IN_CONTEXT, 0.97, 80, 0.12), "calls_under_other_instructions": 0},
        "promotion": {"decision": promote.PROMOTED, "reason": "score 0.970 ...", "candidates": [
            {"kind": encoders.GENERATIVE, "decision": promote.NOT_PROMOTED, "reason": "shadow score 0.500: no threshold",
             "score_vs_baseline": 0.5, "confidence_threshold": None, "coverage_at_threshold": 0.0,
             "score_at_threshold": None, "slm_cost_per_1000_calls": 0.05},
            {"kind": encoders.IN_CONTEXT, "decision": promote.PROMOTED, "reason": "score 0.970 ...", "chosen": True,
             "score_vs_baseline": 0.97, "confidence_threshold": 0.5, "coverage_at_threshold": 0.8,
             "score_at_threshold": 0.97, "slm_cost_per_1000_calls": 0.12}]},
    }
    rows = promote.report_rows({"clusters": [summary_cluster]})
    assert [row[3] for row in rows] == ["smollm2-135m-instruct in_context", "smollm2-135m-instruct"]
    assert rows[1][1] == "also measured" and rows[1][-1].startswith("stays on LLM: shadow score 0.500")


NO_FINE_TUNED_GENERATOR = {
    "ops": {
        "slm_candidates": {"config": {"probe_calls": 1, "probe_shots": 1, "probe_max_new_tokens": 8,
                                      "specialist_kinds": ["classifier", "in_context"], "measure_every_kind": True}},
        "finetuned_adapters": {"config": {"min_holdout": 8, "max_holdout": 8, "classifier_epochs": 1}},
        # a floor of 0: every evaluated cluster is promoted, so the serving path runs (a day of calls
        # cannot promote by the real gate; the gate's own tests are in test_promote.py)
        "shadow_eval": {"config": {"max_calls_per_cluster": 8, "max_new_tokens_cap": 96, "quality_floor": 0.0,
                                   "latency_calls": 1}},
        "promotion_decisions": {"config": {"min_holdout": 4}},
    }
}


@pytest.mark.slow
def test_without_fine_tuned_generators_every_kind_is_measured_and_the_cheapest_passing_one_is_served(
        one_day_landing, tmp_path, base_model_dir):
    """specialist_kinds [classifier, in_context] with every kind measured: a day of the sample
    through the whole Dagster graph trains no LoRA adapter; the intent step gets a classifier and an
    example bank, both evaluated on the same calls, and (a floor of 0: both pass) the classifier,
    cheaper to serve, is promoted with the other reported; the steps a classifier cannot answer get
    in_context routes, which slm-router answers with the bare base model."""
    import dagster as dg
    import yaml

    from assets.definitions import all_assets, all_checks
    from pipeline import replay
    from pipeline.store import read_table
    from tests.test_graph import _resources

    resources = _resources(one_day_landing, tmp_path, base_model_dir)
    result = dg.materialize([*all_assets, *all_checks], resources=resources, run_config=NO_FINE_TUNED_GENERATOR,
                            partition_key="2026-10-01", instance=dg.DagsterInstance.ephemeral())
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    out = tmp_path / "out"
    assert not list((out / "adapters").glob("*/adapter"))  # no LoRA adapter was trained
    summary = json.loads((out / "registry" / "runs" / "0001" / "summary.json").read_text())
    built = {c["name"]: c for c in summary["clusters"] if c["selection"]["decision"] == "fine-tune"}
    intents = next(c for c in built.values() if c["selection"]["kind"] == encoders.CLASSIFIER)
    assert intents["selection"]["kinds_measured"] == [encoders.CLASSIFIER, encoders.IN_CONTEXT]
    measured = intents["promotion"]["candidates"]
    assert [(m["kind"], m["decision"], m.get("chosen", False)) for m in measured] == [
        (encoders.CLASSIFIER, promote.PROMOTED, True), (encoders.IN_CONTEXT, promote.PROMOTED, False)]
    assert measured[0]["slm_cost_per_1000_calls"] < measured[1]["slm_cost_per_1000_calls"]
    assert "cheapest to serve of the 2 kinds that pass" in intents["promotion"]["reason"]
    others = [c for c in built.values() if c is not intents]
    assert others and all(c["selection"]["kinds_measured"] == [encoders.IN_CONTEXT] for c in others)
    assert all(c["training"]["shots"] == incontext.DEFAULT_SHOTS and c["training"]["train_calls"] > 0 for c in others)
    router = yaml.safe_load((out / "registry" / "router.yaml").read_text())
    kinds = {r["name"]: r["kind"] for r in router["routes"]}
    assert kinds == {name: encoders.CLASSIFIER if c is intents else encoders.IN_CONTEXT for name, c in built.items()}
    for route in router["routes"]:
        if route["kind"] == encoders.IN_CONTEXT:
            assert (out / "registry" / route["adapter"] / incontext.EXAMPLES_FILE).is_file()
    assert "Base SLMs with retrieved examples" in summary["serving"] and "vllm serve" not in summary["serving"]
    report = (out / "registry" / "runs" / "0001" / "report.md").read_text()
    assert "| also measured |  | smollm2-135m-instruct in_context |" in report

    store = resources["pipeline_store"].store()
    calls = replay.held_out_calls(read_table(store.table("curated_traces")), read_table(store.table("task_clusters")),
                                  read_table(store.evaluation / "predictions.parquet"))
    in_context = [c["cluster_id"] for c in others]
    calls = calls[calls["cluster_id"].isin(in_context)].tail(4)
    outcome = replay.replay(store.registry, calls)
    assert outcome["failed"] == 0 and outcome["calls"] == len(calls) and outcome["answered_by_specialists"] > 0


def test_the_leak_check_passes_a_bank_curation_scrubbed_and_fails_one_with_an_address_left_in_its_tool_schemas(tmp_path):
    """The sample's tool step has a schema whose default is "default@example.com": curation
    scrubs tool schemas by pattern, so a bank of curated calls passes, and an address left in a
    bank's schemas (or its calls' text) fails the check."""
    from assets.models import no_known_pii_in_adapters
    from assets.resources import PipelineStore
    from pipeline.store import write_json

    tools = json_dumps([{"type": "function", "function": {"name": "notify", "parameters": {"type": "object", "properties": {
        "to": {"type": "string", "default": "default@example.com"}}}}}])
    store = PipelineStore(landing_dir=str(tmp_path / "landing"), output_dir=str(tmp_path / "out"),
                          model_cache_dir=str(tmp_path))
    for request, curated, passed in (("notify the team", True, True), ("notify the team", False, False),
                                     ("notify jane.doe@corp.example.org", False, False)):
        calls = pd.DataFrame([{**_call(request, "done"), "tools": tools}])
        if curated:
            calls = curate.scrub_calls(calls, curate.Scrubber(processes=1))
        incontext.write_bank(tmp_path / "bank", calls, ["done"], False, 2, "smollm2-135m-instruct", "notify")
        write_json(store.store().stats("finetuned_adapters"), [
            {"cluster_id": 0, "kind": encoders.IN_CONTEXT, "adapter_dir": str(tmp_path / "bank")}])
        result = no_known_pii_in_adapters(pipeline_store=store)
        assert result.passed is passed, result.metadata
