import pytest

from pipeline import models, select
from pipeline.calls import Chat, few_shot_prompt
from tests.conftest import REPO

CANDIDATES = REPO / "configs" / "candidates.yaml"


@pytest.fixture(scope="module")
def selection(curation, clustering, tmp_path_factory):
    return select.select_models(
        curation.curated,
        clustering.assignments,
        clustering.clusters,
        models.load_candidates(CANDIDATES),
        tmp_path_factory.mktemp("model-cache"),
    )


def _step_of(choice, clustering, labels):
    example = next(c for c in clustering.clusters if c["cluster_id"] == choice["cluster_id"])["examples"][0]
    return labels["records"][example["trace_id"]]["step"]


def test_reasoning_stays_on_the_llm_and_narrow_steps_get_the_smallest_model(selection, clustering, labels):
    choices, _ = selection
    by_step = {_step_of(c, clustering, labels): c for c in choices}
    assert by_step["solve_math"]["decision"] == select.KEEP_ON_LLM
    assert "reasoning" in by_step["solve_math"]["reason"]
    for step in ("classify_intent", "extract_slots", "call_tool"):
        assert by_step[step]["decision"] == select.FINE_TUNE
    # closed label sets and spans of the request get encoder specialists; tool calls a generative SLM
    assert (by_step["classify_intent"]["kind"], by_step["classify_intent"]["candidate"]) == ("classifier", "all-minilm-l6-v2")
    assert (by_step["extract_slots"]["kind"], by_step["extract_slots"]["candidate"]) == ("span_tagger", "all-minilm-l6-v2")
    assert (by_step["call_tool"]["kind"], by_step["call_tool"]["candidate"]) == ("generative", "smollm2-135m-instruct")
    assert by_step["call_tool"]["features"]["answer_shape"] == "tool_call"


def test_hub_candidates_not_cached_are_reported_not_crashed_on(selection):
    _, unavailable = selection
    assert "qwen2.5-0.5b-instruct" in unavailable
    assert "local Hugging Face cache" in unavailable["qwen2.5-0.5b-instruct"]
    assert "smollm2-135m-instruct" not in unavailable


def test_candidate_list_errors_name_the_entry(tmp_path):
    bad = tmp_path / "candidates.yaml"
    bad.write_text("candidates:\n  - name: x\n    source: ftp\n    params_millions: 1\n    context_length: 1\n    licence: MIT\n")
    with pytest.raises(ValueError, match=r"candidates\[0\].source"):
        models.load_candidates(bad)
    bad.write_text("candidates:\n  - name: x\n    sauce: hub\n")
    with pytest.raises(ValueError, match=r"candidates\[0\].sauce: unknown key"):
        models.load_candidates(bad)
    with pytest.raises(FileNotFoundError):
        models.load_candidates(tmp_path / "missing.yaml")


def _candidate(name, params):
    return models.Candidate(name=name, source="local", params_millions=params, context_length=8192, licence="MIT")


def test_the_smallest_candidate_within_the_margin_of_the_best_probe_is_chosen():
    small, medium, large = _candidate("s", 135), _candidate("m", 500), _candidate("l", 1500)
    ranking = [small, medium, large]
    close = {"s": {"few_shot": 0.55}, "m": {"few_shot": 0.6}, "l": {"few_shot": 0.62}}
    assert select.choose_by_probe(ranking, close, margin=0.1) is small
    far = {"s": {"few_shot": 0.2}, "m": {"few_shot": 0.55}, "l": {"few_shot": 0.6}}
    assert select.choose_by_probe(ranking, far, margin=0.1) is medium
    assert select.choose_by_probe(ranking, {"s": {"few_shot": None}}, margin=0.1) is small


def test_probe_calls_come_from_the_earliest_half_and_examples_precede_the_call(curation):
    members = curation.curated.iloc[:40]
    shots, calls = select.probe_calls(members, select.ProbeSettings(calls=12, shots=3))
    ordered = members.sort_values(["called_at", "trace_id"], kind="stable")
    assert set(shots["trace_id"]) | set(calls["trace_id"]) <= set(ordered["trace_id"].iloc[:20])
    assert not set(shots["trace_id"]) & set(calls["trace_id"]) and len(calls) == 12
    prompt = Chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], tools=[{"name": "t"}])
    example = Chat([{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}])
    answer = {"role": "assistant", "content": "a1"}
    assert few_shot_prompt(prompt, [(example, answer)]) == Chat([
        {"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "Q"},
    ], tools=[{"name": "t"}])


def test_the_probe_measures_every_cluster_and_its_scores_are_evidence(curation, clustering, labels, base_model_dir, monkeypatch):
    settings = select.ProbeSettings(calls=2, shots=1, max_new_tokens_cap=8)
    known = {}

    def choose():
        return select.select_models(
            curation.curated, clustering.assignments, clustering.clusters, models.load_candidates(CANDIDATES),
            base_model_dir.parent, probe_settings=settings, known_probes=known,
            kinds=("generative",),  # every cluster would get a generative SLM: every one is probed
        )[0]

    choices = choose()
    assert len(known) == len(choices)
    # the next night, same probe calls: the results are reused, no model is loaded
    monkeypatch.setattr(select.evaluate, "load_adapter_model", lambda *a: pytest.fail("probed again"))
    assert choose() == choices
    for choice in choices:
        scores = choice["probe"]["smollm2-135m-instruct"]
        assert scores["calls"] == 2 and 0.0 <= scores["zero_shot"] <= 1.0 and 0.0 <= scores["few_shot"] <= 1.0
        assert "probe: smollm2-135m-instruct zero-shot" in choice["reason"]
    by_step = {_step_of(c, clustering, labels): c for c in choices}
    assert by_step["solve_math"]["decision"] == select.KEEP_ON_LLM  # features decide; the probe is its evidence
    assert by_step["classify_intent"]["candidate"] == "smollm2-135m-instruct"
