"""The promotion gate (evidence, not luck), servability, and the model registry."""

import json
from pathlib import Path

import pytest
import yaml

from assets import cli
from pipeline import promote


def _evaluation(score: float, answered: int, holdout: int = 200) -> dict:
    return {"holdout_calls": 2 * holdout, "test_calls": holdout, "score_vs_baseline": score,
            "confidence_threshold": 0.5, "score_at_threshold": score, "answered_at_threshold": answered}


def test_the_lower_bound_is_wilsons_and_shrinks_to_the_mean_with_more_calls():
    # Wilson's one-sided 95% bound for 9 of 10: (0.9 + 1.645^2/20 - 1.645*sqrt(0.009 + 1.645^2/400)) / (1 + 1.645^2/10)
    assert abs(promote.quality_lower_bound(0.9, 10, 0.95) - 0.6521) < 1e-3
    bounds = [promote.quality_lower_bound(0.9, n, 0.95) for n in (10, 100, 1000, 100000)]
    assert bounds == sorted(bounds) and 0.898 < bounds[-1] < 0.9
    assert promote.quality_lower_bound(1.0, 4, 0.95) < 0.6  # four perfect answers prove little
    assert promote.quality_lower_bound(0.9, 100, 0.99) < promote.quality_lower_bound(0.9, 100, 0.95)
    assert promote.quality_lower_bound(0.5, 0, 0.95) == 0.0


def test_a_small_lucky_holdout_is_not_promoted_and_the_same_score_on_many_calls_is():
    decision, reason = promote.promotion_decision(_evaluation(0.9, 10), quality_floor=0.8, min_holdout=10)
    assert decision == promote.NOT_PROMOTED and "lower bound 0.652" in reason
    decision, reason = promote.promotion_decision(_evaluation(0.9, 200), quality_floor=0.8, min_holdout=10)
    assert decision == promote.PROMOTED and "on the 200 calls it would answer" in reason


def test_the_summary_counts_held_out_calls_under_instructions_the_route_was_not_trained_with():
    evaluation = {**_evaluation(0.95, 20), "calibration_calls": 24, "coverage_at_threshold": 0.8}
    assert not any("other instructions" in line for line in promote._evaluation_lines(evaluation))
    lines = promote._evaluation_lines({**evaluation, "calls_under_other_instructions": 3})
    assert any(line.startswith("3 held-out calls came under other instructions") for line in lines)


def test_a_model_worse_than_the_floor_is_never_promoted_however_many_calls():
    for answered in (10, 100, 10_000):
        decision, _ = promote.promotion_decision(_evaluation(0.79, answered), quality_floor=0.8, min_holdout=10)
        assert decision == promote.NOT_PROMOTED
    no_threshold = {**_evaluation(0.95, 0), "confidence_threshold": None}
    assert promote.promotion_decision(no_threshold, 0.8, 10)[0] == promote.NOT_PROMOTED
    assert promote.promotion_decision(_evaluation(1.0, 9, holdout=9), 0.8, 10)[0] == promote.NOT_PROMOTED
    assert promote.promotion_decision(None, 0.8, 10) == (promote.NOT_PROMOTED, "not fine-tuned")
    # a threshold found on the calibration calls that keeps none of the test calls
    none_kept = {**_evaluation(0.95, 200), "answered_at_threshold": 0, "score_at_threshold": None}
    assert promote.promotion_decision(none_kept, 0.8, 10) == (
        promote.NOT_PROMOTED, "at its threshold 0.500 the SLM would answer none of the 200 test calls")


@pytest.fixture(scope="module")
def lora_adapters(base_model_dir, tmp_path_factory):
    """Real PEFT adapters of the bundled base model: a plain one (r=16) and one that also saves
    the LM head in full."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    folders = {}
    for name, extra in (("plain", {}), ("with_head", {"modules_to_save": ["lm_head"]})):
        model = AutoModelForCausalLM.from_pretrained(base_model_dir)
        peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], **extra))
        folders[name] = tmp_path_factory.mktemp(name) / "adapter"
        peft_model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def test_a_servable_adapter_passes_and_each_serving_problem_is_named(lora_adapters, base_model_dir, tmp_path):
    import shutil

    plain, base = lora_adapters["plain"], str(base_model_dir)
    assert promote.servability_problems(plain, base) == []
    assert promote.servability_problems(plain, base, max_rank=8) == ["LoRA rank 16 is above the serving limit 8"]
    assert "the route serves '/elsewhere/qwen'" in promote.servability_problems(plain, "/elsewhere/qwen")[0]
    assert "full weights beside LoRA" in promote.servability_problems(lora_adapters["with_head"], base)[0]
    assert promote.servability_problems(lora_adapters["with_head"], base, allow_extra_modules=True) == []

    no_template = tmp_path / "no_template"
    shutil.copytree(plain, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert promote.servability_problems(no_template, base) == ["no chat template beside the adapter"]
    (no_template / "adapter_model.safetensors").write_bytes(b"truncated")
    assert "does not load" in promote.servability_problems(no_template, base)[0]
    assert "is not a PEFT adapter" in promote.servability_problems(tmp_path, base)[0]


def _route(tmp_path, name: str, threshold: float, rank: int = 16) -> dict:
    adapter = tmp_path / f"{name}-{threshold}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(f"weights {threshold}".encode())
    return {"name": name, "label": "classify intent", "base_model": "smollm2-135m-instruct",
            "base_model_path": "/models/smollm2", "adapter_dir": str(adapter), "threshold": threshold,
            "centroid": [0.6, 0.8], "min_similarity": 0.5, "training": {"lora_r": rank}, "run": "0001"}


FALLBACK = {"model": "gpt-4.1", "base_url": "https://api.openai.com/v1", "api_key_env": "SLM_FALLBACK_API_KEY"}


def test_each_promotion_is_a_new_version_and_a_rollback_serves_the_one_before(tmp_path):
    registry = tmp_path / "registry"
    first = promote.promote_routes(registry, [(_route(tmp_path, "cluster-2", 0.5), {"score": 0.9})], FALLBACK, "0001")
    assert [(r["name"], r["version"]) for r in first["routes"]] == [("cluster-2", "v0001")]
    entry = first["routes"][0]
    assert entry["adapter"] == "cluster-2/v0001/adapter" and entry["match"] == {
        "centroid": [0.6, 0.8], "min_similarity": 0.5,
        # a route that does not say how its centroid was embedded was embedded with clustering's defaults
        "embedding_model": "bundled:all-MiniLM-L6-v2", "signature": "weighted_parts",
        "system_prompts": []}  # and it is found by embedding alone
    assert entry["max_new_tokens"] == promote.DEFAULT_MAX_NEW_TOKENS  # eval.json names no budget
    version_dir = registry / "cluster-2" / "v0001"
    assert json.loads((version_dir / "eval.json").read_text()) == {"score": 0.9}
    hashes = json.loads((version_dir / "hashes.json").read_text())
    assert set(hashes) == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "eval.json", "route.json"}
    assert hashes["eval.json"] == promote.file_hashes(version_dir)["eval.json"]

    # the next run promotes cluster-2 again and cluster-5 for the first time
    second = promote.promote_routes(registry, [(_route(tmp_path, "cluster-2", 0.7), {}), (_route(tmp_path, "cluster-5", 0.6), {})],
                                    FALLBACK, "0002")
    assert {r["name"]: r["version"] for r in second["routes"]} == {"cluster-2": "v0002", "cluster-5": "v0001"}
    assert second["version"] == first["version"] + 1
    # a run that promotes nothing leaves what is served as it is
    assert promote.promote_routes(registry, [], FALLBACK, "0003")["routes"] == second["routes"]
    assert (version_dir / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights 0.5"  # the old version stays

    back = promote.rollback(registry, "cluster-2")
    served = {r["name"]: r for r in yaml.safe_load((registry / "router.yaml").read_text())["routes"]}
    assert served["cluster-2"]["version"] == "v0001" and served["cluster-2"]["confidence_threshold"] == 0.5
    assert back["routes"] == sorted(served.values(), key=lambda r: r["name"])
    with pytest.raises(ValueError, match="its first version; `--to llm`"):
        promote.rollback(registry, "cluster-2")
    promote.rollback(registry, "cluster-2", to="v0002")
    promote.rollback(registry, "cluster-5", to=promote.OFF)
    assert [r["name"] for r in promote.read_router_config(registry)["routes"]] == ["cluster-2"]
    with pytest.raises(ValueError, match="has no version 'v0009'"):
        promote.rollback(registry, "cluster-2", to="v0009")
    with pytest.raises(ValueError, match="no route 'cluster-7'"):
        promote.rollback(registry, "cluster-7")
    with pytest.raises(ValueError, match="is not served now"):
        promote.rollback(registry, "cluster-5")

    events = [(e["action"], e["route"], e["version"], e["replaces"]) for e in promote.history(registry)]
    assert events == [
        ("promote", "cluster-2", "v0001", None), ("promote", "cluster-2", "v0002", "v0001"),
        ("promote", "cluster-5", "v0001", None), ("rollback", "cluster-2", "v0001", "v0002"),
        ("rollback", "cluster-2", "v0002", "v0001"), ("rollback", "cluster-5", "llm", "v0001"),
    ]
    assert not list(registry.rglob("*.partial")) and not list(registry.glob(".router.yaml.*"))


def test_a_promotion_killed_before_router_yaml_is_undone_by_the_next_write(tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    promote.promote_routes(registry, [(_route(tmp_path, "cluster-2", 0.5), {})], FALLBACK, "0001")

    def killed(*args, **kwargs):  # the process dies after the versions were written, before router.yaml
        raise SystemExit("killed")

    monkeypatch.setattr(promote, "write_router_config", killed)
    promoted = [(_route(tmp_path, "cluster-2", 0.7), {}), (_route(tmp_path, "cluster-5", 0.6), {})]
    with pytest.raises(SystemExit):
        promote.promote_routes(registry, promoted, FALLBACK, "0002")
    monkeypatch.undo()
    assert (registry / "cluster-2" / "v0002").is_dir()  # written, never served
    # what took effect is all the history shows, even before the next write cleans up
    assert [(e["route"], e["version"]) for e in promote.history(registry)] == [("cluster-2", "v0001")]

    again = promote.promote_routes(registry, promoted, FALLBACK, "0002")
    assert {r["name"]: r["version"] for r in again["routes"]} == {"cluster-2": "v0002", "cluster-5": "v0001"}
    assert again["version"] == 2
    lines = (registry / "history.jsonl").read_text().splitlines()
    assert [(json.loads(x)["route"], json.loads(x)["version"]) for x in lines] == [
        ("cluster-2", "v0001"), ("cluster-2", "v0002"), ("cluster-5", "v0001")]  # no line of the killed run left
    assert json.loads((registry / "cluster-2" / "v0002" / "route.json").read_text())["threshold"] == 0.7


def test_the_cli_lists_routes_and_rolls_one_back(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLM_OUTPUT_DIR", str(tmp_path / "out"))
    registry = tmp_path / "out" / "registry"
    for threshold in (0.5, 0.7):
        promote.promote_routes(registry, [(_route(tmp_path, "cluster-2", threshold), {})], FALLBACK, "0001")
    assert cli.main(["routes"]) == 0
    listing = capsys.readouterr().out
    assert "cluster-2: serves v0002 (threshold 0.700); versions v0001, v0002" in listing
    assert "promote cluster-2 -> v0002 (was v0001)" in listing
    assert cli.main(["rollback", "cluster-2"]) == 0
    assert "cluster-2 now serves v0001" in capsys.readouterr().out
    assert cli.main(["rollback", "cluster-9"]) == 2
    assert "no route 'cluster-9'" in capsys.readouterr().err


def test_the_run_says_how_to_serve_the_promoted_adapters_with_vllm(tmp_path):
    registry = tmp_path / "registry"
    assert "nothing to serve" in promote.vllm_serving_commands(registry, {"routes": []})
    routes = [(_route(tmp_path, "cluster-2", 0.5), {}), (_route(tmp_path, "cluster-5", 0.6, rank=8), {})]
    router = promote.promote_routes(registry, routes, FALLBACK, "0001")
    command = promote.vllm_serving_commands(registry, router).splitlines()[0]
    assert command == (f"vllm serve /models/smollm2 --enable-lora --max-lora-rank 16 --max-loras 2 --lora-modules "
                       f"cluster-2={registry}/cluster-2/v0001/adapter cluster-5={registry}/cluster-5/v0001/adapter")


def test_the_documented_router_schema_is_what_promotion_writes(tmp_path):
    documented = yaml.safe_load(promote.ROUTER_SCHEMA)
    written = promote.promote_routes(tmp_path, [(_route(tmp_path, "cluster-2", 0.5), {})], FALLBACK, "0001")
    assert set(documented) == set(written)
    assert set(documented["routes"][0]) == set(written["routes"][0])
    assert set(documented["fallback"]) == set(written["fallback"])
    assert promote.ROUTER_SCHEMA in (Path(__file__).parents[1] / "README.md").read_text()  # the README shows this schema


def test_a_kept_evaluation_is_reused_only_where_everything_it_depends_on_is_the_same(tmp_path):
    import pandas as pd

    from assets.promotion import ShadowEvalConfig, _evaluation_fingerprint, _keep_evaluation, _kept_evaluation
    from assets.resources import JudgeEndpoint

    record = {"candidate": "smollm2-135m-instruct", "train_ids": ["t1", "t2"]}
    fingerprint = _evaluation_fingerprint(record, "adapter-1", ["h1", "h2"], ShadowEvalConfig(), JudgeEndpoint())
    assert fingerprint == _evaluation_fingerprint(dict(record), "adapter-1", ["h1", "h2"], ShadowEvalConfig(), JudgeEndpoint())
    changed = [
        _evaluation_fingerprint(record, "adapter-2", ["h1", "h2"], ShadowEvalConfig(), JudgeEndpoint()),  # retrained
        _evaluation_fingerprint(record, "adapter-1", ["h1", "h3"], ShadowEvalConfig(), JudgeEndpoint()),  # other calls
        _evaluation_fingerprint({**record, "train_ids": ["t1"]}, "adapter-1", ["h1", "h2"], ShadowEvalConfig(),
                                JudgeEndpoint()),  # other in-context examples
        _evaluation_fingerprint(record, "adapter-1", ["h1", "h2"], ShadowEvalConfig(quality_floor=0.5), JudgeEndpoint()),
        _evaluation_fingerprint(record, "adapter-1", ["h1", "h2"], ShadowEvalConfig(),
                                JudgeEndpoint(base_url="http://127.0.0.1:9/v1")),  # a judge scores free text
    ]
    assert len(set(changed)) == len(changed) and fingerprint not in changed

    scored = pd.DataFrame({"trace_id": ["h1", "h2"], "score": [1.0, 0.5], "answer": ["a", None]})
    answers, summary = _keep_evaluation(tmp_path, "cluster-1", fingerprint, scored, {"score_vs_baseline": 0.75})
    assert answers.equals(scored) and summary == {"score_vs_baseline": 0.75}
    assert _kept_evaluation(tmp_path, "cluster-1", fingerprint)[1] == summary
    assert _kept_evaluation(tmp_path, "cluster-1", changed[0]) is None
    # a newer evaluation replaces it; answers whose record was never written (a run killed between
    # the two) are not taken for an evaluation
    _keep_evaluation(tmp_path, "cluster-1", changed[0], scored, {"score_vs_baseline": 0.5})
    assert _kept_evaluation(tmp_path, "cluster-1", fingerprint) is None
    assert [p.name for p in tmp_path.glob("cluster-1.*.parquet")] == [f"cluster-1.{changed[0]}.parquet"]
    (tmp_path / f"cluster-1.{changed[1]}.parquet").write_bytes((tmp_path / f"cluster-1.{changed[0]}.parquet").read_bytes())
    assert _kept_evaluation(tmp_path, "cluster-1", changed[1]) is None
