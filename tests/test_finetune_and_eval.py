"""Steps 5 and 6 on a real cluster of the sample, with the bundled base model (CPU, short)."""

import math

import pandas as pd
import pytest
from peft import PeftModel

from pipeline import evaluate, finetune
from pipeline.calls import baseline_answer


@pytest.fixture(scope="module")
def intent_calls(curation, labels):
    curated = curation.curated
    return curated[[labels["records"][i]["step"] == "classify_intent" for i in curated["trace_id"]]]


def test_time_split_holds_out_the_latest_calls(intent_calls):
    train, holdout = finetune.split_by_time(intent_calls, finetune.SplitSettings(0.2, 10, 200))
    assert len(holdout) == min(200, round(len(intent_calls) * 0.2))
    assert train["called_at"].max() <= holdout["called_at"].min()
    assert not set(train["trace_id"]) & set(holdout["trace_id"])
    small = intent_calls.iloc[:12]
    _, small_holdout = finetune.split_by_time(small, finetune.SplitSettings(0.2, 10, 200))
    assert len(small_holdout) == 6  # never more than half of a cluster
    # calls with negative feedback: never trained on, still evaluated
    assert train["trainable"].all()
    untrainable = intent_calls.loc[~intent_calls["trainable"], "trace_id"]
    assert len(untrainable) > 0 and not set(untrainable) & set(train["trace_id"])


def test_training_examples_are_prompt_completion_pairs(intent_calls):
    example = finetune.training_examples(intent_calls.iloc[:1])[0]
    assert [m["role"] for m in example["prompt"]] == ["system", "user"]
    assert example["completion"] == [
        {"role": "assistant", "content": baseline_answer(intent_calls["response_message"].iloc[0])}
    ]


@pytest.mark.slow
def test_lora_adapter_trains_loads_and_answers_held_out_calls(intent_calls, base_model_dir, tmp_path):
    train, holdout = finetune.split_by_time(intent_calls.iloc[:40], finetune.SplitSettings(0.2, 4, 4))
    settings = finetune.TrainSettings(max_steps=2, batch_size=2, max_length=384)
    messages = []
    metrics = finetune.train_adapter(base_model_dir, train.iloc[:8], tmp_path / "adapter", settings, progress=messages.append)

    assert metrics["steps"] == 2 and metrics["device"] == "cpu"
    assert all(math.isfinite(x) for x in metrics["loss_curve"]) and metrics["tokens"] > 0
    assert any(m.startswith("step 2/2, loss") for m in messages)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    model, tokenizer = evaluate.load_adapter_model(base_model_dir, tmp_path / "adapter")
    assert isinstance(model, PeftModel) and tokenizer.padding_side == "left"
    scored, summary = evaluate.evaluate_cluster(
        model, tokenizer, holdout, [baseline_answer(r) for r in train["response_message"]],
        quality_floor=0.8, settings=evaluate.GenerationSettings(batch_size=4, max_new_tokens_cap=24),
    )
    assert list(scored["trace_id"]) == list(holdout["trace_id"])
    assert set(scored["scorer"]) == {"label_set"}
    assert scored["confidence"].between(0, 1).all() and scored["score"].between(0, 1).all()
    assert summary["holdout_calls"] == 4 and summary["max_new_tokens"] <= 24


def test_threshold_is_the_lowest_confidence_that_keeps_the_floor():
    scored = pd.DataFrame({"confidence": [0.9, 0.8, 0.7, 0.6], "score": [1.0, 1.0, 0.5, 0.0]})
    threshold, coverage = evaluate.calibrate_threshold(scored, quality_floor=0.8)
    assert threshold == 0.7 and coverage == 0.75  # (1 + 1 + 0.5) / 3 >= 0.8 > 2.5 / 4
    assert evaluate.calibrate_threshold(scored.assign(score=0.0), 0.8) == (None, 0.0)
