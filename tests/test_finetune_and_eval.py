"""Steps 5 and 6 on a real cluster of the sample, with the bundled base model (CPU, short)."""

import math
from json import dumps as json_dumps
from json import loads as json_loads

import pandas as pd
import pytest
from peft import PeftModel

from pipeline import evaluate, finetune, structured
from pipeline.calls import (
    SharedInstructions, baseline_answer, factor_out, read_instructions, render_prompt, renders_tools,
    shared_instructions, without_instructions,
)


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


def test_the_instructions_every_call_of_a_step_shares_are_found_and_taken_out(curation, labels):
    steps = {i: r["step"] for i, r in labels["records"].items()}
    calls = curation.curated.assign(step=curation.curated["trace_id"].map(steps))
    intents = calls[calls["step"] == "classify_intent"]
    shared = shared_instructions(list(intents["messages"]), list(intents["tools"]))
    assert shared.system.startswith("You are the intent tagger") and shared.tools is None
    factored, carried = factor_out(intents, shared)
    assert all(carried) and all(json_loads(m)[0]["role"] == "user" for m in factored["messages"])
    # tool calls share their system prompt, not their tools, which stay with each call
    tool_calls = calls[calls["step"] == "call_tool"]
    shared_tools = shared_instructions(list(tool_calls["messages"]), list(tool_calls["tools"]))
    assert shared_tools.system and shared_tools.tools is None
    one = tool_calls.iloc[0]
    assert without_instructions(one["messages"], one["tools"], shared_tools)[1] == one["tools"]
    # a fixed tool list is shared too; a call with another one, or a reworded prompt, does not carry them
    fixed = SharedInstructions.from_json({"system": shared.system, "tools": [{"type": "function", "function": {"name": "f"}}]})
    request = json_dumps([{"role": "system", "content": shared.system}, {"role": "user", "content": "hi"}])
    assert without_instructions(request, '[{"function": {"name": "f"}, "type": "function"}]', fixed) == (
        json_dumps([{"role": "user", "content": "hi"}]), None)
    assert without_instructions(request, '[{"type": "function", "function": {"name": "g"}}]', fixed) is None
    reworded = json_dumps([{"role": "system", "content": shared.system + " "}, {"role": "user", "content": "hi"}])
    assert without_instructions(reworded, None, shared) is None
    assert SharedInstructions.from_json(fixed.to_json()) == fixed
    # calls of many steps share nothing: nothing is taken out
    assert not shared_instructions(list(calls["messages"]), list(calls["tools"]))


@pytest.mark.slow
def test_lora_adapter_trains_loads_and_answers_held_out_calls(intent_calls, base_model_dir, tmp_path):
    train, holdout = finetune.split_by_time(intent_calls.iloc[:40], finetune.SplitSettings(0.2, 4, 4))
    settings = finetune.TrainSettings(max_steps=2, batch_size=2, max_length=384)
    messages = []
    metrics = finetune.train_adapter(base_model_dir, train.iloc[:8], tmp_path / "adapter", settings, progress=messages.append,
                                     snapshot_steps=(1, 2))

    assert metrics["steps"] == 2 and metrics["device"] == "cpu"
    # the adapter as it was after steps 1 and 2 answers a few held-out calls: its learning curve
    seen = [s["examples_seen"] for s in metrics["snapshots"]]
    assert [s["step"] for s in metrics["snapshots"]] == [1, 2] and 0 < seen[0] < seen[1]
    curve = evaluate.snapshot_learning_curve(
        base_model_dir, finetune.snapshot_folder(tmp_path / "adapter"), metrics["snapshots"], holdout.iloc[:2],
        [baseline_answer(r) for r in train["response_message"]], evaluate.GenerationSettings(max_new_tokens_cap=24),
        structured.read_answer_format(tmp_path / "adapter"), read_instructions(tmp_path / "adapter"))
    assert [p["examples_seen"] for p in curve] == seen and all(0 <= p["score"] <= 1 for p in curve)
    assert all(math.isfinite(x) for x in metrics["loss_curve"]) and metrics["tokens"] > 0
    assert any(m.startswith("step 2/2, loss") for m in messages)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    # trained without the intent step's long system prompt, which every call carries
    tokens = metrics["prompt_tokens_per_call"]
    assert tokens["trained_on"] < tokens["with_instructions"] / 2 and metrics["calls_under_other_instructions"] == 0
    shared = read_instructions(tmp_path / "adapter")
    assert shared.system == json_loads(train["messages"].iloc[0])[0]["content"] and shared.tools is None
    found = structured.read_answer_format(tmp_path / "adapter")
    assert found["shape"] == structured.LABELS and metrics["answer_format"] == structured.LABELS

    model, tokenizer = evaluate.load_adapter_model(base_model_dir, tmp_path / "adapter")
    assert isinstance(model, PeftModel) and tokenizer.padding_side == "left"
    # the last held-out call comes under a reworded system prompt: the adapter would not be asked
    changed = json_loads(holdout["messages"].iloc[-1])
    changed[0]["content"] = "Reworded: " + changed[0]["content"]
    holdout = holdout.assign(messages=list(holdout["messages"].iloc[:-1]) + [json_dumps(changed)])
    scored, summary = evaluate.evaluate_cluster(
        model, tokenizer, holdout, train, quality_floor=0.8, settings=evaluate.GenerationSettings(batch_size=4, max_new_tokens_cap=24),
        answer_format=found, instructions=shared,
    )
    assert summary["calls_under_other_instructions"] == 1 and scored["confidence"].iloc[-1] == 0
    assert summary["answer_format"] == structured.LABELS
    assert list(scored["trace_id"]) == list(holdout["trace_id"])
    assert set(scored["scorer"]) == {"label_set"}
    assert scored["confidence"].between(0, 1).all() and scored["score"].between(0, 1).all()
    assert summary["holdout_calls"] == 4 and summary["max_new_tokens"] <= 24
    assert list(scored["split"]) == ["calibration", "calibration", "test", "test"]
    assert summary["calibration_calls"] == summary["test_calls"] == 2
    # the base model without the adapter answered the same test calls, zero-shot and in-context
    assert summary["arms"]["calls"] == 2 and 0 <= summary["arms"]["base_in_context"] <= 1
    assert summary["arms"]["fine_tuned"] == round(scored["score"].iloc[2:].mean(), 4)
    speed = summary["cost_and_speed"]
    assert speed["slm_latency_ms_batch_1"]["p50"] > 0 and speed["llm_logged_latency_ms"]["p50"] > 0
    assert speed["llm_cost_per_1000_calls"] > speed["slm_cost_per_1000_calls"] > 0


def test_threshold_is_the_lowest_confidence_that_keeps_the_floor():
    scored = pd.DataFrame({"confidence": [0.9, 0.8, 0.7, 0.6], "score": [1.0, 1.0, 0.5, 0.0]})
    threshold, coverage = evaluate.calibrate_threshold(scored, quality_floor=0.8)
    assert threshold == 0.7 and coverage == 0.75  # (1 + 1 + 0.5) / 3 >= 0.8 > 2.5 / 4
    assert evaluate.calibrate_threshold(scored.assign(score=0.0), 0.8) == (None, 0.0)


def _scored(confidence, score, feedback=None) -> pd.DataFrame:
    return pd.DataFrame({"confidence": confidence, "score": score, "scorer": "label_set",
                         "feedback": feedback or [None] * len(score)})


def test_the_threshold_is_chosen_on_the_calibration_calls_and_judged_on_the_test_calls():
    scored = _scored([0.9, 0.8, 0.3, 0.2, 0.95, 0.85, 0.5, 0.1], [1, 1, 0, 0, 1, 0, 1, 0])
    scored["split"] = evaluate.split_for_calibration(scored, 0.5)
    assert list(scored["split"]) == ["calibration"] * 4 + ["test"] * 4  # held-out calls come time-ordered
    summary = evaluate.summarize_scores(scored, quality_floor=0.8)
    # calibration: at 0.8 both answers kept are right; the test calls at 0.8 show what it is worth
    assert summary["confidence_threshold"] == 0.8
    assert (summary["answered_at_threshold"], summary["score_at_threshold"], summary["coverage_at_threshold"]) == (2, 0.5, 0.5)
    assert summary["score_vs_baseline"] == 0.5 and summary["feedback"] is None
    assert list(evaluate.split_for_calibration(scored.iloc[:3], 0.5)) == ["calibration", "calibration", "test"]
    assert list(evaluate.split_for_calibration(scored.iloc[:1], 0.5)) == ["test"]  # one call decides nothing


def test_feedback_gives_the_baselines_accuracy_and_a_lower_bound_of_the_slms():
    scored = _scored([0.9] * 5, [1.0, 0.5, 1.0, 0.0, 1.0], ["correct", "correct", "incorrect", "incorrect", None])
    assert evaluate.feedback_accuracy(scored) == {
        "calls_with_feedback": 4, "baseline_accuracy": 0.5,
        "slm_accuracy_lower_bound": 0.25,  # only the confirmed-correct answer it gave counts
        "slm_repeats_known_wrong_answers": 1,
    }
    assert evaluate.feedback_accuracy(scored.assign(feedback=None)) is None


def test_coverage_curve_answers_tied_confidences_together_and_is_plotted():
    scored = _scored([0.9, 0.5, 0.5, 0.1], [1.0, 0.0, 1.0, 0.0])
    curve = evaluate.coverage_curve(scored)
    assert curve["threshold"].tolist() == [0.9, 0.5, 0.1]
    assert curve["coverage"].tolist() == [0.25, 0.75, 1.0]
    assert curve["score"].round(4).tolist() == [1.0, 0.6667, 0.5]
    scored = scored.assign(cluster_id=3, kind="classifier", split=["calibration", "calibration", "test", "test"])
    png = evaluate.coverage_quality_png(scored, {(3, "classifier"): {"confidence_threshold": 0.5, "coverage_at_threshold": 0.5,
                                                     "score_at_threshold": 1.0}}, {3: "classify intent"}, 0.8)
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_cost_and_speed_from_measured_batches_logged_latency_and_token_prices():
    calls = pd.DataFrame({"prompt_tokens": [1000, 3000], "completion_tokens": [100, 300], "latency_ms": [1000.0, 3000.0]})
    figures = evaluate.cost_and_speed(calls, batch_seconds=[2.0], batch_size=2, single_seconds=[0.5, 1.5],
                                      prices=evaluate.Prices(2.0, 8.0, 0.10))
    assert figures["slm_seconds_per_call_batched"] == 1.0  # one batch of two calls in 2 s
    assert figures["slm_latency_ms_batch_2"] == {"p50": 2000.0, "p95": 2000.0}  # each waits for its batch
    assert figures["slm_latency_ms_batch_1"] == {"p50": 1000.0, "p95": 1450.0}
    assert figures["llm_logged_latency_ms"] == {"p50": 2000.0, "p95": 2900.0}
    assert figures["llm_cost_per_1000_calls"] == 5.6  # (2,000 x $2 + 200 x $8) per million tokens, x 1,000
    assert figures["slm_cost_per_1000_calls"] == round(0.10 / 3600 * 1000, 4)
    assert figures["cost_ratio_llm_to_slm"] == 201.6


def test_packed_attention_keeps_each_call_to_itself(base_model_dir):
    """A padding-free row of four calls gives each call the logits it gets alone."""
    import torch
    from transformers import AutoModelForCausalLM

    finetune.register_packed_attention()
    packed = AutoModelForCausalLM.from_pretrained(base_model_dir, attn_implementation=finetune.PACKED_ATTENTION)
    alone = AutoModelForCausalLM.from_pretrained(base_model_dir, attn_implementation="sdpa")
    lengths = [7, 30, 1, 12]
    generator = torch.Generator().manual_seed(0)
    calls = [torch.randint(0, packed.config.vocab_size, (n,), generator=generator) for n in lengths]
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        row = packed(
            input_ids=torch.cat(calls)[None],
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=max(lengths), max_length_k=max(lengths),
        ).logits[0]
        expected = torch.cat([alone(input_ids=c[None]).logits[0] for c in calls])
    assert ((row - expected).norm() / expected.norm()).item() < 1e-5
    # and a call that attended across its neighbour's boundary would differ by far more
    with torch.no_grad():
        unpacked = alone(input_ids=torch.cat(calls)[None]).logits[0]
    assert ((unpacked - expected).norm() / expected.norm()).item() > 1e-2


def test_the_lm_head_scores_only_the_answers_on_cpu_with_the_same_loss_and_gradients(base_model_dir, monkeypatch):
    """TRL's fused LM head, as SFTTrainer installs it, projects every position of a CPU batch;
    inside `lm_head_on_answers` it projects only the positions with a label, and the loss,
    the gradients and the metrics TRL logs stay what they were."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils as trl_utils

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    input_ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :36] = -100  # a 36-token prompt, a 12-token answer
    projected_rows = []
    head = trl_utils._ChunkedLogProbFunction

    class CountingHead:
        @staticmethod
        def apply(hidden, *args):
            projected_rows.append(hidden.shape[0])
            return head.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingHead)

    def step(lm_head: str):
        model.zero_grad()
        with finetune.lm_head_on_answers(finetune.TrainSettings(lm_head=lm_head)) as narrowed:
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
            out.loss.backward()
        gradients = [p.grad.clone() for p in (model.model.norm.weight, model.model.layers[-1].mlp.down_proj.weight)]
        return narrowed, out, gradients

    everywhere, full, full_gradients = step("trl")
    narrowed, answers, answer_gradients = step(finetune.ANSWERS_ONLY)
    assert (everywhere, narrowed) == (False, True)
    assert projected_rows == [47, 12]  # every shifted position, then the answer's
    assert torch.allclose(answers.loss, full.loss, rtol=1e-6)
    for a, b in zip(answer_gradients, full_gradients):
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert torch.allclose(answers.entropy, full.entropy, atol=1e-5)
    assert torch.equal(answers.is_top1, full.is_top1)
    # TRL's own choice is back once training is over
    assert trl_utils._use_triton(torch.device("cpu")) is False
    with pytest.raises(ValueError, match="expected answers or trl"):
        with finetune.lm_head_on_answers(finetune.TrainSettings(lm_head="some")):
            pass


def test_training_flops_count_every_weight_of_the_model(base_model_dir):
    """4 FLOPs per frozen weight and 6 per LoRA weight per token: checked against the real
    parameter counts of SmolLM2 and of PEFT's adapter, not against the formula itself."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    # every matrix (tied: the embedding is the LM head); norms' scales are not matmul weights
    frozen = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    peft_model = get_peft_model(model, finetune.lora_config(finetune.TrainSettings(lora_r=16)))
    lora, _ = peft_model.get_nb_trainable_parameters()
    assert finetune.lora_training_flops(model.config, 1, 0, 16) == 4 * frozen + 6 * lora
    # attention: 12 * layers * heads * head_dim FLOPs per attended pair (forward and backward)
    config = model.config
    per_pair = 12 * config.num_hidden_layers * config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert finetune.lora_training_flops(config, 0, 10, 16) == 10 * per_pair
    assert finetune.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert finetune.peak_flops("NVIDIA H100 PCIe") == 756e12 and finetune.peak_flops("Some CPU") is None


def test_calls_longer_than_max_length_are_counted_and_a_useless_max_length_refused(intent_calls, base_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenized = finetune.tokenize_examples(tokenizer, finetune.training_examples(intent_calls.iloc[:20]))
    assert finetune.calls_cut_by_max_length(tokenized, 4096) == (0, 0)
    cut, lost = finetune.calls_cut_by_max_length(tokenized, 16)
    assert cut == lost == 20
    lengths = [len(t["input_ids"]) for t in tokenized]
    longest = max(lengths)  # only the longest calls lose the end of their answer
    assert finetune.calls_cut_by_max_length(tokenized, longest - 1) == (lengths.count(longest), 0)
    with pytest.raises(ValueError, match="raise max_length"):
        finetune.train_adapter(base_model_dir, intent_calls.iloc[:4], tmp_path / "adapter",
                               finetune.TrainSettings(max_steps=1, max_length=16))


def test_gradient_checkpointing_keeps_fewer_activations_for_the_same_loss_and_gradients(intent_calls, base_model_dir, tmp_path):
    """`gradient_checkpointing: true`, one step of the trainer the pipeline builds (packed rows,
    LoRA, dropout on): the forward keeps a fraction of the activations for backward, and the loss
    and every LoRA gradient are those of the step that keeps them all."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenized = finetune.tokenize_examples(tokenizer, finetune.training_examples(intent_calls.iloc[:24]))

    class GradientsBeforeTheUpdate(TrainerCallback):
        def __init__(self):
            self.gradients = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    def one_step(checkpointing: bool):
        settings = finetune.TrainSettings(max_steps=1, batch_size=2, max_length=768, logging_steps=1,
                                          gradient_checkpointing=checkpointing)
        capture = GradientsBeforeTheUpdate()
        trainer = SFTTrainer(
            model=finetune._load_base_for_training(base_model_dir, settings),
            args=finetune.sft_config(tmp_path / str(checkpointing), settings),
            train_dataset=Dataset.from_list(tokenized),
            processing_class=tokenizer,
            peft_config=finetune.lora_config(settings),
            callbacks=[capture],
        )
        generator = torch.Generator().manual_seed(0)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:  # non-zero, so that lora_A gets a gradient too
                parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        kept_bytes = []

        def keep(tensor):
            kept_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            trainer.train()
        return trainer.state.log_history[0]["loss"], capture.gradients, sum(kept_bytes)

    loss, gradients, kept = one_step(checkpointing=False)
    checkpointed_loss, checkpointed_gradients, checkpointed_kept = one_step(checkpointing=True)
    assert checkpointed_kept < kept / 10, (checkpointed_kept, kept)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert gradients.keys() == checkpointed_gradients.keys() and len(gradients) == 2 * 7 * 30  # A and B, 7 projections, 30 layers
    for name, gradient in gradients.items():
        assert gradient.abs().sum() > 0 and torch.allclose(checkpointed_gradients[name], gradient, rtol=1e-4, atol=1e-7), name


def test_running_out_of_gpu_memory_names_the_settings_that_make_a_step_fit(intent_calls, base_model_dir, tmp_path, monkeypatch):
    import torch
    from trl import SFTTrainer

    def out_of_memory(self, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity "
                                          "of 22.05 GiB of which 1.20 GiB is free.\nIf reserved but unallocated ...")

    monkeypatch.setattr(SFTTrainer, "train", out_of_memory)
    with pytest.raises(finetune.TrainingOutOfMemory) as refused:
        finetune.train_adapter(base_model_dir, intent_calls.iloc[:8], tmp_path / "adapter", finetune.TrainSettings(max_steps=1))
    message = str(refused.value)
    assert message.startswith(f"out of GPU memory training {base_model_dir.name} with 2 rows of 768 tokens a step. ")
    assert ("To fit: set gradient_checkpointing: true (activations recomputed in backward; same results, slower); "
            "or lower batch_size, raising gradient_accumulation_steps to keep the tokens a step; or lower max_length; "
            "or set quantization: 4bit (QLoRA). ") in message
    assert message.endswith("PyTorch said: CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity "
                            "of 22.05 GiB of which 1.20 GiB is free.")
    assert not (tmp_path / "adapter").exists()
    # what is already set is not suggested again
    with pytest.raises(finetune.TrainingOutOfMemory, match=r"a step\. To fit: lower batch_size, .*; or set quantization"):
        finetune.train_adapter(base_model_dir, intent_calls.iloc[:8], tmp_path / "adapter",
                               finetune.TrainSettings(max_steps=1, gradient_checkpointing=True))


def test_kernel_choices_fail_clearly_where_they_cannot_run():
    with pytest.raises(RuntimeError, match="CUDA"):
        finetune.apply_kernels(None, finetune.TrainSettings(kernels="liger"))
    with pytest.raises(ValueError, match="do not go together"):
        finetune.apply_kernels(None, finetune.TrainSettings(kernels="liger", compile=True))
    with pytest.raises(ValueError, match="expected auto, liger or none"):
        finetune.apply_kernels(None, finetune.TrainSettings(kernels="fast"))
    assert finetune.apply_kernels(None, finetune.TrainSettings()) == "none"  # auto on CPU


def test_checkpoints_of_other_training_are_not_resumed(tmp_path):
    checkpoints = tmp_path / ".adapter.checkpoints"

    def checkpoint(step: int, complete: bool = True):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")

    checkpoint(5)
    (checkpoints / "fingerprint").write_text("data or settings since changed")
    assert finetune.resumable_checkpoint(checkpoints, "this training") is None and not checkpoints.exists()
    checkpoint(5)
    checkpoint(10)
    checkpoint(15, complete=False)  # killed while writing it
    (checkpoints / "fingerprint").write_text("this training")
    assert finetune.resumable_checkpoint(checkpoints, "this training").name == "checkpoint-10"


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_training(intent_calls, base_model_dir, tmp_path_factory):
    """The same 4-step training twice: once straight through, once killed after step 3 (its
    last checkpoint at step 2) and run again."""
    from transformers import TrainerCallback

    class KillAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Killed()

    train = intent_calls.iloc[:16]
    settings = finetune.TrainSettings(max_steps=4, batch_size=1, max_length=384, save_steps=2, logging_steps=1)
    card = finetune.ModelCard(base_model="SmolLM2-135M-Instruct", licence="Apache-2.0", task="classify intent", cluster_id=3)
    straight = tmp_path_factory.mktemp("straight")
    straight_metrics = finetune.train_adapter(base_model_dir, train, straight / "adapter", settings, progress=lambda m: None)
    killed = tmp_path_factory.mktemp("killed")
    with pytest.raises(_Killed):
        finetune.train_adapter(base_model_dir, train, killed / "adapter", settings, progress=lambda m: None,
                               callbacks=[KillAfterStep3()], card=card)
    left = sorted(p.name for p in (killed / ".adapter.checkpoints").glob("checkpoint-*"))
    adapter_after_kill = (killed / "adapter").exists()
    messages = []
    metrics = finetune.train_adapter(base_model_dir, train, killed / "adapter", settings, progress=messages.append, card=card)
    return {"straight": straight / "adapter", "straight_metrics": straight_metrics, "resumed": killed / "adapter",
            "metrics": metrics, "messages": messages, "left": left, "adapter_after_kill": adapter_after_kill,
            "train": train}


def _answer_alone(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, float]:
    """One prompt through plain `generate`, no batching: what batched answers must equal."""
    import torch

    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    tokens = out.sequences[0, len(ids):].tolist()
    length = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
    log_probs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0, :length]
    return tokenizer.decode(tokens[:length], skip_special_tokens=True).strip(), math.exp(float(log_probs.mean()))


def test_prefill_groups_rows_of_similar_length_shortest_first():
    assert evaluate._prefill_groups([300, 10, 12, 700, 320, 0]) == [[5, 1, 2], [0, 4], [3]]
    assert evaluate._prefill_groups([]) == []


@pytest.mark.slow
def test_prompts_of_very_different_lengths_in_one_batch_get_the_answers_of_one_at_a_time(curation, labels, base_model_dir):
    # tool calls (hundreds of tokens of tool schemas) and intents (a few dozen of their own) in one
    # batch: the rows' own parts are run through the model in several groups, without the padding
    model, tokenizer = evaluate.load_adapter_model(base_model_dir, None)
    curated = curation.curated
    steps = curated["trace_id"].map(lambda i: labels["records"][i]["step"])
    calls = pd.concat([curated[steps == "call_tool"].iloc[-3:], curated[steps == "classify_intent"].iloc[-2:]])
    prompts = evaluate.prompts_of(calls, renders_tools(tokenizer))
    token_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    shared = evaluate._shared_prefix_length(token_ids)
    assert len(evaluate._prefill_groups([len(t) - shared - 1 for t in token_ids])) >= 3
    batched = evaluate.generate_answers(model, tokenizer, prompts, 6, batch_size=len(prompts))
    one_at_a_time = [_answer_alone(model, tokenizer, ids, 6) for ids in token_ids]
    assert [a for a, _ in batched] == [a for a, _ in one_at_a_time]
    assert [c for _, c in batched] == pytest.approx([c for _, c in one_at_a_time], abs=1e-4)


@pytest.mark.slow
def test_batched_answers_sharing_the_system_prompt_are_the_answers_of_one_call_at_a_time(
        intent_calls, resumed_training, base_model_dir):
    import torch

    model, tokenizer = evaluate.load_adapter_model(base_model_dir, resumed_training["straight"])
    calls = intent_calls.iloc[-6:]
    prompts = evaluate.prompts_of(calls, renders_tools(tokenizer))
    token_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert evaluate._shared_prefix_length(token_ids) > 100  # the system prompt, encoded once a batch
    assert len({len(t) for t in token_ids}) > 2  # rows of different lengths, padded after it

    one_at_a_time = [_answer_alone(model, tokenizer, ids, 12) for ids in token_ids]
    batched = evaluate.generate_answers(model, tokenizer, prompts, 12, batch_size=4)
    assert [a for a, _ in batched] == [a for a, _ in one_at_a_time]
    assert [c for _, c in batched] == pytest.approx([c for _, c in one_at_a_time], abs=1e-4)

    lora_layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base_weight = lora_layer.base_layer.weight.detach().clone()
    with evaluate.lora_merged(model):
        assert not torch.equal(lora_layer.base_layer.weight, base_weight)  # the adapter is folded in
        merged = evaluate.generate_answers(model, tokenizer, prompts, 12, batch_size=4)
    assert [a for a, _ in merged] == [a for a, _ in batched]
    assert torch.allclose(lora_layer.base_layer.weight, base_weight, atol=1e-6)  # and taken back out


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_where_an_unbroken_run_does(resumed_training):
    from safetensors.torch import load_file

    run = resumed_training
    assert run["left"] == ["checkpoint-2"] and not run["adapter_after_kill"]
    assert any("resuming from checkpoint-2" in m for m in run["messages"])
    assert run["metrics"]["resumed_from_step"] == 2 and run["metrics"]["steps"] == 4
    assert not (run["resumed"].parent / ".adapter.checkpoints").exists()
    assert run["metrics"]["loss_curve"] == pytest.approx(run["straight_metrics"]["loss_curve"], abs=1e-4)
    straight = load_file(run["straight"] / "adapter_model.safetensors")
    resumed = load_file(run["resumed"] / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all((straight[k] - resumed[k]).abs().max() < 1e-5 for k in straight)


@pytest.mark.slow
def test_adapter_ships_a_model_card_without_training_text_and_merges_into_its_base(resumed_training, base_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    adapter = resumed_training["resumed"]
    card = (adapter / "README.md").read_text()
    assert "base_model: SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert "task cluster 3: classify intent" in card and "16 logged calls" in card
    user_texts = [m["content"] for p in finetune.training_examples(resumed_training["train"]) for m in p["prompt"]
                  if m["role"] == "user"]
    assert not any(text[:40] in card for text in user_texts)
    assert json_loads((adapter / "training_metrics.json").read_text())["steps"] == 4

    merged_dir = finetune.merge_adapter(base_model_dir, adapter, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    model, _ = evaluate.load_adapter_model(base_model_dir, adapter)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-3)


def test_settings_follow_the_base_models_size_unless_the_config_sets_them():
    tiny = finetune.settings_for_model({"learning_rate": 0.0, "max_length": 768}, 135, 8192)
    big = finetune.settings_for_model({"learning_rate": 0.0, "max_length": 768}, 3000, 8192)
    assert (tiny.learning_rate, big.learning_rate) == (5e-4, 1e-4)
    assert finetune.settings_for_model({"learning_rate": 3e-5}, 3000, 8192).learning_rate == 3e-5
    assert finetune.settings_for_model({"max_length": 4096}, 135, 2048).max_length == 2048  # the model's context
    assert finetune.settings_for_model({"max_steps": 9, "not_a_setting": 1}, 135, 2048).max_steps == 9
