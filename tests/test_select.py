import pytest

from pipeline import models, select
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
        assert by_step[step]["candidate"] == "smollm2-135m-instruct"
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
    with pytest.raises(ValueError, match=r"candidates\[0\] is not a valid candidate"):
        models.load_candidates(bad)
    with pytest.raises(FileNotFoundError):
        models.load_candidates(tmp_path / "missing.yaml")
