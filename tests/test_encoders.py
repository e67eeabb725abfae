"""Encoder specialists: which steps get one, how they are trained, answer, and are served."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from pipeline import encoders, evaluate, promote, select
from pipeline.promote import calls_to_clear, promotion_decision, quality_lower_bound


def _step_calls(curation, labels, step: str) -> pd.DataFrame:
    steps = {i: r["step"] for i, r in labels["records"].items()}
    calls = curation.curated
    return calls[calls["trace_id"].map(steps) == step].sort_values("called_at").reset_index(drop=True)


def test_each_step_of_the_sample_gets_the_specialist_its_answers_allow(curation, labels):
    intents = encoders.answer_contract(_step_calls(curation, labels, "classify_intent"))
    assert intents["kind"] == encoders.CLASSIFIER
    assert {"spa", "why", "booking", "wifi"} <= set(intents["labels"]) and len(intents["labels"]) <= 60
    fields = encoders.answer_contract(_step_calls(curation, labels, "extract_slots"))
    assert fields["kind"] == encoders.SPAN_TAGGER
    assert {"date_from", "time_from", "person_name"} <= set(fields["keys"])
    # tool calls and worked arithmetic need a generator
    assert encoders.answer_contract(_step_calls(curation, labels, "call_tool"))["kind"] == encoders.GENERATIVE
    assert encoders.answer_contract(_step_calls(curation, labels, "solve_math"))["kind"] == encoders.GENERATIVE


def test_selection_picks_the_encoder_kind_only_where_enabled(curation, labels):
    features = {"calls": 500}
    contract = {"kind": encoders.CLASSIFIER, "labels": ["a", "b"], "share": 1.0}
    generative = {"decision": select.FINE_TUNE, "candidate": "smollm2-135m-instruct", "reason": "fits"}
    chosen = select.choose_kind(features, contract, encoders.KINDS, 40, generative)
    assert (chosen["kind"], chosen["candidate"]) == (encoders.CLASSIFIER, encoders.ENCODER_NAME)
    assert "closed list of 2" in chosen["reason"]
    assert chosen["kinds_measured"] == [encoders.CLASSIFIER] and chosen["generator"] is None
    # measuring every kind: the generator kinds beside the classifier, on the SLM the features chose
    every = select.choose_kind(features, contract, encoders.KINDS, 40, generative, measure_every_kind=True)
    assert every["kinds_measured"] == [encoders.CLASSIFIER, encoders.GENERATIVE, encoders.IN_CONTEXT]
    assert (every["kind"], every["candidate"], every["generator"]) == (
        encoders.CLASSIFIER, encoders.ENCODER_NAME, "smollm2-135m-instruct")
    assert "measured beside it: generative, in_context" in every["reason"]
    only_generative = select.choose_kind(features, contract, (encoders.GENERATIVE,), 40, generative)
    assert (only_generative["kind"], only_generative["candidate"]) == (encoders.GENERATIVE, "smollm2-135m-instruct")
    assert only_generative["kinds_measured"] == [encoders.GENERATIVE]
    untrained = select.choose_kind(features, {"kind": encoders.GENERATIVE}, (encoders.IN_CONTEXT,), 40, generative)
    assert (untrained["kind"], untrained["generator"]) == (encoders.IN_CONTEXT, "smollm2-135m-instruct")
    none = select.choose_kind(features, {"kind": encoders.GENERATIVE}, (encoders.CLASSIFIER,), 40, generative)
    assert none["decision"] == select.KEEP_ON_LLM and "specialist_kinds" in none["reason"]
    too_few = select.choose_kind({"calls": 10}, contract, encoders.KINDS, 40, {"decision": select.KEEP_ON_LLM,
                                                                             "candidate": None, "reason": "10 calls"})
    assert too_few["decision"] == select.KEEP_ON_LLM


def test_a_span_answer_is_read_back_from_the_tags_with_the_whole_sequence_as_its_confidence():
    tags = ["O", "B-date", "I-date", "B-people", "I-people"]
    request = "table for 4 people tomorrow night"
    offsets = [(0, 0), (0, 5), (6, 9), (10, 11), (12, 18), (19, 27), (28, 33), (0, 0)]
    picks = [0, 0, 0, 3, 4, 1, 2, 0]
    probabilities = np.full((len(offsets), len(tags)), 0.05)
    for row, pick in enumerate(picks):
        probabilities[row, pick] = 0.8
    answer, confidence = encoders._spans_answer(request, offsets, probabilities, tags)
    assert json.loads(answer) == {"people": "4 people", "date": "tomorrow night"}
    assert list(json.loads(answer)) == ["people", "date"]  # in the order the request says them
    assert confidence == pytest.approx(0.8 ** 6)  # the six word tokens; special tokens do not count


def test_a_label_set_answer_names_at_least_one_label_where_the_step_always_does():
    labels = ["booking", "spa", "why"]
    probabilities = np.array([0.9, 0.3, 0.6])
    assert encoders._label_set_answer(probabilities, labels, ", ", 0) == ("booking, why", pytest.approx(0.9 * 0.7 * 0.6))
    unsure = np.array([0.2, 0.4, 0.1])
    assert encoders._label_set_answer(unsure, labels, ", ", 0) == ("", pytest.approx(0.8 * 0.6 * 0.9))
    # the likeliest label is given, and the confidence is the probability of exactly that set
    assert encoders._label_set_answer(unsure, labels, ",", 1) == ("spa", pytest.approx(0.8 * 0.4 * 0.9))


def test_a_cluster_with_nothing_a_specialist_can_learn_is_refused_by_name(tmp_path):
    # looks like booking fields, but no value is copied from the request: nothing to tag
    calls = pd.DataFrame({"messages": [json.dumps([{"role": "user", "content": "arrive tomorrow"}])] * 3,
                          "tools": [None] * 3,
                          "response_message": [json.dumps({"role": "assistant", "content": '{"amount": "100"}'})] * 3})
    with pytest.raises(encoders.NothingToLearn, match="no training call of this cluster has an answer a span_tagger can learn"):
        encoders.train_specialist(encoders.SPAN_TAGGER, {"keys": ["amount"]}, encoders.encoder_path(), calls,
                                  tmp_path / "specialist", encoders.EncoderSettings(epochs=1))
    assert not (tmp_path / "specialist").exists()


def test_specialist_kinds_are_checked_when_the_config_is_read():
    from pydantic import ValidationError

    from assets.models import SelectionConfig

    assert SelectionConfig(specialist_kinds=["generative", "classifier"]).specialist_kinds == ["generative", "classifier"]
    with pytest.raises(ValidationError, match="unknown specialist kind\\(s\\) regex; the kinds are classifier"):
        SelectionConfig(specialist_kinds=["classifier", "regex"])


def test_a_replay_that_cannot_run_after_a_finished_run_is_one_line_not_a_failed_run(tmp_path):
    from assets.cli import replay_after_run
    from pipeline.store import Store

    said = replay_after_run(Store(tmp_path), 10)  # an output folder without the run's tables
    assert said.startswith("Router replay skipped: ") and "slm-convert replay" in said


def test_only_answers_a_specialist_can_give_are_trained_on():
    examples = [encoders.Example("arrive tomorrow", '{"date": "tomorrow"}'),
                encoders.Example("arrive tomorrow", '{"amount": "100"}'),  # not a span of the request
                encoders.Example("arrive tomorrow", "{}")]
    assert [e.answer for e in encoders.trainable_examples(encoders.SPAN_TAGGER, examples)] == ['{"date": "tomorrow"}', "{}"]


def test_instructions_key_changes_with_the_system_prompt_or_tools_not_the_request():
    system = {"role": "system", "content": "Tag the intents: a, b."}
    one = json.dumps([system, {"role": "user", "content": "hello"}])
    other_request = json.dumps([system, {"role": "user", "content": "bye"}])
    other_system = json.dumps([{"role": "system", "content": "Tag the intents: a, b, c."}, {"role": "user", "content": "hello"}])
    assert encoders.instructions_key(one, None) == encoders.instructions_key(other_request, None)
    assert encoders.instructions_key(one, None) != encoders.instructions_key(other_system, None)
    assert encoders.instructions_key(one, None) != encoders.instructions_key(one, json.dumps([{"function": {"name": "f"}}]))


def test_a_test_set_too_small_to_clear_the_floor_is_called_underpowered():
    needed = calls_to_clear(0.8, 0.95)
    assert quality_lower_bound(1.0, needed, 0.95) >= 0.8 > quality_lower_bound(1.0, needed - 1, 0.95)
    assert calls_to_clear(0.8, 0.95, score=0.9) > needed  # a score below 1 needs more calls
    assert calls_to_clear(0.8, 0.95, score=0.79) is None  # never, however many
    evaluation = {"test_calls": needed - 1, "confidence_threshold": 0.5, "answered_at_threshold": needed - 1,
                  "score_at_threshold": 1.0, "score_vs_baseline": 1.0}
    decision, reason = promotion_decision(evaluation, 0.8, 1)
    assert decision == promote.NOT_PROMOTED
    assert reason == f"underpowered: {needed - 1} test calls cannot clear floor 0.8 at 95% even if all correct (it takes {needed})"
    assert promotion_decision({**evaluation, "test_calls": needed, "answered_at_threshold": needed}, 0.8, 1)[0] == promote.PROMOTED


@pytest.fixture(scope="module")
def intent_specialist(curation, labels, tmp_path_factory):
    """A classifier trained briefly on the sample's earlier intent calls, and its held-out calls."""
    calls = _step_calls(curation, labels, "classify_intent")
    train, holdout = calls.iloc[:-120], calls.iloc[-120:]
    folder = tmp_path_factory.mktemp("specialist") / "specialist"
    metrics = encoders.train_specialist(
        encoders.CLASSIFIER, encoders.answer_contract(train), encoders.encoder_path(), train, folder,
        encoders.EncoderSettings(epochs=5), curve_calls=holdout.iloc[:60],
        instructions=[encoders.instructions_key(m, t) for m, t in zip(train["messages"], train["tools"])])
    return folder, metrics, holdout


TRAIN_IN_A_PROCESS_OF_ITS_OWN = """
import sys
from pathlib import Path
import pandas as pd
from pipeline import encoders
calls = pd.read_parquet(sys.argv[1])
encoders.train_specialist(encoders.CLASSIFIER, encoders.answer_contract(calls), encoders.encoder_path(), calls,
                          Path(sys.argv[2]), encoders.EncoderSettings(epochs=1),
                          instructions=[encoders.instructions_key(m, t) for m, t in zip(calls["messages"], calls["tools"])])
"""


@pytest.mark.slow
def test_a_specialist_training_killed_before_its_folder_is_in_place_leaves_the_old_one_or_none(curation, labels,
                                                                                               tmp_path):
    """SIGKILL just before the new specialist's folder takes the old one's place: the old one is
    still served whole; the training run again puts the new one in place and sweeps the staging."""
    import os
    import signal
    import subprocess
    import sys

    from pipeline import failpoints
    from tests.conftest import REPO

    calls = _step_calls(curation, labels, "classify_intent").iloc[:60]
    data = tmp_path / "calls.parquet"
    calls.to_parquet(data)
    folder = tmp_path / "specialist"
    train = [sys.executable, "-c", TRAIN_IN_A_PROCESS_OF_ITS_OWN, str(data), str(folder)]
    assert subprocess.run(train, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    first = (folder / "model.safetensors").read_bytes()

    killed = subprocess.run(train, cwd=REPO, capture_output=True, timeout=600,
                            env={**os.environ, failpoints.ENV: "before-rename:specialist"})
    assert killed.returncode == -signal.SIGKILL
    assert (folder / "model.safetensors").read_bytes() == first and not encoders.servability_problems(folder)
    assert (tmp_path / ".specialist.partial").is_dir()  # the new one, hidden while unfinished

    again = subprocess.run(train, cwd=REPO, capture_output=True, timeout=600)
    assert again.returncode == 0 and not encoders.servability_problems(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls.parquet", "specialist"]  # nothing left aside


@pytest.mark.slow
def test_a_classifier_learns_the_intents_and_is_scored_like_any_slm(intent_specialist):
    folder, metrics, holdout = intent_specialist
    assert not encoders.servability_problems(folder)
    # a copy without its weights, or that does not say which instructions it serves, cannot be served
    broken = folder.parent / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").unlink()
    spec = json.loads((broken / encoders.SPECIALIST_FILE).read_text())
    (broken / encoders.SPECIALIST_FILE).write_text(json.dumps({**spec, "instructions": []}))
    assert encoders.servability_problems(broken) == [
        "no model.safetensors", "no instructions recorded: the router could not tell the calls it was trained for"]
    assert promote.missing_files(encoders.CLASSIFIER, folder) == []
    assert promote.missing_files(encoders.CLASSIFIER, broken) == ["model.safetensors"]
    assert promote.missing_files(encoders.GENERATIVE, folder) == ["adapter_config.json", "adapter_model.safetensors"]
    curve = metrics["learning_curve"]
    assert [p["epoch"] for p in curve] == [1, 2, 3, 4, 5] and curve[-1]["score"] > curve[0]["score"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    specialist = encoders.Specialist(folder)
    scored, summary = evaluate.evaluate_specialist(specialist, holdout, 0.8, evaluate.GenerationSettings(latency_calls=1))
    assert summary["kind"] == encoders.CLASSIFIER and summary["test_calls"] == 60
    # five passes already agree with the LLM on a good part of the labels (the demo's 24 reach about
    # 0.8); the answers are label lists of the step's own labels
    assert summary["score_vs_baseline"] > 0.35
    assert all(set(a.split(", ")) <= set(specialist.labels) for a in scored["slm_answer"] if a)
    # more confident answers are better ones: the top third scores above the rest
    ordered = scored.sort_values("confidence", ascending=False)["score"].to_numpy()
    assert ordered[:40].mean() > ordered[40:].mean()
    # a call under other instructions is never answered (confidence 0), as the router escalates it
    changed = holdout.copy()
    changed["messages"] = [json.dumps([{"role": "system", "content": "Other instructions."}, *json.loads(m)[1:]])
                           for m in changed["messages"]]
    other, _ = evaluate.evaluate_specialist(specialist, changed, 0.8, evaluate.GenerationSettings(latency_calls=0))
    assert (other["confidence"] == 0).all()


ENCODERS_ONLY = {
    "ops": {
        "slm_candidates": {"config": {"probe": False, "specialist_kinds": ["classifier", "span_tagger"]}},
        "finetuned_adapters": {"config": {"classifier_epochs": 6, "span_tagger_epochs": 6}},
        # a floor of 0: every evaluated cluster is promoted, so the serving path runs (a day of calls
        # cannot promote by the real gate; tests of the gate are above and in test_promote.py)
        "shadow_eval": {"config": {"quality_floor": 0.0}},
        "promotion_decisions": {"config": {"min_holdout": 4}},
    }
}


@pytest.mark.slow
def test_encoder_specialists_are_promoted_through_the_graph_and_served_by_the_router(one_day_landing, tmp_path,
                                                                                    base_model_dir):
    """A day of the sample through the whole Dagster graph with encoder specialists only: the
    intent and booking-field steps are trained, evaluated and promoted as their kinds, router.yaml
    says so, and slm-router then answers their held-out calls itself and escalates the others."""
    import dagster as dg
    import yaml

    from assets.definitions import all_assets, all_checks
    from pipeline import replay
    from pipeline.store import read_table
    from tests.test_graph import _resources

    resources = _resources(one_day_landing, tmp_path, base_model_dir)
    result = dg.materialize([*all_assets, *all_checks], resources=resources, run_config=ENCODERS_ONLY,
                            partition_key="2026-10-01", instance=dg.DagsterInstance.ephemeral())
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    out = tmp_path / "out"
    summary = json.loads((out / "registry" / "runs" / "0001" / "summary.json").read_text())
    kinds = {c["selection"]["kind"] for c in summary["clusters"] if c["selection"]["decision"] == "fine-tune"}
    assert kinds == {encoders.CLASSIFIER, encoders.SPAN_TAGGER}
    kept = [c for c in summary["clusters"] if c["selection"]["decision"] != "fine-tune"]
    assert kept and all("specialist_kinds" in c["selection"]["reason"] or "reasoning" in c["selection"]["reason"]
                        for c in kept)
    router = yaml.safe_load((out / "registry" / "router.yaml").read_text())
    served = {r["kind"] for r in router["routes"]}
    assert served == kinds, summary
    for route in router["routes"]:
        assert (out / "registry" / route["adapter"] / encoders.SPECIALIST_FILE).is_file()
    assert "served by slm-router itself" in summary["serving"]

    store = resources["pipeline_store"].store()
    calls = replay.held_out_calls(read_table(store.table("curated_traces")), read_table(store.table("task_clusters")),
                                  read_table(store.evaluation / "predictions.parquet"))
    outcome = replay.replay(store.registry, calls)
    assert outcome["failed"] == 0 and outcome["calls"] == len(calls)
    assert outcome["answered_by_specialists"] > 0
    assert set(outcome["per_route"]) == {r["name"] for r in router["routes"]}
    assert 0 < outcome["agreement_with_logged"] <= 1
    # every call of the steps without a route went to the (replayed) LLM
    assert sum(outcome["escalated"].values()) + outcome["answered_by_specialists"] == len(calls)
    assert "answered by specialists" in replay.format_replay(outcome)

    # a call whose instructions changed after the part the route's match reads (a label added at
    # the end of the intent step's list) still matches the route, and is escalated, not answered
    def with_a_label_added(messages: str) -> str:
        system, *rest = json.loads(messages)
        return json.dumps([{**system, "content": system["content"] + ", a_new_label"}, *rest])

    assert all(len(json.loads(m)[0]["content"]) > 600 for m in calls["messages"] if "intent tagger" in m)
    intents = calls[calls["messages"].str.contains("intent tagger")].head(3).copy()
    intents["messages"] = intents["messages"].map(with_a_label_added)
    escalated = replay.replay(store.registry, intents)
    assert escalated["answered_by_specialists"] == 0 and escalated["failed"] == 0
    assert escalated["escalated"] == {"instructions changed": 3}

    # a rollback covers encoder routes as any other: off to the LLM, then back to the version
    name = router["routes"][0]["name"]
    assert name not in {r["name"] for r in promote.rollback(store.registry, name, promote.OFF)["routes"]}
    back = {r["name"]: r for r in promote.rollback(store.registry, name, "v0001")["routes"]}
    assert back[name]["kind"] == router["routes"][0]["kind"] and back[name]["adapter"] == router["routes"][0]["adapter"]


def test_the_replay_sends_test_calls_and_the_latest_calls_of_clusters_not_evaluated():
    from pipeline import replay

    curated = pd.DataFrame({"trace_id": [f"t{i}" for i in range(8)], "called_at": pd.date_range("2026-10-01", periods=8),
                            "messages": ["[]"] * 8, "tools": [None] * 8, "response_message": ["{}"] * 8})
    assignments = pd.DataFrame({"trace_id": curated["trace_id"], "cluster_id": [0, 0, 0, 0, 1, 1, 1, -1]})
    predictions = pd.DataFrame({"trace_id": ["t2", "t3"], "cluster_id": [0, 0], "split": ["calibration", "test"]})
    chosen = replay.held_out_calls(curated, assignments, predictions, per_unevaluated_cluster=2)
    # cluster 0's test call (not its calibration call, nor its training calls); the two latest of
    # cluster 1, which was not evaluated; the unclustered call; in time order
    assert list(chosen["trace_id"]) == ["t3", "t5", "t6", "t7"]
    assert list(replay.held_out_calls(curated, assignments, predictions, 2, limit=2)["trace_id"]) == ["t6", "t7"]


def test_a_specialist_ships_a_model_card_that_says_what_it_answers(intent_specialist):
    folder, metrics, _ = intent_specialist
    card = (folder / "README.md").read_text()
    assert card.startswith("# Encoder specialist (classifier)")
    assert "label sets from" in card and "spa" in card and f"{metrics['epochs']} passes" in card
